"""python -m bench: run the benchmark and write its results.

python -m bench --docs docs/performance.md   # the full run (make bench), 5 rounds
python -m bench --quick                     # reduced sizes, 2 rounds, results/quick/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import chart, coldstart, docs, machine, report, udp, workloads
from bench.targets import TARGETS, Target
from bench.testbed import GW4, GW6, Testbed
from bench.tools import build, check_headers
from bench.workloads import Context, Settings

HERE = Path(__file__).resolve().parent
WORKLOADS: dict[str, Callable[[Context, Target], dict[str, Any]]] = {
    "bulk": workloads.bulk,
    "rate": workloads.rate,
    "hold": workloads.hold,
    "holdmax": workloads.hold_max,
    "udp": udp.workload,
    "coldstart": coldstart.workload,
}
VARIANTS = dict.fromkeys(workloads.RATE_VARIANTS)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)(i?b)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 256MiB)")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes and two rounds (the defaults below change), for development",
    )
    p.add_argument("--bulk-size", type=parse_size, help="bytes each way (2GiB; quick 512MiB)")
    p.add_argument("--rate-seconds", type=float,
                   help="rate test, seconds per variant (6; quick 2)")  # fmt: skip
    p.add_argument("--rate-variants", default=",".join(workloads.RATE_VARIANTS),
                   help="the rate test's PROXY versions and families "
                        f"({','.join(workloads.RATE_VARIANTS)})")  # fmt: skip
    p.add_argument("--rate-procs", type=int, default=2, help="load-generator processes (2)")
    p.add_argument("--rate-conc", type=int, default=32, help="concurrent clients in all (32)")
    p.add_argument("--hold-count", type=int, help="idle connections held (9000)")
    p.add_argument("--udp-seconds", type=float, help="UDP, seconds per payload size (5; quick 2)")
    p.add_argument("--udp-procs", type=int, default=2, help="UDP load-generator processes (2)")
    p.add_argument("--udp-flows", type=int, default=32, help="UDP flows in all (32)")
    p.add_argument("--udp-window", type=int, default=2, help="UDP datagrams in flight per flow (2)")
    p.add_argument("--udp-sizes", default="64,1400", help="UDP payload sizes, bytes (64,1400)")
    p.add_argument("--udp-framings", default="v2,v2first,spp",
                   help="mmproxy's UDP framings: v2 (every datagram), v2first (Spectrum's "
                        "first datagram only), spp (v2,v2first,spp)")  # fmt: skip
    p.add_argument("--rounds", type=int, help="interleaved rounds (5; quick 2)")
    p.add_argument("--proxy", choices=("v1", "v2"), default="v1",
                   help="PROXY version of bulk and hold (v1)")  # fmt: skip
    p.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}"
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {', '.join(WORKLOADS)}",
    )
    p.add_argument("--out", type=Path, help="results folder (bench/results; quick: …/quick)")
    p.add_argument("--docs", type=Path, help="also write this performance page")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="run nothing: write the outputs again from a results.json",
    )
    return p  # fmt: skip


def settings_from(args: argparse.Namespace) -> tuple[Settings, int]:
    quick = args.quick
    settings = Settings(
        bulk_bytes=args.bulk_size or (512 << 20 if quick else 2 << 30),
        rate_seconds=args.rate_seconds or (2.0 if quick else 6.0),
        rate_procs=args.rate_procs,
        rate_conc=args.rate_conc,
        hold_count=args.hold_count or 9000,
        hold_inflight=200,
        proxy=args.proxy,
        udp_seconds=args.udp_seconds or (2.0 if quick else 5.0),
        udp_procs=args.udp_procs,
        udp_flows=args.udp_flows,
        udp_window=args.udp_window,
        udp_sizes=tuple(int(n) for n in args.udp_sizes.split(",")),
        udp_framings=tuple(_pick(args.udp_framings, udp.FRAMINGS, "UDP framing")),
        rate_variants=tuple(_pick(args.rate_variants, VARIANTS, "rate variant")),
    )
    return settings, args.rounds or (2 if quick else 5)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        write_outputs(results, args.out or args.from_json.parent, args.docs)
        return 0
    if os.geteuid() != 0:
        print("python -m bench: needs root (it makes network namespaces)", file=sys.stderr)
        return 2
    settings, rounds = settings_from(args)
    order = _pick(args.targets, TARGETS, "target")
    names = _pick(args.workloads, WORKLOADS, "workload")
    out = args.out or (HERE / "results" / "quick" if args.quick else HERE / "results")
    machine.raise_fd_limit()  # before anything starts: every tool inherits it
    tools = build()
    check_headers(tools, [(GW4, TARGETS["mmproxy"].port), (GW6, TARGETS["mmproxy"].port)])
    udp.check_header(tools, (GW4, TARGETS["mmproxy"].port))
    started, load_before = time.monotonic(), machine.load_average()
    foreign = machine.ForeignCpu()
    with tempfile.TemporaryDirectory(prefix="mmbench-") as tmp, Testbed() as bed:
        ctx = Context(bed, tools, settings, Path(tmp))
        runs = run_all(ctx, [TARGETS[k] for k in order], names, rounds)
    results = assemble(runs, settings, rounds, order)
    results["elapsed_s"] = round(time.monotonic() - started)
    results["machine"]["load_average_before"] = load_before
    results["machine"]["load_average_after"] = machine.load_average()
    results["machine"]["foreign_cpus"] = foreign.cpus()
    write_outputs(results, out, args.docs)
    print(docs.results_markdown(results))
    return 0 if all("error" not in r for r in runs) else 1


def _pick(text: str, known: dict[str, Any], what: str) -> list[str]:
    picked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return picked


def run_all(
    ctx: Context, targets: list[Target], names: list[str], rounds: int
) -> list[dict[str, Any]]:
    """Workload by workload, rounds of every target in turn: A B C D A B C D …"""
    runs = []
    for name in names:
        for round_no in range(1, rounds + 1):
            for target in targets:
                run = _one(ctx, name, target)
                run.update(workload=name, round=round_no, target=target.key)
                runs.append(run)
                print(f"[{name} {round_no}/{rounds}] {target.name}: {_brief(run)}", flush=True)
    return runs


def _one(ctx: Context, name: str, target: Target) -> dict[str, Any]:
    try:
        return WORKLOADS[name](ctx, target)
    except Exception as exc:  # one failed run is reported, the others still run
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}", "metrics": {}}


def _brief(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"ERROR {run['error']}"
    if "skipped" in run:
        return f"n/a ({run['skipped']})"
    return ", ".join(f"{k} {v}" for k, v in run["metrics"].items() if v is not None)


def assemble(
    runs: list[dict[str, Any]], settings: Settings, rounds: int, order: list[str]
) -> dict[str, Any]:
    summary = report.summarize(runs)
    floors = report.all_floors(summary, settings.__dict__)
    return {
        "machine": machine.describe(),
        "settings": settings.__dict__,
        "rounds": rounds,
        "order": order,
        "summary": summary,
        "floors": floors,
        "runs": runs,
    }


def write_outputs(results: dict[str, Any], out: Path, docs_path: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The floors again from the medians: a results.json of an older run gets today's.
    results["floors"] = report.all_floors(results["summary"], results["settings"])
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    title = f"mmproxy benchmark, {results['machine']['date']} (medians of {results['rounds']})"
    chart.draw(results["summary"], results["order"], out / "chart.png", title)
    if results["floors"]:
        (out / "results.md").write_text(docs.results_markdown(results))
        if docs_path is not None:
            docs_path.parent.mkdir(parents=True, exist_ok=True)
            docs_path.write_text(docs.performance_page(results))
    print(f"results written to {out}", file=sys.stderr)

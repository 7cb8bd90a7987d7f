"""Medians over the rounds, the issue's floors, and the outputs: JSON, markdown, chart."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, TypeGuard

from bench.targets import PEERS, TARGETS

Result = dict[str, Any]
Summary = dict[str, dict[str, Any]]  # target key -> metric -> median
OURS = "mmproxy"  # as the CLI runs it; the pinned variant is shown beside it


def summarize(runs: list[Result]) -> Summary:
    """Per target, the median of every numeric metric over the rounds that produced it."""
    values: dict[str, dict[str, list[Any]]] = {}
    for run in runs:
        per_target = values.setdefault(run["target"], {})
        for metric, value in run.get("metrics", {}).items():
            per_target.setdefault(metric, []).append(value)
    return {target: _medians(metrics) for target, metrics in values.items()}


def _medians(metrics: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, vals in metrics.items():
        present = [v for v in vals if v is not None]
        if metric == "gateway_exit":
            out[metric] = _exits(vals)
        elif not present:
            out[metric] = None
        elif all(isinstance(v, bool) for v in present):
            out[metric] = all(present)
        elif all(isinstance(v, int | float) for v in present):
            out[metric] = round(statistics.median(present), 3)
        else:
            out[metric] = present[-1]
    return out


def _exits(statuses: list[int | None]) -> str:
    """How often the gateway exited by itself during the workload, and how."""
    exited = [s for s in statuses if s is not None]
    if not exited:
        return "no"
    how = ", ".join(sorted({f"status {s}" for s in exited}))
    return f"{len(exited)} of {len(statuses)} rounds ({how})"


# --- floors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    label: str
    metric: str
    higher_is_better: bool
    factor: float


RATIO_FLOORS = (
    Floor("upload throughput ≥ 1.0 x best peer", "upload_gbit_s", True, 1.0),
    Floor("download throughput ≥ 1.0 x best peer", "download_gbit_s", True, 1.0),
    Floor("gateway CPU per GiB ≤ 1.0 x best peer", "cpu_s_per_gib", False, 1.0),
    Floor("gateway CPU per 1,000 connections ≤ 1.25 x best peer", "cpu_s_per_1k_conn", False,
          1.25),
    Floor("connections/s ≥ 0.9 x best peer", "conn_per_s", True, 0.9),
    Floor("p99 latency (rate test) ≤ 1.25 x best peer", "p99_ms", False, 1.25),
)  # fmt: skip
DIGITS = {"conn_per_s": 0, "cpu_s_per_1k_conn": 3, "held": 0, "alive": 0}
RSS_PER_CONN_MAX_KIB = 16.0
FDS_PER_CONN_MAX = 2.05  # two, allowing for the few pooled pipes


def best_peer(summary: Summary, floor: Floor) -> tuple[str, float] | None:
    found = [
        (key, summary[key][floor.metric])
        for key in PEERS
        if key in summary and _number(summary[key].get(floor.metric))
    ]
    if not found:
        return None
    pick = max if floor.higher_is_better else min
    return pick(found, key=lambda kv: kv[1])


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def evaluate(summary: Summary, ours: str, hold_count: int) -> list[Result]:
    """Every floor of the issue for `ours`: the figures, the ratio and PASS/MISS."""
    rows = [_ratio_row(summary, ours, floor) for floor in RATIO_FLOORS]
    return rows + _hold_rows(summary.get(ours, {}), hold_count)


def _ratio_row(summary: Summary, ours: str, floor: Floor) -> Result:
    row: Result = {"floor": floor.label, "metric": floor.metric, "ours": None, "best_peer": None,
                   "peer_value": None, "ratio": None, "verdict": "n/a"}  # fmt: skip
    value = summary.get(ours, {}).get(floor.metric)
    best = best_peer(summary, floor)
    if not _number(value) or best is None or best[1] == 0:
        return row
    ratio = value / best[1]
    ok = ratio >= floor.factor if floor.higher_is_better else ratio <= floor.factor
    row.update(ours=value, best_peer=TARGETS[best[0]].name, peer_value=best[1],
               ratio=round(ratio, 2), verdict="PASS" if ok else "MISS")  # fmt: skip
    return row


def _hold_rows(ours: dict[str, Any], hold_count: int) -> list[Result]:
    held, alive = ours.get("held"), ours.get("alive")
    rss, fds = ours.get("rss_kib_per_conn"), ours.get("fds_per_conn")
    if held is None:  # the hold workload did not run
        floors = (
            f"{hold_count:,} concurrent connections held, none lost",
            "two fds per idle connection",
            f"RSS per idle connection ≤ {RSS_PER_CONN_MAX_KIB:g} KiB",
        )
        return [{"floor": floor, "ours": None, "verdict": "n/a"} for floor in floors]
    return [
        {"floor": f"{hold_count:,} concurrent connections held, none lost",
         "ours": f"{_fmt(held)} held, {_fmt(alive)} alive",
         "verdict": _verdict(held == hold_count and alive == held)},
        {"floor": "two fds per idle connection", "ours": fds,
         "verdict": _verdict(_number(fds) and fds <= FDS_PER_CONN_MAX)},
        {"floor": f"RSS per idle connection ≤ {RSS_PER_CONN_MAX_KIB:g} KiB", "ours": rss,
         "verdict": _verdict(_number(rss) and rss <= RSS_PER_CONN_MAX_KIB)},
    ]  # fmt: skip


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- markdown ------------------------------------------------------------------------


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def tables(summary: Summary, order: list[str], settings: dict[str, Any]) -> str:
    """The three result tables (medians over the rounds)."""
    names = {key: TARGETS[key].name for key in order}
    present = [key for key in order if key in summary]
    bulk_rows = [[names[k], *(_fmt(summary[k].get(m), d) for m, d in (
        ("upload_gbit_s", 2), ("download_gbit_s", 2), ("cpu_s_per_gib_up", 2),
        ("cpu_s_per_gib_down", 2), ("cpu_s_per_gib", 2), ("bulk_verified", 0)))]
        for k in present]  # fmt: skip
    rate_rows = [[names[k], *(_fmt(summary[k].get(m), d) for m, d in (
        ("conn_per_s", 0), ("p50_ms", 2), ("p99_ms", 2), ("cpu_s_per_1k_conn", 3),
        ("loadgen_cpus", 2), ("rate_errors", 0), ("rate_verified", 0)))]
        for k in present]  # fmt: skip
    hold_rows = [[names[k], *(_fmt(summary[k].get(m), d) for m, d in (
        ("held", 0), ("alive", 0), ("rss_mib", 1), ("rss_kib_per_conn", 1), ("fds", 0),
        ("fds_per_conn", 2), ("threads", 0), ("cpus_allowed", 0), ("gateway_exit", 0)))]
        for k in present]  # fmt: skip
    gib = settings["bulk_bytes"] / (1 << 30)
    return "\n\n".join([
        f"**1. Bulk throughput** — one connection, {gib:g} GiB each way "
        "(Gbit/s; gateway CPU-s per GiB moved)",
        _table(["target", "upload Gbit/s", "download Gbit/s", "CPU-s/GiB up",
                "CPU-s/GiB down", "CPU-s/GiB", "verified"], bulk_rows),
        f"**2. Connection rate** — {settings['rate_conc']} concurrent clients "
        f"({settings['rate_procs']} load-generator processes) for {settings['rate_seconds']:g} s, "
        "each: connect, PROXY header + 64-byte request, 64-byte reply, close",
        _table(["target", "conn/s", "p50 ms", "p99 ms", "gateway CPU-s per 1,000 conns",
                "load generator CPUs busy", "errors", "verified"], rate_rows),
        f"**3. Concurrency** — {settings['hold_count']:,} idle connections held, then each "
        "pinged (gateway measured while all are held)",
        _table(["target", "held", "alive after", "RSS MiB", "RSS KiB/conn", "fds",
                "fds/conn", "threads", "CPU affinity", "exited by itself"], hold_rows),
        "A gateway that exited under load is measured by its fullest sample (they are taken "
        "every 0.05 s) over the most connections it held at once: approximate.",
    ])  # fmt: skip


def floors_table(by_variant: dict[str, list[Result]]) -> str:
    """One row per floor: the best peer's figure, then each variant's figure, ratio, verdict."""
    variants = list(by_variant)
    header = ["floor", "best peer"]
    for key in variants:
        header += [TARGETS[key].name, "ratio", "verdict"]
    body = []
    for i, first in enumerate(by_variant[variants[0]]):
        peer = first.get("best_peer")
        digits = DIGITS.get(first.get("metric", ""), 2)
        peer_value = _fmt(first.get("peer_value"), digits)
        row = [first["floor"], f"{peer}: {peer_value}" if peer else "-"]
        for key in variants:
            r = by_variant[key][i]
            row += [_fmt(r.get("ours"), digits), _fmt(r.get("ratio")), f"**{r['verdict']}**"]
        body.append(row)
    return _table(header, body)

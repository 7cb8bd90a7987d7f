"""The workloads: bulk throughput, connection rate, concurrency. Each run starts a fresh
backend and a fresh gateway, measures, and stops them."""

from __future__ import annotations

import array
import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import Footprint, footprint
from bench.report import rate_metric
from bench.targets import Gateway, Target, gateway_cpu
from bench.testbed import FAMILIES, IPV4, SOURCES, Family, Testbed
from bench.tools import FAKE_ADDRS, FAKE_PORTS, Backend, Tools

GIB = 1 << 30
Result = dict[str, Any]
# The rate test's variants: PROXY version and address family ("v1-ipv4" ...).
RATE_VARIANTS = ("v1-ipv4", "v2-ipv4", "v1-ipv6", "v2-ipv6")
# fds a process keeps besides its connections (listeners, epoll, pipes, logs): the
# fd-limit hold leaves them free in every process.
FD_RESERVE = 256
# Where the fd-limit hold stops even if the limits allow more (fs.nr_open is often a
# million): the application's table has 65,536 slots, and setup time and memory grow.
HOLD_MAX_CAP = 60_000
MMPROXY_KEYS = ("mmproxy", "mmproxy-pinned")


@dataclass(frozen=True)
class Settings:
    bulk_bytes: int
    rate_seconds: float
    rate_procs: int
    rate_conc: int  # concurrent connections in all, split over rate_procs processes
    hold_count: int
    hold_inflight: int
    proxy: str  # "v1" or "v2": bulk and hold (the rate test runs rate_variants)
    # UDP (bench/udp.py): flows in all, split over udp_procs processes; datagrams
    # outstanding per flow; seconds per payload size.
    udp_seconds: float = 5.0
    udp_procs: int = 2
    udp_flows: int = 32
    udp_window: int = 2
    udp_sizes: tuple[int, ...] = (64, 1400)
    # mmproxy's framings: v2 on every datagram, v2 on the first only (Spectrum), SPP
    udp_framings: tuple[str, ...] = ("v2", "v2first", "spp")
    rate_variants: tuple[str, ...] = RATE_VARIANTS


@dataclass
class Context:
    bed: Testbed
    tools: Tools
    settings: Settings
    workdir: Path
    next_tuple: int = 0  # so that no spoofed 4-tuple is used twice in the whole run
    maxconn: int = field(init=False)

    def __post_init__(self) -> None:
        self.maxconn = max(self.settings.hold_count + 500, 1000)

    def consume_tuples(self, used: int) -> None:
        self.next_tuple = (self.next_tuple + used) % (FAKE_ADDRS * FAKE_PORTS)


@dataclass
class Running:
    backend: Backend
    gateway: Gateway | None
    backend_stats: dict[str, float] = field(default_factory=dict)
    gateway_exit: int | None = None
    gateway_log: str = ""


@contextmanager
def running(
    ctx: Context, target: Target, family: Family = IPV4, config: str = ""
) -> Iterator[Running]:
    """A fresh backend and (unless direct) a fresh gateway, stopped afterwards; the
    gateway listens and connects over `family`."""
    run = Running(Backend(ctx.bed, ctx.tools), None)
    try:
        if target.is_gateway:
            run.gateway = Gateway(ctx.bed, target, ctx.workdir, ctx.maxconn, family=family,
                                  config=config)  # fmt: skip
        yield run
    finally:
        _shut_down(run)


def _shut_down(run: Running) -> None:
    if run.gateway is not None:
        run.gateway_exit = run.gateway.stop()
        if run.gateway_exit is not None:
            run.gateway_log = run.gateway.log_tail()
    run.backend_stats = run.backend.stop()


def _run_info(run: Running) -> Result:
    """What every run records besides its metrics: the backend's counters (its own check
    of the claimed addresses) and the gateway's exit status if it exited by itself."""
    return {
        "backend": run.backend_stats,
        "gateway_exit": run.gateway_exit,
        "gateway_log": run.gateway_log,
    }


def loadgen_argv(
    ctx: Context, target: Target, mode: str, *extra: str, proxy: str = "", family: Family = IPV4
) -> list[str]:
    proxy = (proxy or ctx.settings.proxy) if target.is_gateway else "none"
    return ctx.bed.peer.exec_args(
        str(ctx.tools.loadgen), "--mode", mode, "--target", target.address_in(family),
        "--proxy", proxy, "--tuple-base", str(ctx.next_tuple), *extra,
    )  # fmt: skip


def _run_json(argv: list[str], timeout: float) -> Result:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return _last_json(proc.stdout, proc.returncode, proc.stderr)


def _last_json(out: str, status: int | None, err: str) -> Result:
    """loadgen's result: the JSON object on the last line of its output."""
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"loadgen failed ({status}): {err.strip()}") from exc
    if not isinstance(result, dict):
        raise RuntimeError(f"loadgen printed {result!r}")
    return result


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 3)


def _per(value: float | None, amount: float, digits: int = 3) -> float | None:
    return None if value is None or amount <= 0 else round(value / amount, digits)


# --- 1. bulk throughput --------------------------------------------------------------


def bulk(ctx: Context, target: Target) -> Result:
    result: Result = {}
    with running(ctx, target) as run:
        for direction in ("up", "down"):
            result[direction] = _transfer(ctx, target, run, direction)
    result.update(_run_info(run))
    size_gib = ctx.settings.bulk_bytes / GIB
    up, down = result["up"], result["down"]
    cpu = [d["gateway_cpu_s"] for d in (up, down)]
    result["metrics"] = {
        "upload_gbit_s": up["gbit_s"],
        "download_gbit_s": down["gbit_s"],
        "cpu_s_per_gib": None if None in cpu else _per(sum(cpu), 2 * size_gib),
        "cpu_s_per_gib_up": _per(up["gateway_cpu_s"], size_gib),
        "cpu_s_per_gib_down": _per(down["gateway_cpu_s"], size_gib),
        "bulk_verified": bool(up["verified"] and down["verified"]),
    }
    return result


def _transfer(ctx: Context, target: Target, run: Running, direction: str) -> Result:
    argv = loadgen_argv(ctx, target, direction, "--size", str(ctx.settings.bulk_bytes),
                        "--sources", SOURCES[0])  # fmt: skip
    before = gateway_cpu(run.gateway)
    out = _run_json(argv, timeout=600)
    after = gateway_cpu(run.gateway)
    ctx.consume_tuples(out["tuples"])
    if not out["complete"]:
        raise RuntimeError(f"{direction}load incomplete: {out}")
    return {
        **out,
        "gbit_s": round(out["bytes"] * 8 / out["seconds"] / 1e9, 3),
        "gateway_cpu_s": _cpu_delta(before, after),
    }


# --- 2. connection rate --------------------------------------------------------------


def rate_variants(settings: Settings, target: Target) -> list[tuple[str, str]]:
    """(PROXY version, family) pairs to run: direct sends no header, so one per family."""
    pairs = [v.partition("-")[::2] for v in settings.rate_variants]
    if target.is_gateway:
        return pairs
    return [("none", f) for f in dict.fromkeys(f for _, f in pairs)]


def rate(ctx: Context, target: Target) -> Result:
    """Every variant (PROXY v1/v2 x IPv4/IPv6), each with a fresh backend and gateway."""
    variants: Result = {}
    metrics: Result = {}
    for proxy, family in rate_variants(ctx.settings, target):
        one = _rate_once(ctx, target, proxy, FAMILIES[family])
        variants[f"{proxy}-{family}"] = one
        metrics.update({rate_metric(k, proxy, family): v for k, v in one.pop("metrics").items()})
    exits = [v["gateway_exit"] for v in variants.values() if v["gateway_exit"] is not None]
    return {"variants": variants, "gateway_exit": exits[0] if exits else None,
            "metrics": metrics}  # fmt: skip


def _rate_once(ctx: Context, target: Target, proxy: str, family: Family) -> Result:
    s = ctx.settings
    per_proc = max(1, s.rate_conc // s.rate_procs)
    lat_files = [ctx.workdir / f"lat-{i}.bin" for i in range(s.rate_procs)]
    with running(ctx, target, family) as run:
        before = gateway_cpu(run.gateway)
        procs = [
            _start_rate(ctx, target, i, per_proc, lat_files[i], proxy, family)
            for i in range(s.rate_procs)
        ]
        outs = [_collect(p, s.rate_seconds + 60) for p in procs]
        after = gateway_cpu(run.gateway)
    ctx.consume_tuples(s.rate_procs * max(o["tuples"] for o in outs))
    return _rate_result(outs, _latencies(lat_files), _cpu_delta(before, after), run)


def _start_rate(
    ctx: Context,
    target: Target,
    index: int,
    conc: int,
    lat_file: Path,
    proxy: str = "",
    family: Family = IPV4,
) -> subprocess.Popen[str]:
    s = ctx.settings
    argv = loadgen_argv(
        ctx, target, "rate", "--conc", str(conc), "--duration", str(s.rate_seconds),
        "--sources", ",".join(family.sources), "--tuple-step", str(s.rate_procs),
        "--tuple-index", str(index), "--lat-file", str(lat_file),
        proxy=proxy, family=family,
    )  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen[str], timeout: float) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return _last_json(out, proc.returncode, err or "")


def _latencies(paths: list[Path]) -> array.array[int]:
    samples = array.array("I")
    for path in paths:
        samples.frombytes(path.read_bytes())
        path.unlink()
    return samples


def percentile(sorted_samples: list[int], q: float) -> float:
    if not sorted_samples:
        return float("nan")
    return float(sorted_samples[min(len(sorted_samples) - 1, int(q * len(sorted_samples)))])


def _rate_result(
    outs: list[Result], samples: array.array[int], cpu: float | None, run: Running
) -> Result:
    completed = sum(o["completed"] for o in outs)
    seconds = max(o["seconds"] for o in outs)
    ordered = sorted(samples)
    loadgen_cpu = sum(o["cpu_s"] for o in outs)
    return {
        "loadgen": outs,
        **_run_info(run),
        "gateway_cpu_s": cpu,
        "metrics": {
            "conn_per_s": round(completed / seconds, 1),
            "p50_ms": round(percentile(ordered, 0.50) / 1000, 3),
            "p99_ms": round(percentile(ordered, 0.99) / 1000, 3),
            "cpu_s_per_1k_conn": _per(cpu, completed / 1000),
            "loadgen_cpus": round(loadgen_cpu / seconds, 2),
            "rate_errors": sum(o["errors"] + o["timeouts"] for o in outs),
            "rate_verified": sum(o["verified"] for o in outs) == completed > 0,
        },
    }


# --- 3. concurrency ------------------------------------------------------------------


class Sampler:
    """Samples a gateway's footprint every `interval` s while it lives: if it dies under
    load, the sample with the most fds says roughly what it held."""

    def __init__(self, gateway: Gateway, interval: float = 0.05) -> None:
        self.gateway = gateway
        self.peak: Footprint | None = None  # the sample with the most fds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while self.gateway.alive():
            try:
                sample = footprint(self.gateway.pid)
            except (OSError, KeyError, ValueError):
                return
            if self.peak is None or sample.fds >= self.peak.fds:
                self.peak = sample
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def hold(ctx: Context, target: Target) -> Result:
    return _hold(ctx, target, ctx.settings.hold_count)


def fd_limit_count(target: Target, fd_limit: int, cpus: int) -> int:
    """The most idle connections the fd limit lets this target hold, rounded down to a
    hundred: the application holds one fd per connection and the load generator one,
    each in one process; mmproxy two per connection in each of its workers (one per CPU
    by default, one under taskset -c 1), which share the connections. Each process keeps
    FD_RESERVE fds for the rest; HOLD_MAX_CAP at most."""
    per_process = fd_limit - FD_RESERVE
    count = min(per_process, HOLD_MAX_CAP)  # the application's and the load generator's
    if target.key in MMPROXY_KEYS:
        workers = 1 if target.key == "mmproxy-pinned" else cpus
        count = min(count, workers * (per_process // 2))
    return count // 100 * 100


def hold_max(ctx: Context, target: Target) -> Result:
    """Idle connections at the fd limit: as many as the machine's limits allow, all held,
    then all pinged. mmproxy's max_connections is raised to the count (its default,
    10,000, would stop it first). The peers are one process each with a fixed per-process
    limit (HAProxy two fds per connection, go-mmproxy about five): n/a."""
    if target.is_gateway and target.key not in MMPROXY_KEYS:
        return {"skipped": "one process: its fd limit allows fewer", "metrics": {}}
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    count = fd_limit_count(target, limit, len(os.sched_getaffinity(0)))
    config = f"max_connections: {count}\n" if target.is_gateway else ""
    result = _hold(ctx, target, count, config)
    result["fd_limit"] = limit
    result["metrics"] = {"max_count": count, **{
        f"max_{k}": v for k, v in result["metrics"].items() if k != "gateway_exit"}}  # fmt: skip
    return result


def _hold(ctx: Context, target: Target, count: int, config: str = "") -> Result:
    s = ctx.settings
    argv = loadgen_argv(ctx, target, "hold", "--count", str(count),
                        "--conc", str(s.hold_inflight), "--sources", ",".join(SOURCES))  # fmt: skip
    with running(ctx, target, config=config) as run:
        gw = run.gateway
        base = footprint(gw.pid) if gw else None
        sampler = Sampler(gw) if gw else None
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            held_line = _wait_held(proc)
            time.sleep(0.5)  # let the last hand-shakes settle before measuring
            at, measured_alive = _measure(gw, sampler)
            _say_go(proc)
            out = _collect(proc, 120)
        finally:
            if sampler is not None:
                sampler.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ctx.consume_tuples(out["tuples"])
    return _hold_result(out, held_line, base, at, measured_alive, run)


def _wait_held(proc: subprocess.Popen[str]) -> str:
    """loadgen's "held N failed M" line: every connection is open or has failed."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("held "):
        raise RuntimeError(f"loadgen hold: expected 'held N failed M', got {line!r}")
    return line


def _say_go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _measure(gw: Gateway | None, sampler: Sampler | None) -> tuple[Footprint | None, bool]:
    if gw is None or sampler is None:
        return None, False
    sampler.stop()
    if gw.alive():
        return footprint(gw.pid), True
    return sampler.peak, False


def _hold_result(
    out: Result,
    held_line: str,
    base: Footprint | None,
    at: Footprint | None,
    measured_alive: bool,
    run: Running,
) -> Result:
    held = out["held"] if measured_alive else out["peak_held"]
    metrics: Result = {"held": held, "alive": out["alive"], "lost": held - out["alive"]}
    if base is not None and at is not None and held:
        # Per connection: what the gateway grew by, over what it held when measured (for
        # a gateway that died under load: its fullest sample over the most it ever held).
        n = held
        metrics.update(
            rss_mib=round(at.rss_kib / 1024, 1),
            fds=at.fds,
            threads=at.threads,
            rss_kib_per_conn=_per(at.rss_kib - base.rss_kib, n, 2),
            fds_per_conn=_per(at.fds - base.fds, n, 2),
            cpus_allowed=at.cpus_allowed,
        )
    metrics["gateway_exit"] = run.gateway_exit
    return {
        **_run_info(run),
        "loadgen": out,
        "held_line": held_line,
        "measured_while_alive": measured_alive,
        "baseline": base.as_dict() if base else None,
        "at_peak": at.as_dict() if at else None,
        "metrics": metrics,
    }

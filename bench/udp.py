"""The UDP workload: datagrams through the gateway to a UDP echo, and back.

udpgen (bench/c/udpgen.c, in the client namespace, several processes) plays the balancer:
K flows, each a connected UDP socket claiming its own fake client, each with at most W
datagrams outstanding, for a few seconds per payload size and framing. Framings (FRAMINGS):
PROXY v2 in every datagram (every gateway); and for mmproxy also v2 on the first datagram
of a flow only, alone (Cloudflare Spectrum), and SPP on every datagram and reply.
udpecho (bench/c/udpecho.c, in the gateway namespace) sends every payload back with
a verdict: did it come from the claimed address? It also lists the sources it saw, which
must be exactly the fake clients. Measured: request+reply pairs per second, payload
Mbit/s each way, loss, round-trip p50/p99, and the gateway's CPU-s per million pairs.
HAProxy has no UDP PROXY-protocol gateway: its row says n/a.
"""

from __future__ import annotations

import array
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import wait_listening
from bench.report import _fmt, _table
from bench.report import udp_metric as _metric
from bench.targets import BACKEND, TARGETS, Gateway, Target, _tool, gateway_cpu
from bench.testbed import ALLOWED_NETWORK, BACKEND_PORT, GW4, MARK, Testbed
from bench.tools import Tools, fake_client
from bench.workloads import Context, _collect, _last_json
from mmproxy.proxy_protocol import encode_v2
from mmproxy.spp import build as encode_spp

Result = dict[str, Any]
LAT_BUCKET_US = 1  # udpgen's histogram: one uint32 count per microsecond
NO_UDP = "no UDP PROXY-protocol gateway"
UNSUPPORTED = {"haproxy": NO_UDP}
REFERENCE = "go-mmproxy"  # the ratios in the table are against it
# udpgen's --proxy value -> what the table calls it; "v2" keeps the metric names it had
FRAMINGS = {
    "v2": "PROXY v2 in every datagram",
    "v2first": "PROXY v2 in the first datagram only (Spectrum)",
    "spp": "SPP in every datagram and reply (Spectrum)",
}
ONLY_V2 = ("go-mmproxy",)  # drops datagrams without a header; no SPP


def gateway_command(target: Target, workdir: Path, udp_header: str = "v2") -> list[str]:
    """The gateway's argv for UDP (before `ip netns exec`): the TCP flags plus UDP's."""
    allowed = workdir / "allowed-networks.txt"
    allowed.write_text(ALLOWED_NETWORK + "\n")
    if target.key in ("mmproxy", "mmproxy-pinned"):
        config = workdir / "mmproxy-udp.yaml"  # udp_header has no flag
        config.write_text(f"udp_header: {udp_header}\n")
        return [sys.executable, "-m", "mmproxy", "-c", str(config), "-l",
                f"udp://{target.address}", "-4", BACKEND, "-a", str(allowed),
                "--mark", str(MARK), "-q"]  # fmt: skip
    if target.key == "go-mmproxy":
        # -close-after 60: the idle time of a flow, as mmproxy's udp_idle_timeout default.
        return [_tool("go-mmproxy"), "-p", "udp", "-l", target.address, "-4", BACKEND,
                "-allowed-subnets", str(allowed), "-mark", str(MARK), "-v", "0",
                "-close-after", "60"]  # fmt: skip
    raise ValueError(f"{target.key} cannot relay UDP")


def check_header(tools: Tools, target: tuple[str, int]) -> None:
    """udpgen's PROXY v2 UDP4 and SPP headers must be byte for byte what mmproxy's codecs
    make."""
    for tuple_number in (0, 777, 12345678):
        for framing in ("v2", "spp"):
            made = subprocess.run(
                [str(tools.udpgen), "--header", "--proxy", framing, "--target",
                 f"{target[0]}:{target[1]}", "--tuple-base", str(tuple_number)],
                capture_output=True, check=True,
            ).stdout  # fmt: skip
            client = fake_client(tuple_number)
            if framing == "spp":
                expected = encode_spp(client, target)
            else:
                expected = encode_v2("PROXY", "UDP4", client, target)
            if made != expected:
                raise RuntimeError(f"udpgen's {framing} header {made!r} != {expected!r}")


# --- the processes -------------------------------------------------------------------


class UdpBackend:
    """udpecho on port 9000/udp in the gateway namespace: on 127.0.0.1 behind a gateway,
    on 198.51.100.1 for the direct client. Not on 0.0.0.0: a reply from an unbound source
    address would not match mmproxy's `from 127.0.0.1/8 iif lo` rule, and go nowhere."""

    def __init__(self, bed: Testbed, tools: Tools, host: str, seen_file: Path) -> None:
        self.seen_file = seen_file
        argv = bed.gw.exec_args(str(tools.udpecho), f"{host}:{BACKEND_PORT}", str(seen_file))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            wait_listening(self.proc.pid, BACKEND_PORT, self.alive, protocol="udp")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[Result, set[str]]:
        """Stop it: its counters, and the source addresses ("IP:PORT") it saw."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        stats = _last_json(out, self.proc.returncode, "udpecho printed nothing")
        seen = set(self.seen_file.read_text().split()) if self.seen_file.exists() else set()
        return stats, seen


@dataclass
class UdpRun:
    backend: UdpBackend
    gateway: Gateway | None = None
    backend_stats: Result = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    gateway_exit: int | None = None
    gateway_log: str = ""


@contextmanager
def running(ctx: Context, target: Target, udp_header: str = "v2") -> Iterator[UdpRun]:
    """A fresh udpecho and (unless direct) a fresh gateway listening on UDP."""
    host = BACKEND.rsplit(":", 1)[0] if target.is_gateway else GW4
    run = UdpRun(UdpBackend(ctx.bed, ctx.tools, host, ctx.workdir / "udp-seen.txt"))
    try:
        if target.is_gateway:
            command = gateway_command(target, ctx.workdir, udp_header)
            run.gateway = Gateway(ctx.bed, target, ctx.workdir, ctx.maxconn, command, "udp")
        yield run
    finally:
        if run.gateway is not None:
            run.gateway_exit = run.gateway.stop()
            if run.gateway_exit is not None:
                run.gateway_log = run.gateway.log_tail()
        run.backend_stats, run.seen = run.backend.stop()


# --- the workload --------------------------------------------------------------------


def workload(ctx: Context, target: Target) -> Result:
    if target.key in UNSUPPORTED:
        return {"skipped": UNSUPPORTED[target.key], "metrics": {}}
    framings = _framings(ctx, target)
    phases: dict[str, Result] = {}
    metrics: Result = {}
    verified, backends, exits, logs = True, [], [], []
    # One gateway for the v2 framings (the same udp_header), another for SPP.
    for group in ([f for f in framings if f != "spp"], [f for f in framings if f == "spp"]):
        if not group:
            continue
        expected: set[str] = set()
        done: dict[str, Result] = {}
        with running(ctx, target, "spp" if group == ["spp"] else "v2") as run:
            for framing in group:
                for size in ctx.settings.udp_sizes:
                    phase = _phase(ctx, target, run, size, expected, framing)
                    done[f"{framing}/{size}"] = phase
                    metrics.update(
                        {_metric(k, framing, size): v for k, v in phase["metrics"].items()}
                    )
        flows = sum(p["flows"] for p in done.values())
        verified &= _verified(done, run, expected, flows, target.is_gateway)
        phases.update(done)
        backends.append({**run.backend_stats, "sources": len(run.seen)})
        exits.append(run.gateway_exit)
        logs.append(run.gateway_log)
    metrics["udp_verified"] = verified
    return {
        "phases": phases,
        "backend": backends,
        "gateway_exit": next((e for e in exits if e is not None), None),
        "gateway_log": "\n".join(log for log in logs if log),
        "metrics": metrics,
    }


def _framings(ctx: Context, target: Target) -> list[str]:
    """What udpgen sends to this target: no header direct, v2 only to go-mmproxy."""
    if not target.is_gateway:
        return ["none"]
    wanted = list(ctx.settings.udp_framings)
    return [f for f in wanted if f == "v2"] if target.key in ONLY_V2 else wanted


def _phase(
    ctx: Context, target: Target, run: UdpRun, size: int, expected: set[str], framing: str
) -> Result:
    """One payload size and framing for udp_seconds: every udpgen process at once."""
    s = ctx.settings
    per_proc = max(1, s.udp_flows // s.udp_procs)
    lat_files = [ctx.workdir / f"udp-lat-{i}.bin" for i in range(s.udp_procs)]
    before = gateway_cpu(run.gateway)
    procs = [
        _start(ctx, target, size, i, per_proc, lat_files[i], framing) for i in range(s.udp_procs)
    ]
    outs = [_collect(p, s.udp_seconds + 30) for p in procs]
    after = gateway_cpu(run.gateway)
    used = s.udp_procs * per_proc
    expected |= {_endpoint(fake_client(ctx.next_tuple + n)) for n in range(used)}
    ctx.consume_tuples(used)
    cpu = None if before is None or after is None else round(after - before, 3)
    return _phase_result(outs, _histogram(lat_files), cpu, size)


def _start(
    ctx: Context,
    target: Target,
    size: int,
    index: int,
    flows: int,
    lat_file: Path,
    framing: str,
) -> subprocess.Popen[str]:
    s = ctx.settings
    argv = ctx.bed.peer.exec_args(
        str(ctx.tools.udpgen), "--target", target.address, "--proxy", framing,
        "--flows", str(flows), "--window", str(s.udp_window), "--size", str(size),
        "--duration", str(s.udp_seconds), "--tuple-base", str(ctx.next_tuple),
        "--tuple-step", str(s.udp_procs), "--tuple-index", str(index),
        "--lat-file", str(lat_file),
    )  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _endpoint(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _histogram(paths: list[Path]) -> list[int]:
    """The round-trip histograms of all processes, added up."""
    total: list[int] = []
    for path in paths:
        counts = array.array("I")
        counts.frombytes(path.read_bytes())
        path.unlink()
        if not total:
            total = [0] * len(counts)
        total = [a + b for a, b in zip(total, counts, strict=True)]
    return total


def histogram_percentile(counts: list[int], q: float) -> float | None:
    """The q-quantile in ms (the sample at index int(q * n), as bench.workloads)."""
    n = sum(counts)
    if n == 0:
        return None
    rank, seen = min(n - 1, int(q * n)), 0
    for bucket, count in enumerate(counts):
        seen += count
        if seen > rank:
            return bucket * LAT_BUCKET_US / 1000
    return None


def _phase_result(outs: list[Result], hist: list[int], cpu: float | None, size: int) -> Result:
    seconds = max(o["seconds"] for o in outs)
    in_time = sum(o["replies_in_time"] for o in outs)
    replies, sent = sum(o["replies"] for o in outs), sum(o["sent"] for o in outs)
    pps = in_time / seconds
    p50, p99 = histogram_percentile(hist, 0.50), histogram_percentile(hist, 0.99)
    return {
        "loadgen": outs,
        "flows": sum(o["flows"] for o in outs),
        "gateway_cpu_s": cpu,
        "replies": replies,
        "verified": sum(o["verified"] for o in outs),
        "port_match": sum(o["port_match"] for o in outs),
        "errors": sum(o["errors"] + o["bad_reply"] for o in outs),
        "metrics": {
            "udp_pps": round(pps),
            "udp_mbit_s": round(pps * size * 8 / 1e6, 1),
            "udp_loss_pct": round(100 * sum(o["lost"] for o in outs) / sent, 3) if sent else None,
            "udp_p50_ms": None if p50 is None else round(p50, 3),
            "udp_p99_ms": None if p99 is None else round(p99, 3),
            "udp_cpu_s_per_mpkt": None if cpu is None or not replies else round(
                cpu / (replies / 1e6), 2),
            "udp_loadgen_cpus": round(sum(o["cpu_s"] for o in outs) / seconds, 2),
        },
    }  # fmt: skip


def _verified(
    phases: dict[str, Result], run: UdpRun, expected: set[str], flows: int, gateway: bool
) -> bool:
    """Every reply says the application saw the claimed address and port; the application
    judged no datagram from a wrong address; through a gateway, the sources it saw are
    exactly the fake clients of the headers (direct: one source per flow)."""
    replies_ok = all(
        p["replies"] > 0 and p["verified"] == p["port_match"] == p["replies"]
        for p in phases.values()
    )
    stats = run.backend_stats
    judged_ok = stats.get("verified_bad", 1) == 0 and stats.get("verified_address_only", 1) == 0
    sources_ok = run.seen == expected if gateway else len(run.seen) == flows
    return replies_ok and judged_ok and sources_ok


# --- the table -----------------------------------------------------------------------


def table(summary: dict[str, dict[str, Any]], order: list[str], settings: dict[str, Any]) -> str:
    """The UDP section of the results (medians over the rounds); "" when it did not run."""
    sizes = settings.get("udp_sizes") or []
    keys = [k for k in order if any(f"udp_pps_{n}" in summary.get(k, {}) for n in sizes)]
    if not keys:
        return ""
    keys += [k for k in order if k in UNSUPPORTED and k not in keys]
    framings = settings.get("udp_framings") or ["v2"]
    rows = [
        _row(summary, key, size, framing)
        for size in sizes
        for framing in framings
        for key in keys
        # direct (no header) beside every framing, as the path without a gateway
        if framing == "v2"
        or key == "direct"
        or _metric("udp_pps", framing, size) in summary.get(key, {})
    ]
    flows, window = settings["udp_flows"], settings["udp_window"]
    shown = "; ".join(f"{name}: {FRAMINGS[name]}" for name in framings if name in FRAMINGS)
    return "\n\n".join([
        f"**4. UDP** — {flows} flows (fake clients) from "
        f"{settings['udp_procs']} load-generator processes, at most {window} datagrams "
        f"outstanding per flow, {settings['udp_seconds']:g} s per payload size and framing "
        f"({shown}; {REFERENCE} does v2 only, direct has no header); a UDP echo "
        "behind the gateway. Packets/s are request+reply pairs (two datagrams through the "
        "gateway each); Mbit/s is payload each way; CPU-s per 1M packets is the gateway's "
        f"own CPU per million pairs; ÷ {REFERENCE}: the same figure over {REFERENCE}'s "
        "(with v2 in every datagram)",
        _table(["target", "framing", "payload B", "packets/s", "Mbit/s each way", "loss %",
                "p50 ms", "p99 ms", "CPU-s per 1M packets", f"packets/s ÷ {REFERENCE}",
                f"CPU ÷ {REFERENCE}", "load generator CPUs busy", "verified"], rows),
    ])  # fmt: skip


def _row(summary: dict[str, dict[str, Any]], key: str, size: int, framing: str) -> list[str]:
    name = TARGETS[key].name
    if key in UNSUPPORTED:
        return [name, "-", str(size), f"n/a ({UNSUPPORTED[key]})", *["-"] * 9]
    got = summary.get(key, {})
    ref = summary.get(REFERENCE, {})
    shown = "none" if key == "direct" else framing

    def metric(name: str) -> Any:
        return got.get(_metric(name, shown, size))

    def ratio(name: str) -> str:
        return _ratio(metric(name), ref.get(_metric(name, "v2", size)))

    return [
        name,
        shown,
        str(size),
        _fmt(metric("udp_pps"), 0),
        _fmt(metric("udp_mbit_s"), 1),
        _fmt(metric("udp_loss_pct"), 3),
        _fmt(metric("udp_p50_ms"), 3),
        _fmt(metric("udp_p99_ms"), 3),
        _fmt(metric("udp_cpu_s_per_mpkt"), 2),
        ratio("udp_pps"),
        ratio("udp_cpu_s_per_mpkt"),
        _fmt(metric("udp_loadgen_cpus"), 2),
        _fmt(got.get("udp_verified"), 0),
    ]


def _ratio(ours: object, theirs: object) -> str:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"

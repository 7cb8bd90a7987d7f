"""Prometheus metrics in the text exposition format, written by hand.

Written here rather than with python3-prometheus-client: the numbers already exist as
plain snapshots that the supervisor adds up across worker processes, so one scrape of
the supervisor sees the instance. The client library would count again in its own
registry, and across processes it needs its multiprocess mode (a directory of mmap files
shared by the workers, cleaned at each start), a dependency and a writable path the
unit's sandbox does not otherwise need, for output this module writes in 100 lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mmproxy import __version__
from mmproxy.stats import Snapshot, TcpSnapshot, UdpSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# platform.python_version(), without importing platform at every start-up
_PYTHON = sys.version.split()[0]

Labels = Mapping[str, str]


@dataclass(frozen=True)
class State:
    """What the metrics say besides the counters: the runner's side."""

    draining: bool = False
    workers: int = 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: Labels, value: int) -> str:
    if not labels:
        return f"{name} {value}"
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self, name: str, kind: str, help: str, samples: Iterable[tuple[Labels, int]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(_sample(name, labels, value) for labels, value in samples)

    def one(self, name: str, kind: str, help: str, value: int) -> None:
        self.metric(name, kind, help, [({}, value)])

    def by(self, name: str, label: str, help: str, counts: Mapping[str, int]) -> None:
        """A counter by one label, in the label's order (a stable output)."""
        self.metric(name, "counter", help, (({label: k}, v) for k, v in sorted(counts.items())))


def render(snapshot: Snapshot, state: State) -> str:
    """The whole /metrics page."""
    out = _Writer()
    build = {"version": __version__, "python": _PYTHON}
    out.metric("mmproxy_build_info", "gauge", "mmproxy's version, always 1", [(build, 1)])
    out.one("mmproxy_draining", "gauge", "1 while stopping and draining connections",
            int(state.draining))  # fmt: skip
    out.one("mmproxy_workers", "gauge", "worker processes configured", state.workers)
    if snapshot.tcp is not None:
        _tcp(out, snapshot.tcp)
    if snapshot.udp is not None:
        _udp(out, snapshot.udp)
    return "\n".join(out.lines) + "\n"


def _tcp(out: _Writer, tcp: TcpSnapshot) -> None:
    out.one(
        "mmproxy_connections_accepted_total",
        "counter",
        "TCP connections accepted from balancers (trusted or not)",
        tcp.accepted,
    )
    out.one(
        "mmproxy_connections_active",
        "gauge",
        "TCP connections open now (being hand-shaken or relayed)",
        tcp.active,
    )
    out.by(
        "mmproxy_connections_closed_total",
        "reason",
        "relayed TCP connections that ended, by why",
        tcp.closed,
    )
    out.by(
        "mmproxy_connections_rejected_total",
        "reason",
        "TCP connections closed before relaying, by the journal's CLOSE_REASON",
        tcp.rejected,
    )
    out.metric(
        "mmproxy_proxy_headers_total",
        "counter",
        "PROXY headers read, by version and command",
        (({"version": str(v), "command": c}, n) for (v, c), n in sorted(tcp.headers.items())),
    )
    out.by(
        "mmproxy_target_connect_errors_total",
        "errno",
        "failed connects to the target, by errno",
        tcp.connect_errors,
    )
    out.metric(
        "mmproxy_tcp_bytes_total",
        "counter",
        "bytes relayed over TCP: in is client to application, out the reverse "
        "(counted when a connection ends)",
        [({"direction": "in"}, tcp.bytes_in), ({"direction": "out"}, tcp.bytes_out)],
    )
    out.by("mmproxy_internal_errors_total", "where",
           "exceptions the loops caught and carried on from", tcp.errors)  # fmt: skip


def _udp(out: _Writer, udp: UdpSnapshot) -> None:
    f = {"framing": udp.framing}
    out.metric("mmproxy_udp_flows_active", "gauge", "UDP flows open now", [(f, udp.flows)])
    out.metric("mmproxy_udp_flows_opened_total", "counter", "UDP flows opened", [(f, udp.total)])
    out.metric(
        "mmproxy_udp_flows_closed_total",
        "counter",
        "UDP flows closed (idle, evicted or stopped)",
        [(f, udp.total - udp.flows)],
    )
    out.metric(
        "mmproxy_udp_flows_evicted_total",
        "counter",
        "UDP flows closed to make room for a new one",
        [(f, udp.evicted)],
    )
    out.metric(
        "mmproxy_udp_datagrams_total",
        "counter",
        "datagrams relayed: in is balancer to application, out the reverse",
        [({**f, "direction": "in"}, udp.packets_in), ({**f, "direction": "out"}, udp.packets_out)],
    )
    out.metric(
        "mmproxy_udp_bytes_total",
        "counter",
        "UDP payload bytes relayed (headers not counted)",
        [({**f, "direction": "in"}, udp.bytes_in), ({**f, "direction": "out"}, udp.bytes_out)],
    )
    out.metric("mmproxy_udp_dropped_total", "counter", "datagrams dropped, by reason",
               (({**f, "reason": r}, n) for r, n in sorted(udp.dropped.items())))  # fmt: skip

"""Counters: TCP connections and UDP flows, live and as plain snapshots.

A forwarder changes its live counters from its own thread. A worker process sends them
to the supervisor as a `Snapshot` (plain data, picklable), and `Totals` adds the
snapshots of every worker up, TCP and UDP alike, for systemd's STATUS line.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

Counts = dict[str, int]
S = TypeVar("S", "TcpSnapshot", "UdpSnapshot")


def _join(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


@dataclass
class TcpStats:
    """Only the forwarder's relay thread changes these, so they need no lock (reading an
    int is atomic under the GIL; a status line may be a connection out of step)."""

    active: int = 0
    total: int = 0
    bytes_in: int = 0  # client -> application
    bytes_out: int = 0  # application -> client
    rejected: Counter[str] = field(default_factory=Counter)
    # Exceptions the relay loop (or the accept loop) caught and carried on from, by where.
    errors: Counter[str] = field(default_factory=Counter)
    accepted: int = 0  # every accepted socket, trusted or not
    headers: Counter[tuple[int, str]] = field(default_factory=Counter)  # (version, command)
    connect_errors: Counter[str] = field(default_factory=Counter)  # by errno name
    closed: Counter[str] = field(default_factory=Counter)  # relayed ones, by close_label()

    def snapshot(self) -> TcpSnapshot:
        return _snapshot(self, TcpSnapshot)

    def add(self, other: TcpSnapshot) -> None:
        _add(self, other)

    def summary(self) -> str:
        line = (
            f"{self.active} active, {self.total} total, "
            f"rejected: {_join(self.rejected) or 'none'}, "
            f"{self.bytes_in} bytes in, {self.bytes_out} bytes out"
        )
        if self.errors:  # only a bug or a broken listener makes any
            line += ", internal errors: " + _join(self.errors)
        return line


@dataclass(frozen=True)
class TcpSnapshot:
    active: int = 0
    total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: Counts = field(default_factory=dict)
    errors: Counts = field(default_factory=dict)
    accepted: int = 0
    headers: dict[tuple[int, str], int] = field(default_factory=dict)
    connect_errors: Counts = field(default_factory=dict)
    closed: Counts = field(default_factory=dict)


@dataclass
class UdpStats:
    """Changed by the UDP forwarder's thread and read by the status reporter's: the
    Counter of drop reasons is changed and copied under a lock."""

    flows: int = 0
    total: int = 0
    packets_in: int = 0  # balancer -> application
    packets_out: int = 0  # application -> balancer
    bytes_in: int = 0  # payload only, headers not counted
    bytes_out: int = 0
    evicted: int = 0  # flows closed to make room for a new one
    dropped: Counter[str] = field(default_factory=Counter)
    framing: str = "v2"  # udp_header: "v2" or "spp"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The C relay's own (packets_in, bytes_in, packets_out, bytes_out), read when asked:
    # the four counters above are then those of the Python path only.
    native: Callable[[], tuple[int, int, int, int]] | None = field(default=None, repr=False)

    def drop(self, reason: str) -> None:
        with self.lock:
            self.dropped[reason] += 1

    def snapshot(self) -> UdpSnapshot:
        with self.lock:
            snapshot = _snapshot(self, UdpSnapshot)
        if self.native is None:
            return snapshot
        packets_in, bytes_in, packets_out, bytes_out = self.native()
        return replace(
            snapshot,
            packets_in=snapshot.packets_in + packets_in,
            bytes_in=snapshot.bytes_in + bytes_in,
            packets_out=snapshot.packets_out + packets_out,
            bytes_out=snapshot.bytes_out + bytes_out,
        )

    def add(self, other: UdpSnapshot) -> None:
        with self.lock:
            _add(self, other)  # the framing is the last one's: one process serves UDP

    def summary(self) -> str:
        now = self.snapshot()
        dropped = _join(Counter(now.dropped)) or "none"
        return (
            f"udp: {now.flows} flows, {now.total} total, dropped: {dropped}, "
            f"{now.packets_in} packets ({now.bytes_in} bytes) in, "
            f"{now.packets_out} packets ({now.bytes_out} bytes) out, "
            f"{now.evicted} flows evicted"
        )


@dataclass(frozen=True)
class UdpSnapshot:
    flows: int = 0
    total: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evicted: int = 0
    dropped: Counts = field(default_factory=dict)
    framing: str = "v2"


def _snapshot(stats: object, kind: type[S]) -> S:
    """The snapshot type's fields, read from the live counters (a Counter becomes a dict:
    one C-level copy, atomic under the GIL)."""
    values: dict[str, Any] = {}
    for f in fields(kind):
        value = getattr(stats, f.name)
        values[f.name] = dict(value) if isinstance(value, Counter) else value
    return kind(**values)


def _add(stats: object, snapshot: TcpSnapshot | UdpSnapshot) -> None:
    """Add a snapshot to live counters: numbers add up, Counters merge, others are taken."""
    for f in fields(snapshot):
        value, mine = getattr(snapshot, f.name), getattr(stats, f.name)
        if isinstance(mine, Counter):
            mine.update(value)
        elif isinstance(mine, int) and not isinstance(mine, bool):
            setattr(stats, f.name, mine + value)
        else:
            setattr(stats, f.name, value)


@dataclass(frozen=True)
class Snapshot:
    """One instance's counters: None for a transport it does not serve."""

    tcp: TcpSnapshot | None = None
    udp: UdpSnapshot | None = None

    def ended(self) -> Snapshot:
        """What stays of it once its process is gone: totals, nothing open."""
        return Snapshot(
            None if self.tcp is None else replace(self.tcp, active=0),
            None if self.udp is None else replace(self.udp, flows=0),
        )


class Totals:
    """The sum of several instances' snapshots (one per worker process)."""

    def __init__(self) -> None:
        self.tcp: TcpStats | None = None
        self.udp: UdpStats | None = None

    def add(self, snapshot: Snapshot) -> None:
        if snapshot.tcp is not None:
            self.tcp = self.tcp or TcpStats()
            self.tcp.add(snapshot.tcp)
        if snapshot.udp is not None:
            self.udp = self.udp or UdpStats()
            self.udp.add(snapshot.udp)

    def merge(self, other: Totals) -> None:
        self.add(other.snapshot())

    def snapshot(self) -> Snapshot:
        return Snapshot(
            None if self.tcp is None else self.tcp.snapshot(),
            None if self.udp is None else self.udp.snapshot(),
        )

    def summary(self) -> str:
        """systemd's STATUS line: TCP's counters, then UDP's, for what is served."""
        parts = [s.summary() for s in (self.tcp, self.udp) if s is not None]
        return "; ".join(parts) or TcpStats().summary()


def total(*snapshots: Snapshot) -> Totals:
    totals = Totals()
    for snapshot in snapshots:
        totals.add(snapshot)
    return totals


# --- what `mmproxy status` shows besides the counters ----------------------------------

# A relayed connection's close reason (the relay's words) as a metric label: the first
# words that say who and why; the details (an errno's text, a timeout) stay in the log.
_CLOSE_LABELS = (
    ("client closed first", "client-closed"),
    ("target closed first", "target-closed"),
    ("client reset", "client-reset"),
    ("target reset", "target-reset"),
    ("client timed out", "client-keepalive"),
    ("target timed out", "target-keepalive"),
    ("read from", "read-error"),
    ("write to", "write-error"),
    ("client closed while", "write-error"),
    ("target closed while", "write-error"),
    ("idle for", "idle-timeout"),
    ("half-closed", "half-close-timeout"),
    ("mmproxy is stopping", "drain-timeout"),
    ("relay error", "relay-error"),
)
_close_labels: dict[str, str] = {}  # reason -> label, filled as reasons are met


def close_label(reason: str) -> str:
    label = _close_labels.get(reason)
    if label is None:
        label = next((lb for start, lb in _CLOSE_LABELS if reason.startswith(start)), "other")
        if len(_close_labels) < 1000:  # the reasons are few; a bound all the same
            _close_labels[reason] = label
    return label


@dataclass(frozen=True)
class OpenConnection:
    """An established connection as `mmproxy status` lists it."""

    client: str  # the source the application sees
    balancer: str
    target: str
    bytes_in: int
    bytes_out: int
    started: float  # time.monotonic(): one clock for every process of the host


@dataclass(frozen=True)
class Rejection:
    at: float  # time.time()
    balancer: str
    client: str  # "" when the header named none (or was not read)
    reason: str
    detail: str


@dataclass(frozen=True)
class Details:
    """One instance's open connections (the oldest, at most a bound) and last rejections."""

    connections: tuple[OpenConnection, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    more: int = 0  # open connections left out of the list


def join_details(parts: list[Details], limit: int) -> Details:
    """Several workers' details as one: the oldest connections, the latest rejections."""
    conns = sorted((c for p in parts for c in p.connections), key=lambda c: c.started)
    rejections = sorted((r for p in parts for r in p.rejections), key=lambda r: r.at)
    more = sum(p.more for p in parts) + max(0, len(conns) - limit)
    return Details(tuple(conns[:limit]), tuple(rejections[-limit:]), more)

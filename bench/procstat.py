"""What /proc says about a process: CPU seconds, memory, threads, fds, affinity."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"  # TCP_CLOSE: a bound, unconnected UDP socket (a server's)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14 to 17.
        return f.read().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a gateway may fork worker processes)."""
    found = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                children = f.read().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole gateway: the process (threads that ended included),
    its live child processes, and the children it has reaped (cutime + cstime)."""
    fields = _stat_fields(pid)
    ticks = sum(int(v) for v in fields[11:15])
    for child in process_tree(pid)[1:]:
        try:
            child_fields = _stat_fields(child)
        except OSError:
            continue  # ended meanwhile: its time is in its parent's cutime once reaped
        ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / CLK_TCK


@dataclass(frozen=True)
class Footprint:
    rss_kib: int
    threads: int
    fds: int
    cpus_allowed: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _status(pid: int) -> dict[str, str]:
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return status


def footprint(pid: int) -> Footprint:
    """RSS, threads and fds of the process and its child processes added up (shared
    pages counted in each: per-connection figures are growths, which this does not
    inflate); the CPU affinity is the process's own."""
    rss = threads = fds = 0
    cpus = ""
    for member in process_tree(pid):
        try:
            status = _status(member)
            member_fds = len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            if member == pid:
                raise
            continue  # a child that ended meanwhile
        rss += int(status["VmRSS"].split()[0])
        threads += int(status["Threads"])
        fds += member_fds
        cpus = cpus or status["Cpus_allowed_list"]
    return Footprint(rss_kib=rss, threads=threads, fds=fds, cpus_allowed=cpus)


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
        return f.read().strip()


def is_listening(pid: int, port: int, protocol: str = "tcp") -> bool:
    """A TCP socket LISTENs on `port` in the network namespace of `pid` (protocol "udp":
    an unconnected UDP socket is bound to it)."""
    state = UDP_UNCONNECTED if protocol == "udp" else TCP_LISTEN
    for table in (protocol, f"{protocol}6"):  # IPv4's sockets, then IPv6's
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == state and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def wait_listening(
    pid: int, port: int, alive: Callable[[], bool], timeout: float = 15.0, protocol: str = "tcp"
) -> None:
    """Wait until something listens on `port`; `alive()` False means the process died."""
    deadline = time.monotonic() + timeout
    while not is_listening(pid, port, protocol):
        if not alive():
            raise RuntimeError(f"process {pid} exited before listening on port {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")
        time.sleep(0.02)

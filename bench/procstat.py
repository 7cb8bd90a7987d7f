"""What /proc says about a process: CPU seconds, memory, threads, fds, affinity."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"  # TCP_CLOSE: a bound, unconnected UDP socket (a server's)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (threads that ended included)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(frozen=True)
class Footprint:
    rss_kib: int
    threads: int
    fds: int
    cpus_allowed: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def footprint(pid: int) -> Footprint:
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return Footprint(
        rss_kib=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpus_allowed=status["Cpus_allowed_list"],
    )


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
        return f.read().strip()


def is_listening(pid: int, port: int, protocol: str = "tcp") -> bool:
    """A TCP socket LISTENs on `port` in the network namespace of `pid` (protocol "udp":
    an unconnected UDP socket is bound to it)."""
    state = UDP_UNCONNECTED if protocol == "udp" else TCP_LISTEN
    try:
        with open(f"/proc/{pid}/net/{protocol}", encoding="ascii") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == state and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    return True
    except OSError:
        return False
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

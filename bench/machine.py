"""What the figures were taken on."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import mmproxy

REPO = Path(__file__).resolve().parent.parent


def describe() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "fd_limits": fd_limits(),
        "python": platform.python_version(),
        "mmproxy": mmproxy.__version__,
        "mmproxy_revision": _revision(),
        "haproxy": _package_version("haproxy"),
        "go-mmproxy": _package_version("go-mmproxy"),
        "harness_cpu_affinity": _cpu_list(os.sched_getaffinity(0)),
    }


def raise_fd_limit() -> int:
    """Lift this process's open-file limit (which every tool it starts inherits) as far as
    the machine allows: to fs.nr_open if the hard limit may be raised, else soft to hard.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        ceiling = hard
    for wanted in (max(ceiling, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            continue  # raising the hard limit needs CAP_SYS_RESOURCE
    return soft


def fd_limits() -> dict[str, int]:
    """The limits that bound how many connections a process can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = {"nofile_soft": soft, "nofile_hard": hard}
    for key in ("nr_open", "file-max"):
        try:
            out[key.replace("-", "_")] = int(Path(f"/proc/sys/fs/{key}").read_text().split()[0])
        except (OSError, ValueError):
            pass
    return out


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews a run."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _revision() -> str:
    """The checkout's commit, and whether mmproxy/ had uncommitted changes."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "mmproxy")
    if not head:
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


class ForeignCpu:
    """How much CPU the rest of the machine used while the benchmark ran: the machine's
    busy time minus this process's and its children's (gateways, load generators,
    application). Interrupt time not charged to any process counts as foreign too, so it
    is an upper bound; more than a few tenths of a CPU means someone else skewed the run."""

    def __init__(self) -> None:
        self._start = (time.monotonic(), _machine_busy(), _ours())

    def cpus(self) -> float:
        wall, busy, ours = self._start
        elapsed = time.monotonic() - wall
        foreign = (_machine_busy() - busy) - (_ours() - ours)
        return round(max(foreign, 0.0) / elapsed, 2) if elapsed > 0 else 0.0


def _machine_busy() -> float:
    with open("/proc/stat", encoding="ascii") as f:
        # user nice system idle iowait irq softirq: all but idle and iowait
        ticks = [int(x) for x in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _ours() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _memory_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        kib = int(f.readline().split()[1])
    return round(kib / (1 << 20), 1)


def _package_version(name: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return proc.stdout.strip() or "not installed"


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))

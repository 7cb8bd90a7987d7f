"""Worker processes (`workers: N`): every one accepts on the shared sockets, their
counters add up, SIGTERM drains them all, and one that is killed is replaced."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mmproxy.proxy_protocol import encode_v1

from .conftest import CLIENT4, Mmproxy, Net, StartMmproxy, start_backend


def workers_of(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def wait_for_workers(proc: Mmproxy, count: int, timeout: float = 10.0) -> list[int]:
    proc.wait_for(f"{count} worker processes accept")  # every one is ready
    pid = proc.proc.pid
    deadline = time.monotonic() + timeout
    while len(found := workers_of(pid)) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == count, found
    return found


def ask(net: Net, port: int) -> bytes:
    """One client through mmproxy: the application's first line, then an echo."""
    with net.gw.connect(("127.0.0.1", 2222), timeout=10) as sock:
        sock.sendall(encode_v1("TCP4", (CLIENT4, port), ("198.51.100.1", 2222)))
        reader = sock.makefile("rb")
        line = reader.readline()
        sock.sendall(b"ping")
        assert reader.read(4) == b"ping"
        # Ended on both sides before the next step: the counters are then final.
        sock.shutdown(socket.SHUT_WR)
        assert reader.read() == b""
        return line


def all_stopped(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    # The state follows the command name, which is in parentheses.
    return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks)


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a worker: meanwhile only the others can accept. Once every thread has
    stopped: a relay thread still in epoll_wait would take the next client's wake-up
    (EPOLLEXCLUSIVE wakes one waiter) and then stop with it unaccepted."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not all_stopped(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_every_worker_accepts_and_the_counters_add_up(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, workers=2)
    first, second = wait_for_workers(proc, 2)
    port = 41000
    for quiet in (first, second):  # each in turn: the other alone can accept
        with stopped(quiet):
            for _ in range(5):
                port += 1
                assert ask(lo_net, port) == f"{CLIENT4} {port}\n".encode()
    proc.proc.send_signal(signal.SIGTERM)
    line = proc.wait_for("stopping: ")
    assert re.search(r"stopping: 0 active, 10 total, rejected: none, 40 bytes in", line), line
    assert proc.proc.wait(10) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in (first, second))


def test_sigterm_drains_the_connections_of_every_worker(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, workers=2, drain_timeout=20)
    held = []
    for worker, port in zip(wait_for_workers(proc, 2), (42001, 42002), strict=True):
        # One connection held by each worker: the other is stopped while it connects.
        others = [w for w in workers_of(proc.proc.pid) if w != worker]
        with stopped(others[0]):
            sock = lo_net.gw.connect(("127.0.0.1", 2222), timeout=10)
            sock.sendall(encode_v1("TCP4", (CLIENT4, port), ("198.51.100.1", 2222)))
            reader = sock.makefile("rb")
            assert reader.readline() == f"{CLIENT4} {port}\n".encode()
        held.append((sock, reader))
    proc.proc.send_signal(signal.SIGTERM)
    line = proc.wait_for("stopping: ")
    assert "2 active" in line, line
    time.sleep(0.3)
    for sock, reader in held:  # both keep working during the drain
        sock.sendall(b"still here")
        assert reader.read(10) == b"still here"
    assert proc.proc.poll() is None
    for sock, reader in held:
        sock.shutdown(socket.SHUT_WR)
        assert reader.read() == b""
        sock.close()
    assert proc.proc.wait(10) == 0, "\n".join(proc.lines)  # as soon as both ended, not 20 s


def test_a_killed_worker_is_replaced(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, workers=2)
    first, second = wait_for_workers(proc, 2)
    os.kill(first, signal.SIGKILL)
    proc.wait_for(rf"worker \d \(pid {first}\) was killed by signal SIGKILL.*starting a new one")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = workers_of(proc.proc.pid)
        if len(now) == 2 and first not in now:
            break
        time.sleep(0.05)
    replacement = next(pid for pid in now if pid != second)
    assert first not in now and second in now
    with stopped(second):  # the new worker accepts
        assert ask(lo_net, 43001) == f"{CLIENT4} 43001\n".encode()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(10) == 0
    assert not Path(f"/proc/{replacement}").exists()


def test_one_worker_per_cpu_each_on_its_own(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail("this test needs two CPUs or more (the CI machines have two)")
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address)  # workers: auto
    workers = wait_for_workers(proc, len(cpus))
    assert sorted(next(iter(os.sched_getaffinity(pid))) for pid in workers) == cpus
    assert all(len(os.sched_getaffinity(pid)) == 1 for pid in workers)
    assert os.sched_getaffinity(proc.proc.pid) == set(cpus)  # the supervisor is not pinned
    # One worker says where they listen: each address once, not once per worker.
    assert sum("listening on" in line for line in proc.lines) == 2  # 127.0.0.1, [::1]

"""A target that is down, or accepts and resets: every client is closed promptly with
the reason counted, and 10,000 such connections leak no thread and no file descriptor."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mmproxy.proxy_protocol import encode_v1
from tests.support import Seen

from .conftest import CLIENT4, Net, StartMmproxy, process_tree, start_backend

CONNECTIONS = 10_000


def resources(pid: int) -> tuple[int, int]:
    """(open fds, threads) of mmproxy: its process and the worker processes together."""
    fds = threads = 0
    for member in process_tree(pid):
        fds += len(os.listdir(f"/proc/{member}/fd"))
        with open(f"/proc/{member}/status") as status:
            threads += next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    return fds, threads


def one_client(net: Net, port: int) -> bytes:
    with net.gw.connect(("127.0.0.1", 2222), timeout=10) as sock:
        sock.sendall(encode_v1("TCP4", (CLIENT4, port), ("198.51.100.1", 2222)) + b"hello")
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""


def reset_at_once(conn: socket.socket, seen: Seen) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("fault", ["target-down", "target-resets"])
def test_faulty_targets_close_clients_and_leak_nothing(
    lo_net: Net, run_mmproxy: StartMmproxy, fault: str
) -> None:
    if fault == "target-down":
        target = "127.0.0.1:9"  # nothing listens there
    else:
        target = start_backend(lo_net.gw, "127.0.0.1", reset_at_once).address
    proc = run_mmproxy(lo_net, ipv4=target, check_failure="warn", log_level="warning")
    pid = proc.proc.pid
    for i in range(50):  # warm up the caches
        one_client(lo_net, 20000 + i)
    time.sleep(0.5)
    before = resources(pid)  # idle, after start-up's own sockets and the caches' first fill

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: one_client(lo_net, 21000 + i % 40000), range(CONNECTIONS))
        )
    elapsed = time.monotonic() - started
    assert answers == [b""] * CONNECTIONS  # every client was closed, none got data

    deadline = time.monotonic() + 15
    while (after := resources(pid)) != before and time.monotonic() < deadline:
        time.sleep(0.5)
    print(
        f"\n{fault}: {CONNECTIONS} connections in {elapsed:.1f} s; fds, threads {before} -> {after}"
    )
    assert after == before
    proc.proc.send_signal(signal.SIGTERM)
    line = proc.wait_for("stopping: ")
    if fault == "target-down":
        assert re.search(rf"target-unavailable {CONNECTIONS + 50}\b", line), line
    else:
        assert re.search(r"0 active", line), line

"""Slowloris: 2,000 connections from an allowed balancer send half a header and stall.
A well-behaved client must still get through; every stalled one is closed at the header
timeout. Latencies are printed (run with -s), never asserted: the machines are shared."""

from __future__ import annotations

import re
import signal
import statistics
import time

from mmproxy.proxy_protocol import encode_v1

from .conftest import CLIENT4, Net, StartMmproxy, start_backend

STALLED = 2000


def good_client_latency(net: Net, port: int) -> float:
    started = time.monotonic()
    with net.gw.connect(("127.0.0.1", 2222), timeout=10) as sock:
        sock.sendall(encode_v1("TCP4", (CLIENT4, port), ("198.51.100.1", 2222)))
        line = sock.makefile("rb").readline()
    assert line == f"{CLIENT4} {port}\n".encode()
    return time.monotonic() - started


def test_stalled_headers_do_not_delay_a_good_client(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, header_timeout=3)
    before = [good_client_latency(lo_net, 42000 + i) for i in range(20)]

    stalled = []
    for _ in range(STALLED):
        sock = lo_net.gw.connect(("127.0.0.1", 2222), timeout=10)
        sock.sendall(b"PROXY TCP4 203.0.")
        stalled.append(sock)
    during = [good_client_latency(lo_net, 43000 + i) for i in range(20)]

    deadline = time.monotonic() + 15
    for sock in stalled:  # each is closed by mmproxy once its 3 s are up
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        assert sock.recv(1) == b""
        sock.close()
    print(
        f"\ngood client latency: median {statistics.median(before) * 1000:.2f} ms alone, "
        f"{statistics.median(during) * 1000:.2f} ms beside {STALLED} stalled headers"
    )
    time.sleep(0.5)  # the counters are updated just after each close
    proc.proc.send_signal(signal.SIGTERM)
    line = proc.wait_for("stopping: ")
    assert re.search(rf"header-timeout {STALLED}\b", line), line
    assert len(app.seen) == 40  # only the good clients reached the application

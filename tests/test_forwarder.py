"""Forwarder pieces that need no namespace: header reading, rate limiting, the pool."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from mmproxy.forwarder import RateLimitedLog, Rejected, WorkerPool, read_header
from mmproxy.proxy_protocol import encode_v1, encode_v2

_OPEN_WRITERS: list[socket.socket] = []  # a writer that is not closed must stay referenced
V1 = encode_v1("TCP4", ("203.0.113.7", 40000), ("198.51.100.1", 2222))


def feed(chunks: list[bytes], delay: float = 0.0, close: bool = False) -> socket.socket:
    reader, writer = socket.socketpair()

    def write() -> None:
        for chunk in chunks:
            writer.sendall(chunk)
            time.sleep(delay)
        if close:
            writer.close()
        else:
            _OPEN_WRITERS.append(writer)

    threading.Thread(target=write, daemon=True).start()
    return reader


def test_header_and_early_data_are_split_exactly() -> None:
    header, early = read_header(feed([V1 + b"SSH-2.0-x\r\n"]), 3)
    assert header.source == ("203.0.113.7", 40000)
    assert early == b"SSH-2.0-x\r\n"


def test_header_in_many_pieces() -> None:
    v2 = encode_v2("PROXY", "TCP6", ("2001:db8::7", 1), ("2001:db8::1", 2))
    header, early = read_header(feed([bytes([b]) for b in v2], delay=0.001), 3)
    assert header.source == ("2001:db8::7", 1) and early == b""


@pytest.mark.parametrize(
    ("chunks", "close", "reason"),
    [
        ([b"GET / HTTP/1.1\r\n"], False, "invalid-header"),
        ([b"PROXY TCP4 1.2"], True, "closed-before-header"),
        ([], True, "probe"),
    ],
)
def test_bad_starts_are_rejected(chunks: list[bytes], close: bool, reason: str) -> None:
    with pytest.raises(Rejected) as exc:
        read_header(feed(chunks, close=close), 3)
    assert exc.value.reason == reason


def test_a_stall_times_out() -> None:
    started = time.monotonic()
    with pytest.raises(Rejected, match=r"within 0\.2 s \(6 bytes received\)"):
        read_header(feed([b"PROXY "]), 0.2)
    assert time.monotonic() - started < 2


def test_rate_limited_log_summarises(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimitedLog(burst=3, window=0.1)
    with caplog.at_level(logging.WARNING, logger="mmproxy"):
        for i in range(10):
            limiter.warning("bad", f"bad {i}", {})
        time.sleep(0.15)
        limiter.warning("bad", "bad again", {})
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["bad 0", "bad 1", "bad 2"]
    assert "7 more connections rejected (bad)" in messages[3]
    assert messages[4] == "bad again"


def test_worker_pool_runs_work_concurrently() -> None:
    started = threading.Barrier(3, timeout=5)
    done: list[int] = []

    def work(n: int) -> None:
        started.wait()  # only passes if three items run at the same time
        done.append(n)

    pool = WorkerPool(max_workers=10)
    for i in range(3):
        pool.submit(lambda i=i: work(i))  # type: ignore[misc]
    deadline = time.monotonic() + 5
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == [0, 1, 2]
    pool.stop()

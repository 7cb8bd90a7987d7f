"""The forwarder in-process with the balancer's own (LOCAL) connections, relayed
without spoofing and so without privileges; and its rate-limited log."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mmproxy.config import Address, Config
from mmproxy.forwarder import Forwarder, RateLimitedLog
from mmproxy.networks import parse_network
from mmproxy.proxy_protocol import encode_v2

LOCAL = encode_v2("LOCAL", "UNSPEC")  # relayed unspoofed: no privileges needed


@pytest.fixture
def echo() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@pytest.fixture
def forwarder(echo: socket.socket) -> Iterator[tuple[Forwarder, tuple[str, int]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    config = Config(
        ipv4=Address(*echo.getsockname()),
        allowed_networks=(parse_network("127.0.0.0/8"),),
        tcp_keepalive=False,
    )
    running = Forwarder(config, [listener])
    running.start()
    yield running, listener.getsockname()
    running.stop()
    listener.close()


def rejected(fwd: Forwarder, reason: str) -> int:
    deadline = time.monotonic() + 5
    while not fwd.stats.rejected[reason] and time.monotonic() < deadline:
        time.sleep(0.01)
    return fwd.stats.rejected[reason]


def test_header_in_pieces_then_data_both_ways(
    forwarder: tuple[Forwarder, tuple[str, int]],
) -> None:
    _fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        for byte in LOCAL:
            sock.send(bytes([byte]))
            time.sleep(0.001)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_data_in_the_header_segment_arrives_intact(
    forwarder: tuple[Forwarder, tuple[str, int]],
) -> None:
    _fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(LOCAL + b"SSH-2.0-x\r\n")
        assert sock.recv(100) == b"SSH-2.0-x\r\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "invalid-header"),
        (b"PROXY TCP4 1.2", "closed-before-header"),
        (b"", "probe"),
    ],
)
def test_bad_starts_are_rejected(
    forwarder: tuple[Forwarder, tuple[str, int]], data: bytes, reason: str
) -> None:
    fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    assert rejected(fwd, reason) == 1
    assert fwd.stats.total == 1 and fwd.stats.active == 0


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


def test_an_unexpected_accept_error_is_counted_and_accepting_goes_on(
    echo: socket.socket,
) -> None:
    """A listener shut down under the loop makes accept() fail with EINVAL, an errno
    nothing expects: the loop logs, counts, pauses that accept a while and carries on
    serving the other listener."""
    broken, working = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    config = Config(
        ipv4=Address(*echo.getsockname()),
        allowed_networks=(parse_network("127.0.0.0/8"),),
        tcp_keepalive=False,
    )
    fwd = Forwarder(config, [broken, working])
    fwd.start()
    try:
        broken.shutdown(socket.SHUT_RDWR)  # the listener reports EPOLLHUP; accept: EINVAL
        time.sleep(0.2)  # the loop meets the error at once
        assert fwd._relay.alive()
        assert fwd.stats.errors["accept-EINVAL"] >= 1
        assert "internal errors: accept-EINVAL" in fwd.stats.summary()
        with socket.create_connection(working.getsockname(), timeout=5) as sock:
            sock.sendall(LOCAL + b"ping")
            assert sock.recv(4) == b"ping"
    finally:
        fwd.stop()
        broken.close()
        working.close()

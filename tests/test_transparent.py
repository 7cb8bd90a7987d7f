"""Upstream sockets and their connection errors (no root needed)."""

from __future__ import annotations

import socket
import time

import pytest

from mmproxy.address import Address
from mmproxy.transparent import (
    UpstreamError,
    finish_upstream,
    probe_upstream,
    set_keepalive,
    start_upstream,
)


def open_upstream(
    target: Address, source: Address | None, mark: int, timeout: float, keepalive: bool = False
) -> socket.socket:
    fd = start_upstream(target, source, mark, keepalive)
    sock = socket.socket(fileno=fd)
    try:
        finish_upstream(fd, target, timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def test_refused_target_says_so() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match="refused the connection"):
        open_upstream(Address("127.0.0.1", port), None, 0, 1.0)


def test_plain_connect_works() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        sock = open_upstream(Address("127.0.0.1", s.getsockname()[1]), None, 0, 1.0)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_keepalive_on_upstream_and_inherited_from_the_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        set_keepalive(server)
        upstream = open_upstream(
            Address("127.0.0.1", server.getsockname()[1]), None, 0, 1.0, keepalive=True
        )
        accepted, _ = server.accept()
        with upstream, accepted:
            for sock in (upstream, accepted):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60


def test_a_probe_is_answered_but_never_reaches_the_application() -> None:
    """The self-checks' connections (checks.check_target): the kernel answers, the
    application's accept() never sees one (sshd would fork for it at every start)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        target = Address("127.0.0.1", server.getsockname()[1])
        probe_upstream(target, None, 0, 1.0)
        time.sleep(0.3)  # past the delayed-ACK time: nothing may arrive late either
        with pytest.raises(BlockingIOError):
            server.accept()
    with pytest.raises(UpstreamError, match="refused the connection"):
        probe_upstream(target, None, 0, 1.0)

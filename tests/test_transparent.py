"""Spoofing policy and upstream connection errors (no root needed)."""

from __future__ import annotations

import socket

import pytest

from mmproxy.address import Address
from mmproxy.transparent import (
    LocalAddresses,
    UpstreamError,
    forbidden_source_reason,
    open_upstream,
    set_keepalive,
    unmap,
)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("203.0.113.7", None),
        ("2001:db8::7", None),
    ],
)
def test_forbidden_sources(host: str, reason: str | None) -> None:
    assert forbidden_source_reason(host, LocalAddresses()) == reason


def test_this_hosts_addresses_are_forbidden() -> None:
    local = LocalAddresses()
    assert "127.0.0.1" in local  # always in the local table
    assert forbidden_source_reason("127.0.0.1", local) == "loopback"


def test_unmap() -> None:
    assert unmap("::ffff:192.0.2.1") == "192.0.2.1"
    assert unmap("2001:db8::1") == "2001:db8::1"
    assert unmap("192.0.2.1") == "192.0.2.1"


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

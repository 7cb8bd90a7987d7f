"""Which client addresses a header may claim: special, embedded and this host's own
(issue 11, items 6 and 7). The local-route reading is covered in a namespace by
tests/integration/test_local_addresses.py."""

from __future__ import annotations

import builtins
import ipaddress
import logging
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmproxy.localaddr import RTN_LOCAL, LocalAddresses, LocalRoute, forbidden_source_reason, unmap

LOCAL = LocalAddresses()


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        # Embedded IPv4 forms, whatever inet_ntop's text for them.
        ("::127.0.0.1", "loopback (127.0.0.1 embedded in an IPv4-compatible address)"),
        ("::7f00:1", "loopback (127.0.0.1 embedded in an IPv4-compatible address)"),
        ("::ffff:7f00:1", "loopback (127.0.0.1 embedded in an IPv4-mapped address)"),
        ("::ffff:127.0.0.1", "loopback (127.0.0.1 embedded in an IPv4-mapped address)"),
        ("::ffff:0:7f00:1", "loopback (127.0.0.1 embedded in an IPv4-translated address)"),
        ("64:ff9b::7f00:1", "loopback (127.0.0.1 embedded in a NAT64 address)"),
        ("64:ff9b::127.0.0.1", "loopback (127.0.0.1 embedded in a NAT64 address)"),
        ("2002:7f00:1::", "loopback (127.0.0.1 embedded in a 6to4 address)"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback (127.0.0.1 embedded in a Teredo"),
        ("64:ff9b::e000:1", "multicast (224.0.0.1 embedded in a NAT64 address)"),
        ("::ffff:0.0.0.0", "unspecified (0.0.0.0 embedded in an IPv4-mapped address)"),
        # Link-local: the cloud metadata service answers on 169.254.169.254.
        ("169.254.169.254", "link-local (169.254.0.0/16"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("febf::1", "link-local"),
        ("0.1.2.3", "this network (0.0.0.0/8)"),
        ("not-an-address", "not an IP address"),
    ],
)
def test_forms_that_passed_the_forged_source_check(host: str, reason: str) -> None:
    assert (forbidden_source_reason(host, LOCAL) or "").startswith(reason)


@pytest.mark.parametrize(
    "host",
    [
        "203.0.113.7",
        "2001:db8::7",
        "64:ff9b::cb00:7107",  # NAT64 of 203.0.113.7
        "2002:cb00:7107::1",  # 6to4 of 203.0.113.7
        "::ffff:0:cb00:7107",
        "fec0::1",  # outside fe80::/10
        "169.255.0.1",
        "2001:0:4136:e378:8000:63bf:34ff:8ef8",  # Teredo of 203.0.113.7
    ],
)
def test_ordinary_clients_pass(host: str) -> None:
    assert forbidden_source_reason(host, LOCAL) is None


def test_an_embedded_address_of_this_host_is_refused() -> None:
    local = LocalAddresses(reader=lambda: _routes("198.51.100.9/32"))
    assert forbidden_source_reason("198.51.100.9", local) == "an address of this host"
    assert forbidden_source_reason("64:ff9b::c633:6409", local) == (
        "an address of this host (198.51.100.9 embedded in a NAT64 address)"
    )
    assert forbidden_source_reason("2002:c633:6409::", local) is not None
    assert forbidden_source_reason("198.51.100.10", local) is None


def _routes(*prefixes: str) -> list[LocalRoute]:
    return [LocalRoute(ipaddress.ip_network(p), RTN_LOCAL) for p in prefixes]


def _unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel cannot be asked: no netlink socket, no /proc/self/net."""
    real_socket, real_open = socket.socket, builtins.open

    def no_netlink(family: int = -1, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_NETLINK:
            raise PermissionError(13, "Permission denied")
        return real_socket(family, *args, **kwargs)

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_netlink)
    monkeypatch.setattr(builtins, "open", no_proc)


def test_unreadable_local_addresses_fail_closed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    local = LocalAddresses(max_age=0.0)
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, "mmproxy"):
        _unreadable(patch)
        assert "203.0.113.7" in local
        assert "2001:db8::7" in local
        reason = forbidden_source_reason("203.0.113.7", local)
    assert reason is not None and "cannot be read" in reason
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # said once, not once per connection
    assert "cannot read this host's addresses" in errors[0].getMessage()
    # Readable again: clients are served again.
    assert "203.0.113.7" not in local
    assert "127.0.0.1" in local


def test_a_failed_re_read_does_not_keep_the_old_addresses() -> None:
    calls: list[int] = []

    def reader() -> list[LocalRoute]:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("netlink gone")
        return _routes("198.51.100.9/32")

    local = LocalAddresses(max_age=0.0, reader=reader)
    assert "203.0.113.7" not in local
    assert "203.0.113.7" in local  # the second read failed: nothing passes


EMBED = {
    "IPv4-compatible": lambda v4: v4,
    "IPv4-mapped": lambda v4: 0xFFFF << 32 | v4,
    "IPv4-translated": lambda v4: 0xFFFF0000 << 32 | v4,
    "NAT64": lambda v4: 0x64FF9B << 96 | v4,
    "6to4": lambda v4: 0x2002 << 112 | v4 << 80,
    "Teredo": lambda v4: 0x20010000 << 96 | (v4 ^ 0xFFFFFFFF),
}


@given(
    v4=st.one_of(
        st.integers(0x7F000000, 0x7FFFFFFF),  # loopback
        st.integers(0xA9FE0000, 0xA9FEFFFF),  # link-local
        st.integers(0xE0000000, 0xEFFFFFFF),  # multicast
    ),
    kind=st.sampled_from(sorted(EMBED)),
    low=st.integers(0, 0xFFFF),
)
def test_every_embedding_of_a_special_ipv4_address_is_refused(v4: int, kind: str, low: int) -> None:
    value = EMBED[kind](v4)
    if kind == "6to4":
        value |= low  # the rest of a 6to4 address is the site's own
    host = str(ipaddress.IPv6Address(value))
    reason = forbidden_source_reason(host, LOCAL)
    assert reason is not None and f"embedded in a{'n' if kind[0] == 'I' else ''} {kind}" in reason


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

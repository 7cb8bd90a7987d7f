"""The Simple Proxy Protocol codec: byte vectors written out by hand from the layout, and
properties over arbitrary bytes."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmproxy.spp import HEADER_SIZE, SppError, SppHeader, build, parse

# 203.0.113.7:51234 (IPv4-mapped) through the balancer's 198.51.100.1:53.
V4_VECTOR = bytes.fromhex(
    "56ec"
    "00000000000000000000ffffcb007107"
    "00000000000000000000ffffc6336401"
    "c822"
    "0035"
)  # fmt: skip
# [2001:db8::7]:40000 through [2001:db8:1::1]:443.
V6_VECTOR = bytes.fromhex(
    "56ec"
    "20010db8000000000000000000000007"
    "20010db8000100000000000000000001"
    "9c40"
    "01bb"
)  # fmt: skip


def test_ipv4_mapped_addresses_are_given_as_ipv4() -> None:
    header = parse(V4_VECTOR + b"payload")
    assert header == SppHeader(("203.0.113.7", 51234), ("198.51.100.1", 53))
    assert header.family == "UDP4"
    assert build(*(header.client, header.proxy)) == V4_VECTOR


def test_ipv6() -> None:
    header = parse(V6_VECTOR)
    assert header == SppHeader(("2001:db8::7", 40000), ("2001:db8:1::1", 443))
    assert header.family == "UDP6"
    assert build(header.client, header.proxy) == V6_VECTOR


def test_a_header_alone_is_a_header_with_an_empty_payload() -> None:
    assert len(V4_VECTOR) == HEADER_SIZE
    assert parse(V4_VECTOR).client == ("203.0.113.7", 51234)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "0 bytes, shorter than an SPP header (38 bytes)"),
        (V4_VECTOR[:37], "37 bytes, shorter than an SPP header (38 bytes)"),
        (b"\x56\xed" + V4_VECTOR[2:], "bad SPP magic 0x56ed (expected 0x56ec)"),
        (b"\r\n\r\n\x00\r\nQUIT\n" + bytes(30), "bad SPP magic 0x0d0a (expected 0x56ec)"),
    ],
    ids=["empty", "short", "magic", "proxy-v2"],
)
def test_bad_input_says_why(data: bytes, message: str) -> None:
    with pytest.raises(SppError, match=f"^{re.escape(message)}$"):
        parse(data)


def test_the_ipv4_compatible_form_stays_ipv6() -> None:
    """Only ::ffff:0:0/96 is IPv4; ::203.0.113.7 is an IPv6 address like any other."""
    data = b"\x56\xec" + bytes(12) + bytes([203, 0, 113, 7]) + V4_VECTOR[18:]
    host = parse(data).client[0]
    assert ipaddress.ip_address(host) == ipaddress.IPv6Address("::cb00:7107")


@pytest.mark.parametrize(
    ("client", "proxy"),
    [(("localhost", 1), ("192.0.2.1", 2)), (("192.0.2.1", 70000), ("192.0.2.1", 2))],
)
def test_build_refuses_what_it_cannot_write(
    client: tuple[str, int], proxy: tuple[str, int]
) -> None:
    with pytest.raises(ValueError):
        build(client, proxy)


@given(st.binary(max_size=80))
def test_any_bytes_are_a_header_or_an_spp_error(data: bytes) -> None:
    try:
        header = parse(data)
    except SppError:
        assert len(data) < HEADER_SIZE or data[:2] != b"\x56\xec"
        return
    # A header: build() writes back exactly its 38 bytes, whatever the addresses were.
    assert data[:2] == b"\x56\xec" and len(data) >= HEADER_SIZE
    assert parse(build(header.client, header.proxy)) == header
    assert build(header.client, header.proxy) == data[:HEADER_SIZE]


endpoints = st.tuples(
    st.one_of(
        st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
        st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    ),
    st.integers(0, 65535),
)


@given(endpoints, endpoints, st.binary(max_size=16))
def test_build_then_parse_gives_the_endpoints_back(
    client: tuple[str, int], proxy: tuple[str, int], payload: bytes
) -> None:
    header = parse(build(client, proxy) + payload)
    assert ipaddress.ip_address(header.client[0]) == _unmapped(client[0])
    assert ipaddress.ip_address(header.proxy[0]) == _unmapped(proxy[0])
    assert (header.client[1], header.proxy[1]) == (client[1], proxy[1])


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address

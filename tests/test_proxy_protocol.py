"""Tests for mmproxy.proxy_protocol: one case per rule of the spec, valid and invalid."""

from __future__ import annotations

import dataclasses
import ipaddress
import pickle
import re
import socket
import struct
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmproxy import proxy_protocol as pp
from mmproxy.proxy_protocol import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CLIENT_CERT,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    IncompleteHeader,
    InvalidHeader,
    ProxyHeader,
    ProxyProtocolError,
    SslInfo,
    crc32c,
    encode,
    encode_v1,
    encode_v2,
    parse,
    parse_ssl_tlv,
)

A4 = ("192.0.2.1", 40000)
B4 = ("198.51.100.2", 443)
A6 = ("2001:db8::1", 40000)
B6 = ("2001:db8:0:1::2", 443)
INET4_BLOCK = socket.inet_aton(A4[0]) + socket.inet_aton(B4[0]) + struct.pack("!HH", A4[1], B4[1])
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TCP4_V1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n"


def v2_raw(
    ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = b"", size: int | None = None
) -> bytes:
    """A v2 header built by hand, so that tests do not depend on the encoder."""
    length = len(body) if size is None else size
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", length) + body


def tlv(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("!BH", tlv_type, len(value)) + value


def ssl_value(client: int, verify: int, *subs: tuple[int, bytes]) -> bytes:
    return bytes((client,)) + struct.pack("!I", verify) + b"".join(tlv(t, v) for t, v in subs)


def with_crc(header: bytes, value_at: int) -> bytes:
    """Fill in a zeroed CRC32C value at value_at, computed over the whole header."""
    return header[:value_at] + struct.pack("!I", crc32c(header)) + header[value_at + 4 :]


def invalid(data: bytes) -> str:
    with pytest.raises(InvalidHeader) as info:
        parse(data)
    return str(info.value)


def path(raw: bytes) -> bytes:
    return raw.ljust(108, b"\x00")


SSL_VALUE = ssl_value(
    PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
    0,
    (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
    (PP2_SUBTYPE_SSL_CN, "exämple.com".encode()),
    (PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_128_GCM_SHA256"),
    (PP2_SUBTYPE_SSL_CLIENT_CERT, b"\x30\x03\x01\x01\xff"),
)

# --- round trips: encode, then parse, then re-encode --------------------------------------

ROUND_TRIPS = [
    pytest.param(
        encode_v1("TCP4", A4, B4),
        {"version": 1, "command": "PROXY", "family": "TCP4", "source": A4, "destination": B4},
        id="v1-TCP4",
    ),
    pytest.param(
        encode_v1("TCP6", A6, B6),
        {"version": 1, "command": "PROXY", "family": "TCP6", "source": A6, "destination": B6},
        id="v1-TCP6",
    ),
    pytest.param(
        encode_v1("TCP6", ("::ffff:192.0.2.1", 1), ("::", 0)),
        {
            "version": 1,
            "command": "PROXY",
            "family": "TCP6",
            "source": ("::ffff:192.0.2.1", 1),
            "destination": ("::", 0),
        },
        id="v1-TCP6-mapped-sent-as-hex",
    ),
    pytest.param(
        encode_v1("UNKNOWN"),
        {
            "version": 1,
            "command": "PROXY",
            "family": "UNKNOWN",
            "source": None,
            "destination": None,
        },
        id="v1-UNKNOWN",
    ),
    *[
        pytest.param(
            encode_v2("PROXY", family, src, dst),
            {"version": 2, "command": "PROXY", "family": family, "source": src, "destination": dst},
            id=f"v2-{family}",
        )
        for family, src, dst in [
            ("TCP4", A4, B4),
            ("UDP4", A4, B4),
            ("TCP6", A6, B6),
            ("UDP6", A6, B6),
        ]
    ],
    *[
        pytest.param(
            encode_v2("PROXY", family, b"/run/client.sock", b"\x00abstract\x00name"),
            {
                "version": 2,
                "command": "PROXY",
                "family": family,
                "source": None,
                "destination": None,
                "source_path": b"/run/client.sock",
                "destination_path": b"\x00abstract\x00name",
            },
            id=f"v2-{family}",
        )
        for family in ("UNIX_STREAM", "UNIX_DGRAM")
    ],
    pytest.param(
        encode_v2("LOCAL", "UNSPEC"),
        {"version": 2, "command": "LOCAL", "family": "UNSPEC", "source": None, "destination": None},
        id="v2-LOCAL-UNSPEC",
    ),
    pytest.param(
        encode_v2(
            "PROXY",
            "TCP6",
            A6,
            B6,
            [
                (PP2_TYPE_ALPN, b"h2"),
                (PP2_TYPE_AUTHORITY, b"example.com"),
                (PP2_TYPE_SSL, SSL_VALUE),
            ],
            crc32c=True,
        ),
        {
            "version": 2,
            "command": "PROXY",
            "family": "TCP6",
            "source": A6,
            "destination": B6,
            "tlvs": [
                (PP2_TYPE_ALPN, b"h2"),
                (PP2_TYPE_AUTHORITY, b"example.com"),
                (PP2_TYPE_SSL, SSL_VALUE),
                (PP2_TYPE_CRC32C, None),  # filled in below: the value is computed
            ],
        },
        id="v2-TCP6-TLVs-CRC32C",
    ),
]


@pytest.mark.parametrize(("data", "fields"), ROUND_TRIPS)
def test_encode_parse_round_trip(data: bytes, fields: dict[str, object]) -> None:
    header = parse(data)
    expected = dict(fields)
    tlvs = expected.get("tlvs")
    if isinstance(tlvs, list):
        expected["tlvs"] = [(t, header.tlv(t) if v is None else v) for t, v in tlvs]
    assert header == ProxyHeader(length=len(data), **expected)  # type: ignore[arg-type]
    assert encode(header) == data


VALID = {
    "v1-TCP4": TCP4_V1,
    "v1-TCP4-max-56": b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
    "v1-TCP4-min": b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
    "v1-TCP6": b"PROXY TCP6 2001:DB8::1 fe80::a:b:c:d 1 65535\r\n",
    "v1-TCP6-max-104": b"PROXY TCP6 "
    + b":".join([b"ffff"] * 8)
    + b" "
    + b":".join([b"ffff"] * 8)
    + b" 65535 65535\r\n",
    "v1-TCP6-min": b"PROXY TCP6 :: :: 0 0\r\n",
    "v1-UNKNOWN-15": b"PROXY UNKNOWN\r\n",
    "v1-UNKNOWN-worst-107": b"PROXY UNKNOWN "
    + b":".join([b"ffff"] * 8)
    + b" "
    + b":".join([b"ffff"] * 8)
    + b" 65535 65535\r\n",
    "v2-TCP4": v2_raw(0x21, 0x11, INET4_BLOCK),
    "v2-TCP6-TLVs": encode_v2("PROXY", "TCP6", A6, B6, [(PP2_TYPE_NOOP, b""), (0xE0, b"x")]),
    "v2-UNIX": encode_v2("PROXY", "UNIX_STREAM", b"/a", b"/b"),
    "v2-LOCAL-UNSPEC-TLVs": v2_raw(0x20, 0x00, tlv(PP2_TYPE_NOOP, b"pad")),
    "v2-LOCAL-TCP4-length-0": v2_raw(0x20, 0x11),
    "v2-LOCAL-unlisted-family": v2_raw(0x20, 0x41, b"\xff" * 5),
    "v2-CRC32C": encode_v2("PROXY", "TCP4", A4, B4, [(PP2_TYPE_UNIQUE_ID, b"id")], crc32c=True),
}


def test_spec_maximum_lengths() -> None:
    assert len(VALID["v1-TCP4-max-56"]) == 56
    assert len(VALID["v1-TCP6-max-104"]) == 104
    assert len(VALID["v1-UNKNOWN-15"]) == 15
    assert len(VALID["v1-UNKNOWN-worst-107"]) == 107


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_valid_header_parses_with_exact_length(data: bytes) -> None:
    assert parse(data).length == len(data)


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_every_strict_prefix_is_incomplete_with_a_sound_needed(data: bytes) -> None:
    for size in range(len(data)):
        with pytest.raises(IncompleteHeader) as info:
            parse(data[:size])
        # A lower bound: reading exactly `needed` more must never overshoot the header.
        assert 1 <= info.value.needed <= len(data) - size, size


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
@pytest.mark.parametrize("trailer", [b"GET / HTTP/1.1\r\n", b"\r\n", b"\x00" * 300], ids=repr)
def test_trailing_data_is_not_consumed(data: bytes, trailer: bytes) -> None:
    header = parse(data + trailer)
    assert header.length == len(data)
    assert header == parse(data)


@pytest.mark.parametrize("kind", [bytearray, memoryview], ids=lambda k: k.__name__)
def test_accepts_bytearray_and_memoryview(kind: type) -> None:
    assert parse(kind(TCP4_V1 + b"x")) == parse(TCP4_V1)


def test_spec_v1_example() -> None:
    header = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n")
    assert header == ProxyHeader(
        1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), 47
    )


def test_v1_tcp6_is_normalised() -> None:
    header = parse(b"PROXY TCP6 2001:0DB8:0000::0001 ::FFFF:c000:0201 1 2\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("::ffff:192.0.2.1", 2)


@pytest.mark.parametrize(
    "tail",
    [b"", b" ", b" 192.0.2.1 198.51.100.2 1 2", b" anything printable ~!"],
    ids=["bare", "space", "addresses", "free-text"],
)
def test_v1_unknown_ignores_the_rest_of_the_line(tail: bytes) -> None:
    data = b"PROXY UNKNOWN" + tail + b"\r\n"
    assert parse(data) == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, len(data))


# --- incomplete: exact lower bounds at the interesting points -----------------------------


@pytest.mark.parametrize(
    ("data", "needed"),
    [
        (b"", 15),
        (b"P", 14),
        (b"PROXY ", 9),
        (b"PROXY TCP4", 22),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443", 2),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r", 1),
        (b"PROXY UNKNOWN", 2),
        (V2_SIGNATURE[:5], 11),
        (V2_SIGNATURE + b"\x21", 3),
        (v2_raw(0x21, 0x11, size=12), 12),
        (v2_raw(0x21, 0x11, INET4_BLOCK[:5], size=12), 7),
    ],
    ids=repr,
)
def test_incomplete_needed(data: bytes, needed: int) -> None:
    with pytest.raises(IncompleteHeader) as info:
        parse(data)
    assert info.value.needed == needed


def test_incomplete_needed_is_at_least_one() -> None:
    assert IncompleteHeader(0).needed == 1


def test_exception_hierarchy_and_pickling() -> None:
    assert issubclass(IncompleteHeader, ProxyProtocolError)
    assert issubclass(InvalidHeader, ProxyProtocolError)
    assert issubclass(ProxyProtocolError, ValueError)
    copy = pickle.loads(pickle.dumps(IncompleteHeader(7)))
    assert isinstance(copy, IncompleteHeader)
    assert copy.needed == 7


# --- v1: invalid lines ----------------------------------------------------------------------

V1_INVALID = [
    ("leading-zero-octet", b"PROXY TCP4 192.168.01.1 10.0.0.1 1 2\r\n", "leading zero in '01'"),
    ("octet-256", b"PROXY TCP4 256.0.0.1 10.0.0.1 1 2\r\n", "'256', above 255"),
    ("three-octets", b"PROXY TCP4 10.0.0 10.0.0.1 1 2\r\n", "does not have 4 numbers"),
    ("five-octets", b"PROXY TCP4 10.0.0.1.2 10.0.0.1 1 2\r\n", "more than 4 numbers"),
    ("empty-octet", b"PROXY TCP4 10..0.1 10.0.0.1 1 2\r\n", "empty number"),
    ("port-65536", b"PROXY TCP4 10.0.0.1 10.0.0.2 65536 2\r\n", "port '65536' is above 65535"),
    (
        "port-leading-zero",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 080 2\r\n",
        "port '080' has a leading zero",
    ),
    ("port-plus-sign", b"PROXY TCP4 10.0.0.1 10.0.0.2 +80 2\r\n", "has a sign"),
    ("port-minus-sign", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 -2\r\n", "has a sign"),
    ("port-letter", b"PROXY TCP4 10.0.0.1 10.0.0.2 8o 2\r\n", "contains 'o', not a digit"),
    ("double-space-field", b"PROXY TCP4 10.0.0.1  10.0.0.2 1 2\r\n", "two spaces in a row"),
    ("double-space-after-PROXY", b"PROXY  TCP4 10.0.0.1 10.0.0.2 1 2\r\n", "empty protocol"),
    ("space-before-CRLF", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2 \r\n", "space after the dest port"),
    ("extra-field", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2 3\r\n", "unexpected data after"),
    ("missing-field", b"PROXY TCP4 10.0.0.1 10.0.0.2 1\r\n", "3 of 4 fields"),
    ("lowercase-proxy", b"proxy TCP4 10.0.0.1 10.0.0.2 1 2\r\n", "case-sensitive"),
    ("lowercase-protocol", b"PROXY tcp4 10.0.0.1 10.0.0.2 1 2\r\n", "must be upper case"),
    ("tab-separator", b"PROXY\tTCP4 10.0.0.1 10.0.0.2 1 2\r\n", "one space after 'PROXY'"),
    ("missing-CR", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\n", "bare LF"),
    ("lone-CR", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\r\n", "CR not followed by LF"),
    ("UDP4", b"PROXY UDP4 10.0.0.1 10.0.0.2 1 2\r\n", "does not exist in v1"),
    ("unknown-protocol", b"PROXY TCP5 10.0.0.1 10.0.0.2 1 2\r\n", "unknown protocol 'TCP5'"),
    ("UNKNOWN-glued", b"PROXY UNKNOWNX\r\n", "unknown protocol 'UNKNOWNX'"),
    ("UNKNOWN-control-char", b"PROXY UNKNOWN \x01\r\n", "non-printable"),
    ("UNKNOWN-non-ascii", b"PROXY UNKNOWN \xc3\xa9\r\n", "non-printable"),
    ("empty-protocol", b"PROXY \r\n", "empty protocol"),
    ("TCP4-with-IPv6", b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4 address"),
    ("TCP6-with-IPv4-literal", b"PROXY TCP6 10.0.0.1 ::1 1 2\r\n", "is an IPv4 address"),
    ("TCP6-dotted-tail", b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n", "dotted IPv4 tail"),
    ("IPv6-5-digit-group", b"PROXY TCP6 2001:00db8::1 ::1 1 2\r\n", "more than 4 hex digits"),
    ("IPv6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "more than one '::'"),
    ("IPv6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "not a valid IPv6"),
    ("IPv6-zone-id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "contains '%'"),
    ("IPv6-single-leading-colon", b"PROXY TCP6 :1::2 ::1 1 2\r\n", "single ':'"),
    ("non-ascii-address", b"PROXY TCP4 10.0.0.\xb9 10.0.0.2 1 2\r\n", "not a digit or a dot"),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in V1_INVALID], ids=[case[0] for case in V1_INVALID]
)
def test_v1_invalid(data: bytes, message: str) -> None:
    assert message in invalid(data)


def test_v1_line_of_107_bytes_is_the_limit() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert parse(line).length == 107
    too_long = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert "no CRLF within the first 107 bytes" in invalid(too_long)


def test_v1_no_crlf_in_107_bytes() -> None:
    assert "no CRLF within the first 107 bytes" in invalid(b"PROXY UNKNOWN " + b"x" * 93)


def test_v1_invalid_once_crlf_cannot_fit() -> None:
    # 106 bytes without a CR: CRLF would end at byte 108.
    assert "cannot end within 107 bytes" in invalid(b"PROXY UNKNOWN " + b"x" * 92)


# Prefixes proven wrong before any CRLF arrives: the caller can drop the peer at once.
EARLY_INVALID = [
    ("letter-in-octet", b"PROXY TCP4 1.2.3.a"),
    ("second-space", b"PROXY TCP4 1.2.3.4  "),
    ("letter-in-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 8x"),
    ("bare-LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("CR-then-not-LF", b"PROXY UNKNOWN\rX"),
    ("CR-ends-too-early", b"PROXY TCP4 1.2.3.4\r"),
    ("leading-zero", b"PROXY TCP4 01"),
    ("octet-256", b"PROXY TCP4 256"),
    ("port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536"),
    ("trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 "),
    ("dot-in-TCP6", b"PROXY TCP6 1."),
    ("bad-protocol-prefix", b"PROXY UD"),
    ("lowercase", b"pr"),
    ("first-byte", b"X"),
    ("TLS-first-byte", b"\x16"),
    ("v2-signature-mismatch", b"\r\n\r\n\x01"),
    ("v2-version-1-at-16-bytes", V2_SIGNATURE + b"\x11\x11\x00\x0c"),
    ("v2-command-2-at-16-bytes", V2_SIGNATURE + b"\x22\x11\x00\x0c"),
    ("v2-bad-family-at-16-bytes", V2_SIGNATURE + b"\x21\x41\x00\x0c"),
    ("v2-PROXY-UNSPEC-at-16-bytes", V2_SIGNATURE + b"\x21\x00\x00\x00"),
    ("v2-len-too-short-at-16-bytes", v2_raw(0x21, 0x11, size=11)),
]


@pytest.mark.parametrize(
    "data", [case[1] for case in EARLY_INVALID], ids=[case[0] for case in EARLY_INVALID]
)
def test_invalid_as_soon_as_a_byte_proves_it(data: bytes) -> None:
    invalid(data)


@pytest.mark.parametrize(
    "fixed",
    [
        V2_SIGNATURE + b"\x11\x11\x00\x0c",  # version 1
        V2_SIGNATURE + b"\x22\x11\x00\x0c",  # command 2
        V2_SIGNATURE + b"\x21\x41\x00\x0c",  # unlisted family under PROXY
        V2_SIGNATURE + b"\x21\x00\x00\x00",  # PROXY with UNSPEC
    ],
    ids=["version-1", "command-2", "family-0x41", "PROXY-UNSPEC"],
)
def test_v2_is_incomplete_until_the_fixed_part_is_in(fixed: bytes) -> None:
    # The issue: a 13- or 14-byte prefix was called invalid though it is only incomplete.
    for size in range(12, 16):
        with pytest.raises(IncompleteHeader) as info:
            parse(fixed[:size])
        assert info.value.needed == 16 - size
    invalid(fixed)


# --- not a PROXY header at all: say what it looks like -------------------------------------

GARBAGE = [
    (
        "TLS-ClientHello",
        bytes.fromhex("160301020001fc0303"),
        "b'\\x16\\x03\\x01': a TLS ClientHello?",
    ),
    ("HTTP-GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "looks like HTTP (b'GET ')"),
    ("HTTP-POST", b"POST /form HTTP/1.1\r\n", "looks like HTTP (b'POST ')"),
    ("HTTP-GET-prefix", b"GET", "looks like HTTP (b'GET')"),
    ("HTTP2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "looks like HTTP"),
    ("SSH", b"SSH-2.0-OpenSSH_9.6\r\n", "looks like SSH"),
    ("binary", b"\x00\x01\x02", "not a PROXY protocol header (starts with b'\\x00\\x01\\x02')"),
    ("v2-signature-typo", V2_SIGNATURE[:7] + b"X", "byte 7 differs from the v2 signature"),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in GARBAGE], ids=[case[0] for case in GARBAGE]
)
def test_not_a_proxy_header_message(data: bytes, message: str) -> None:
    assert message in invalid(data)


# --- v2: fixed part ---------------------------------------------------------------------------


@pytest.mark.parametrize("ver_cmd", [0x11, 0x31, 0x01, 0xF1], ids=["v1", "v3", "v0", "v15"])
def test_v2_version_other_than_2(ver_cmd: int) -> None:
    assert f"unsupported version {ver_cmd >> 4}" in invalid(v2_raw(ver_cmd, 0x11, INET4_BLOCK))


@pytest.mark.parametrize("ver_cmd", [0x22, 0x2F], ids=["command-2", "command-15"])
def test_v2_undefined_command(ver_cmd: int) -> None:
    assert "undefined command" in invalid(v2_raw(ver_cmd, 0x11, INET4_BLOCK))


FAMILIES_NOT_LISTED = [0x01, 0x02, 0x10, 0x20, 0x30, 0x13, 0x23, 0x41, 0xFF]


@pytest.mark.parametrize("fam", FAMILIES_NOT_LISTED, ids=hex)
def test_v2_family_byte_not_listed(fam: int) -> None:
    # STRICT under PROXY: only the family bytes the spec lists.
    message = invalid(v2_raw(0x21, fam, b"\x00" * 216))
    assert f"family/transport byte 0x{fam:02X}" in message


@pytest.mark.parametrize("fam", FAMILIES_NOT_LISTED, ids=hex)
def test_v2_local_ignores_the_family_byte(fam: int) -> None:
    # The spec: under LOCAL "the family ... is ignored".
    data = v2_raw(0x20, fam, b"\x00" * 216)
    assert parse(data) == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, len(data))


FAMILY_BLOCKS = pytest.mark.parametrize(
    ("fam", "block"),
    [(0x11, 12), (0x12, 12), (0x21, 36), (0x22, 36), (0x31, 216), (0x32, 216)],
    ids=["TCP4", "UDP4", "TCP6", "UDP6", "UNIX_STREAM", "UNIX_DGRAM"],
)


@FAMILY_BLOCKS
def test_v2_length_shorter_than_address_block(fam: int, block: int) -> None:
    message = invalid(v2_raw(0x21, fam, b"\x00" * (block - 1)))
    assert f"too short for the {block}-byte" in message


@FAMILY_BLOCKS
@pytest.mark.parametrize("short", [0, 1], ids=["length-0", "one-byte-short"])
def test_v2_local_with_a_short_block_is_accepted(fam: int, block: int, short: int) -> None:
    # The bug: LOCAL + TCP4 with length 0 was refused, so the balancer's health
    # check failed and it marked the backend down. LOCAL discards the block.
    size = 0 if short == 0 else block - 1
    data = v2_raw(0x20, fam, b"\x07" * size)
    assert parse(data + b"GET /") == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, 16 + size)


def test_v2_proxy_with_unspec_is_rejected() -> None:
    assert "PROXY command with UNSPEC" in invalid(v2_raw(0x21, 0x00))


def test_v2_local_unspec_with_tlvs_is_accepted_and_the_tlvs_skipped() -> None:
    data = v2_raw(0x20, 0x00, tlv(PP2_TYPE_NOOP, b"") + tlv(0xE0, b"app"))
    assert parse(data) == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, len(data))


def test_v2_local_unspec_without_payload() -> None:
    assert parse(v2_raw(0x20, 0x00)) == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, 16)


@pytest.mark.parametrize(
    "body",
    [INET4_BLOCK, b"\x04", tlv(PP2_TYPE_ALPN, b"h2")[:-1], tlv(PP2_TYPE_CRC32C, b"\x00" * 4)],
    ids=["address-block", "stray-byte", "overrun", "wrong-CRC32C"],
)
def test_v2_local_unspec_block_is_not_read_as_tlvs(body: bytes) -> None:
    # The bug: an UNSPEC block was read as TLVs and refused when it was not.
    data = v2_raw(0x20, 0x00, body)
    assert parse(data).length == len(data)


def test_v2_local_reports_no_family_or_addresses() -> None:
    # The spec: the receiver "must use the real connection endpoints"; nothing to misuse.
    header = parse(v2_raw(0x20, 0x11, INET4_BLOCK))
    assert (header.command, header.family, header.source, header.destination) == (
        "LOCAL",
        "UNSPEC",
        None,
        None,
    )


def test_v2_aws_nlb_style_health_check() -> None:
    # An NLB health check: LOCAL, family TCP4, a CRC32C TLV and NOOP padding.
    tlvs = [(PP2_TYPE_NOOP, b"\x00" * 9)]
    data = encode_v2("LOCAL", "TCP4", A4, B4, tlvs, crc32c=True)
    header = parse(data + b"GET / HTTP/1.1\r\n")
    assert (header.command, header.length) == ("LOCAL", len(data))


def test_v2_unix_paths() -> None:
    body = path(b"/run/src.sock\x00garbage") + path(b"\x00abstract")
    header = parse(v2_raw(0x21, 0x31, body))
    assert header.source is None
    assert header.destination is None
    assert header.source_path == b"/run/src.sock"
    assert header.destination_path == b"\x00abstract"


def test_v2_largest_header() -> None:
    body = INET4_BLOCK + tlv(PP2_TYPE_NOOP, b"\x00" * (0xFFFF - 12 - 3))
    data = v2_raw(0x21, 0x11, body)
    assert len(data) == pp.V2_MAX_LENGTH
    assert parse(data + b"more").length == pp.V2_MAX_LENGTH


# --- v2: TLVs ----------------------------------------------------------------------------------


def test_v2_tlvs_kept_in_wire_order_with_unknown_types() -> None:
    tlvs = [(0xF0, b"exp"), (PP2_TYPE_ALPN, b"h2"), (0xE5, b""), (PP2_TYPE_ALPN, b"http/1.1")]
    header = parse(v2_raw(0x21, 0x11, INET4_BLOCK + b"".join(tlv(t, v) for t, v in tlvs)))
    assert header.tlvs == tlvs
    assert header.tlv(PP2_TYPE_ALPN) == b"h2"  # the first of that type
    assert header.tlv(PP2_TYPE_AUTHORITY) is None


@pytest.mark.parametrize(
    ("area", "message"),
    [
        (tlv(PP2_TYPE_ALPN, b"h2")[:-1], "declares 2 bytes but only 1 remain"),
        (b"\x01\x00\x05abc", "declares 5 bytes but only 3 remain"),
        (b"\x04", "1 stray byte(s)"),
        (tlv(PP2_TYPE_NOOP, b"") + b"\x04\x00", "2 stray byte(s)"),
    ],
    ids=["overrun-by-one", "overrun", "one-stray-byte", "two-stray-bytes"],
)
def test_v2_malformed_tlv_area(area: bytes, message: str) -> None:
    assert message in invalid(v2_raw(0x21, 0x11, INET4_BLOCK + area))


def test_crc32c_known_answers() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4
    assert crc32c(b"") == 0


def test_v2_crc32c_correct() -> None:
    raw = v2_raw(0x21, 0x11, INET4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00" * 4))
    data = with_crc(raw, len(raw) - 4)
    header = parse(data)
    assert header.tlv(PP2_TYPE_CRC32C) == struct.pack("!I", crc32c(raw))
    assert encode_v2("PROXY", "TCP4", A4, B4, crc32c=True) == data


def test_v2_crc32c_in_the_middle_of_the_tlvs() -> None:
    raw = v2_raw(
        0x21,
        0x11,
        INET4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2") + tlv(PP2_TYPE_CRC32C, b"\x00" * 4) + tlv(5, b"i"),
    )
    value_at = 16 + 12 + 5 + 3
    assert parse(with_crc(raw, value_at)).tlv(PP2_TYPE_UNIQUE_ID) == b"i"


def test_v2_crc32c_wrong() -> None:
    data = bytearray(encode_v2("PROXY", "TCP4", A4, B4, crc32c=True))
    data[16] ^= 0x01  # a bit of the source address flips in transit
    message = invalid(bytes(data))
    assert message.startswith("v2: CRC32C mismatch (header says 0x")
    assert ", computed 0x" in message


@pytest.mark.parametrize("size", [0, 3, 5, 8])
def test_v2_crc32c_wrong_length(size: int) -> None:
    data = v2_raw(0x21, 0x11, INET4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00" * size))
    assert f"CRC32C TLV is {size} bytes, must be 4" in invalid(data)


def test_v2_crc32c_twice() -> None:
    crc = tlv(PP2_TYPE_CRC32C, b"\x00" * 4)
    assert "more than one CRC32C" in invalid(v2_raw(0x21, 0x11, INET4_BLOCK + crc + crc))


@pytest.mark.parametrize(("size", "ok"), [(0, True), (128, True), (129, False)])
def test_v2_unique_id_length(size: int, ok: bool) -> None:
    data = v2_raw(0x21, 0x11, INET4_BLOCK + tlv(PP2_TYPE_UNIQUE_ID, b"u" * size))
    if ok:
        assert parse(data).tlv(PP2_TYPE_UNIQUE_ID) == b"u" * size
    else:
        assert "UNIQUE_ID TLV is 129 bytes, at most 128" in invalid(data)


@pytest.mark.parametrize(
    ("tlv_type", "value", "message"),
    [
        (PP2_TYPE_AUTHORITY, b"ex\xffample.com", "AUTHORITY TLV is not valid UTF-8 (byte 2"),
        (PP2_TYPE_NETNS, "név".encode(), "NETNS TLV is not valid ASCII"),
    ],
    ids=["AUTHORITY-not-UTF-8", "NETNS-not-ASCII"],
)
def test_v2_text_tlvs_must_decode(tlv_type: int, value: bytes, message: str) -> None:
    assert message in invalid(v2_raw(0x21, 0x11, INET4_BLOCK + tlv(tlv_type, value)))


def test_v2_authority_utf8_accepted() -> None:
    name = "bücher.example".encode()
    header = parse(v2_raw(0x21, 0x11, INET4_BLOCK + tlv(PP2_TYPE_AUTHORITY, name)))
    assert header.tlv(PP2_TYPE_AUTHORITY) == name


def test_v2_ssl_tlv_with_sub_tlvs() -> None:
    header = parse(v2_raw(0x21, 0x11, INET4_BLOCK + tlv(PP2_TYPE_SSL, SSL_VALUE)))
    info = header.ssl_info()
    assert info == SslInfo(
        client=0x07,
        verify=0,
        tlvs=[
            (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
            (PP2_SUBTYPE_SSL_CN, "exämple.com".encode()),
            (PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_128_GCM_SHA256"),
            (PP2_SUBTYPE_SSL_CLIENT_CERT, b"\x30\x03\x01\x01\xff"),
        ],
    )
    assert info.tlv(PP2_SUBTYPE_SSL_VERSION) == b"TLSv1.3"
    assert info.tlv(0x29) is None


def test_ssl_info_absent() -> None:
    assert parse(TCP4_V1).ssl_info() is None


def test_parse_ssl_tlv_without_sub_tlvs() -> None:
    assert parse_ssl_tlv(ssl_value(0, 1)) == SslInfo(0, 1, [])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x01\x00\x00\x00", "SSL TLV is 4 bytes, needs at least 5"),
        (ssl_value(0x08, 0), "SSL TLV client field 0x08 has undefined bits"),
        (ssl_value(1, 0) + b"\x21\x00\x09TLS", "SSL TLV: TLV 0x21 at offset 5 declares 9 bytes"),
        (ssl_value(1, 0) + b"\x21", "SSL TLV: 1 stray byte(s)"),
        (ssl_value(1, 0, (PP2_SUBTYPE_SSL_VERSION, b"TLS\xff")), "SSL VERSION is not valid ASCII"),
        (ssl_value(1, 0, (PP2_SUBTYPE_SSL_CN, b"\xc3")), "SSL CN is not valid UTF-8"),
    ],
    ids=["too-short", "undefined-client-bit", "sub-overrun", "sub-stray", "VERSION-8bit", "CN"],
)
def test_v2_malformed_ssl_tlv_makes_header_invalid(value: bytes, message: str) -> None:
    with pytest.raises(InvalidHeader, match="^" + re.escape(message)):
        parse_ssl_tlv(value)
    assert f"v2: {message}" in invalid(v2_raw(0x21, 0x11, INET4_BLOCK + tlv(PP2_TYPE_SSL, value)))


# --- encoders ----------------------------------------------------------------------------------


def test_encode_v1_tcp6_uses_hex_groups_only() -> None:
    line = encode_v1("TCP6", ("::ffff:192.0.2.1", 1), ("2001:DB8:0:0:1:0:0:1", 2))
    assert line == b"PROXY TCP6 ::ffff:c000:201 2001:db8::1:0:0:1 1 2\r\n"


def test_encode_v2_crc32c_fills_an_existing_tlv_in_place() -> None:
    tlvs = [(PP2_TYPE_CRC32C, b"\xff" * 4), (PP2_TYPE_ALPN, b"h2")]
    data = encode_v2("PROXY", "TCP4", A4, B4, tlvs, crc32c=True)
    header = parse(data)
    assert [t for t, _ in header.tlvs] == [PP2_TYPE_CRC32C, PP2_TYPE_ALPN]
    assert header.tlv(PP2_TYPE_CRC32C) != b"\xff" * 4


ENCODE_V1_ERRORS = [
    ("UDP4", ("UDP4", A4, B4), "family must be TCP4, TCP6 or UNKNOWN"),
    ("UNKNOWN-with-addresses", ("UNKNOWN", A4, B4), "UNKNOWN carries no addresses"),
    ("missing-destination", ("TCP4", A4, None), "destination must be an (address, port) pair"),
    ("three-octets", ("TCP4", ("10.0.0", 1), B4), "does not have 4 numbers"),
    ("leading-zero", ("TCP4", ("10.0.0.01", 1), B4), "leading zero"),
    ("IPv6-for-TCP4", ("TCP4", A6, B4), "not an IPv4 address"),
    ("IPv4-for-TCP6", ("TCP6", A4, B6), "not a valid IPv6 address"),
    ("port-65536", ("TCP4", ("10.0.0.1", 65536), B4), "port must be an int in 0-65535"),
    ("port-negative", ("TCP4", ("10.0.0.1", -1), B4), "port must be an int in 0-65535"),
    ("port-bool", ("TCP4", ("10.0.0.1", True), B4), "port must be an int in 0-65535"),
    ("port-str", ("TCP4", ("10.0.0.1", "80"), B4), "port must be an int in 0-65535"),
    ("host-bytes", ("TCP4", (b"10.0.0.1", 80), B4), "address must be a str"),
]


@pytest.mark.parametrize(
    ("args", "message"),
    [case[1:] for case in ENCODE_V1_ERRORS],
    ids=[case[0] for case in ENCODE_V1_ERRORS],
)
def test_encode_v1_rejects(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        encode_v1(*args)  # type: ignore[arg-type]


ENCODE_V2_ERRORS = [
    ("bad-command", {"command": "HEALTH"}, "command must be PROXY or LOCAL"),
    ("bad-family", {"family": "SCTP4"}, "unknown family 'SCTP4'"),
    ("PROXY-UNSPEC", {"family": "UNSPEC"}, "PROXY with UNSPEC"),
    (
        "UNSPEC-with-addresses",
        {"command": "LOCAL", "family": "UNSPEC", "source": A4},
        "UNSPEC carries no addresses",
    ),
    ("no-addresses", {"family": "TCP6", "source": None}, "source must be an (address, port) pair"),
    ("IPv4-for-TCP6", {"family": "TCP6", "source": A4, "destination": B6}, "not a valid IPv6"),
    (
        "unix-str-path",
        {"family": "UNIX_STREAM", "source": "/a", "destination": b"/b"},
        "bytes path",
    ),
    (
        "unix-path-109",
        {"family": "UNIX_STREAM", "source": b"/" * 109, "destination": b"/b"},
        "109 bytes, at most 108",
    ),
    (
        "unix-NUL-inside",
        {"family": "UNIX_DGRAM", "source": b"/a\x00b", "destination": b"/b"},
        "contains NUL",
    ),
    (
        "unix-NUL-at-end",
        {"family": "UNIX_DGRAM", "source": b"\x00ab\x00", "destination": b"/b"},
        "ends with NUL",
    ),
    ("tlv-type-256", {"tlvs": [(256, b"")]}, "TLV type must be an int in 0-255"),
    ("tlv-value-str", {"tlvs": [(PP2_TYPE_ALPN, "h2")]}, "value must be bytes"),
    ("tlv-too-long", {"tlvs": [(PP2_TYPE_NOOP, b"\x00" * 65536)]}, "65536 bytes, at most 65535"),
    ("header-too-long", {"tlvs": [(0xE0, b"\x00" * 40000)] * 2}, "at most 65535"),
    ("crc-tlv-without-flag", {"tlvs": [(PP2_TYPE_CRC32C, b"\x00" * 4)]}, "needs crc32c=True"),
    (
        "crc-tlv-twice",
        {"tlvs": [(PP2_TYPE_CRC32C, b"\x00" * 4)] * 2, "crc32c": True},
        "more than one CRC32C",
    ),
    ("crc-tlv-length-3", {"tlvs": [(PP2_TYPE_CRC32C, b"\x00" * 3)]}, "must be 4"),
    ("unique-id-129", {"tlvs": [(PP2_TYPE_UNIQUE_ID, b"u" * 129)]}, "at most 128"),
    ("authority-not-utf8", {"tlvs": [(PP2_TYPE_AUTHORITY, b"\xff")]}, "not valid UTF-8"),
    ("ssl-too-short", {"tlvs": [(PP2_TYPE_SSL, b"\x01")]}, "needs at least 5"),
]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [case[1:] for case in ENCODE_V2_ERRORS],
    ids=[case[0] for case in ENCODE_V2_ERRORS],
)
def test_encode_v2_rejects(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"source": A4, "destination": B4}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        encode_v2(**arguments)  # type: ignore[arg-type]


def test_encode_rejects_unknown_version() -> None:
    with pytest.raises(ValueError, match="unsupported version 3"):
        encode(ProxyHeader(3, "PROXY", "TCP4", A4, B4, 0))


def test_header_is_frozen_and_hashable() -> None:
    header = parse(VALID["v2-TCP6-TLVs"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.length = 0  # type: ignore[misc]
    assert hash(header) == hash(parse(VALID["v2-TCP6-TLVs"]))


# --- properties ------------------------------------------------------------------------------

ANY_INPUT = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda tail: V2_SIGNATURE + tail),
    st.binary(max_size=120).map(lambda tail: b"PROXY " + tail),
    st.text("0123456789abcdef.: \r\nTCPUNKOW46", max_size=110).map(
        lambda tail: b"PROXY " + tail.encode()
    ),
)


@settings(max_examples=2000)
@given(ANY_INPUT)
def test_parse_returns_a_header_or_raises_proxy_protocol_error(data: bytes) -> None:
    try:
        header = parse(data)
    except IncompleteHeader as exc:
        assert exc.needed >= 1
        return
    except ProxyProtocolError:
        return
    assert header.length <= len(data)
    assert parse(data[: header.length]) == header


def outcome(func: object, data: bytes) -> object:
    try:
        return func(data)  # type: ignore[operator]
    except ProxyProtocolError as exc:
        return type(exc)


@settings(max_examples=1000)
@given(st.text("0123456789. \r\n", max_size=60).map(lambda t: b"PROXY TCP4 " + t.encode()))
def test_v1_tcp4_fast_path_agrees_with_the_full_check(data: bytes) -> None:
    assert outcome(parse, data) == outcome(pp._parse_v1_checked, data)


VERSIONS: list[Literal[4, 6]] = [4, 6]
ENDPOINTS = st.sampled_from(VERSIONS).flatmap(
    lambda v: st.tuples(st.just(f"TCP{v}"), st.ip_addresses(v=v), st.ip_addresses(v=v))
)


@given(st.sampled_from([1, 2]), ENDPOINTS, st.integers(0, 65535), st.integers(0, 65535))
def test_round_trip_property(
    version: int, endpoints: tuple[str, IPAddress, IPAddress], sport: int, dport: int
) -> None:
    family, src, dst = endpoints
    if version == 1:
        data = encode_v1(family, (str(src), sport), (str(dst), dport))
    else:
        data = encode_v2("PROXY", family, (str(src), sport), (str(dst), dport))
    header = parse(data)
    assert header.family == family
    assert header.source is not None
    assert header.destination is not None
    assert (ipaddress.ip_address(header.source[0]), header.source[1]) == (src, sport)
    assert (ipaddress.ip_address(header.destination[0]), header.destination[1]) == (dst, dport)

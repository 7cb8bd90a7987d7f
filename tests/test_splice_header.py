"""The C pre-parser (_splice.parse_header / read_header) against the codec.

It may decline any input (None: the codec decides), but whatever it accepts must be
exactly what mmproxy.proxy_protocol.parse makes of the same bytes; and it must accept
the common forms, or it would spare nothing. Every vector of tests/test_proxy_protocol.py,
every prefix of each, the fuzz corpus, and generated headers go through both.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmproxy import _splice
from mmproxy.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse,
)
from tests import test_proxy_protocol as vectors

CORPUS = Path(__file__).parent / "fuzz" / "corpus" / "proxy_protocol"


def _bytes_in(value: object) -> Iterator[bytes]:
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _bytes_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _bytes_in(item)
    elif hasattr(value, "values") and hasattr(value, "id"):  # pytest.param
        yield from _bytes_in(value.values)


def _vectors() -> list[bytes]:
    found = {data for name in dir(vectors) for data in _bytes_in(getattr(vectors, name))}
    found.update(path.read_bytes() for path in CORPUS.iterdir() if path.is_file())
    return sorted(found)


VECTORS = _vectors()


def agrees(data: bytes) -> tuple[object, ...] | None:
    """Assert the pre-parser's answer is the codec's; return it."""
    fast: tuple[object, ...] | None = _splice.parse_header(data)
    if fast is None:
        return None
    try:
        header = parse(data)
    except ProxyProtocolError as exc:
        raise AssertionError(f"C accepted {data!r}, the codec says {exc}") from None
    assert fast == (
        header.version, header.command, header.family, header.source,
        header.destination, header.length,
    ), data  # fmt: skip
    assert header.tlvs == [] and header.source_path is None
    return fast


def test_there_are_vectors() -> None:
    assert len(VECTORS) > 100


def test_every_vector_and_every_prefix_of_it_agrees() -> None:
    accepted = 0
    for data in VECTORS:
        for end in range(len(data) + 1):
            accepted += agrees(data[:end]) is not None
    assert accepted > 20  # the common forms among them are taken


COMMON = [
    encode_v1("TCP4", ("203.0.113.5", 40000), ("198.51.100.1", 8001)),
    encode_v1("TCP6", ("2001:db8::5", 1), ("2001:db8::1", 65535)),
    b"PROXY TCP6 2001:DB8:0:0::00A1 ::1 1 2\r\n",  # any case and zeros: inet_ntop's spelling
    encode_v2("PROXY", "TCP4", ("203.0.113.5", 0), ("198.51.100.1", 8001)),
    encode_v2("PROXY", "TCP6", ("::ffff:192.0.2.1", 5), ("2001:db8::1", 22)),
    encode_v2("LOCAL", "TCP4", ("198.51.100.7", 1), ("198.51.100.1", 2)),
]


@pytest.mark.parametrize("data", COMMON)
def test_the_common_forms_are_taken(data: bytes) -> None:
    assert agrees(data + b"early bytes") is not None


DECLINED = [
    b"PROXY UNKNOWN\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",  # incomplete
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n",  # dotted tail
    b"PROXY TCP6 :1:: ::1 1 2\r\n",
    b"PROXY TCP6 1:::2 ::1 1 2\r\n",
    b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    b"PROXY TCP6 12345:: ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    encode_v2("PROXY", "TCP4", ("1.2.3.4", 1), ("5.6.7.8", 2), [(0x05, b"id")]),  # TLVs
    encode_v2("PROXY", "UDP4", ("1.2.3.4", 1), ("5.6.7.8", 2)),
    encode_v2("PROXY", "TCP4", ("1.2.3.4", 1), ("5.6.7.8", 2))[:20],
]


@pytest.mark.parametrize("data", DECLINED)
def test_what_it_does_not_take_goes_to_the_codec(data: bytes) -> None:
    assert _splice.parse_header(data) is None


_v1_token = st.text(alphabet="0123456789abcdefABCDEF:.", min_size=0, max_size=42)


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from(["TCP4", "TCP6"]),
    _v1_token, _v1_token,
    st.text(alphabet="0123456789+-", max_size=6), st.text(alphabet="0123456789", max_size=6),
    st.sampled_from(["\r\n", "\r", "\n", " \r\n", ""]),
)  # fmt: skip
def test_generated_v1_lines_agree(
    protocol: str, src: str, dst: str, sport: str, dport: str, end: str
) -> None:
    agrees(f"PROXY {protocol} {src} {dst} {sport} {dport}{end}".encode())


@settings(max_examples=3000, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 80), st.binary(max_size=100))
def test_generated_v2_headers_agree(command: int, family: int, length: int, rest: bytes) -> None:
    data = V2_SIGNATURE + bytes([command, family]) + length.to_bytes(2, "big") + rest
    agrees(data)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(VECTORS), st.binary(max_size=3), st.integers(0, 120))
def test_mutated_vectors_agree(data: bytes, insert: bytes, at: int) -> None:
    agrees(data[:at] + insert + data[at + len(insert) :])


def test_read_header_reads_and_pre_parses() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.sendall(COMMON[0] + b"hello")
        data, header = _splice.read_header(a.fileno(), 4096)
        assert data == COMMON[0] + b"hello"
        assert header == agrees(data)
        with pytest.raises(BlockingIOError):
            _splice.read_header(a.fileno(), 4096)
        b.sendall(b"PROXY TCP4 1.2")
        assert _splice.read_header(a.fileno(), 4096) == (b"PROXY TCP4 1.2", None)
        b.close()
        assert _splice.read_header(a.fileno(), 4096) == (b"", None)


def test_read_header_refuses_a_size_beyond_its_buffer() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError):
            _splice.read_header(r, 1 << 20)
    finally:
        os.close(r)
        os.close(w)


def test_a_value_matches_the_codecs_header_fields() -> None:
    fields = ProxyHeader.__dataclass_fields__
    assert list(fields)[:6] == ["version", "command", "family", "source", "destination", "length"]

"""Properties over generated inputs (hypothesis): the codec and the config loader never
fail any other way than with their own error, and headers stream byte by byte."""

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mmproxy.config import KEYS, ConfigError, load_config
from mmproxy.proxy_protocol import V2_SIGNATURE, IncompleteHeader, encode_v1, encode_v2, parse

ports = st.integers(0, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
tlvs = st.lists(
    st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05, 0xE0]), st.binary(max_size=40)).map(
        lambda t: (t[0], t[1].hex().encode()[:100])  # ASCII: valid for AUTHORITY too
    ),
    max_size=4,
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from(["TCP4", "TCP6"]))
    host = ipv4 if family == "TCP4" else ipv6
    source, destination = (draw(host), draw(ports)), (draw(host), draw(ports))
    if draw(st.booleans()):
        return encode_v1(family, source, destination)
    return encode_v2("PROXY", family, source, destination, draw(tlvs), crc32c=draw(st.booleans()))


@given(headers(), st.binary(max_size=64))
def test_a_header_consumes_exactly_its_length(header: bytes, after: bytes) -> None:
    parsed = parse(header + after)
    assert parsed.length == len(header)
    assert parse(header) == parsed


@given(headers())
def test_every_prefix_of_a_header_is_incomplete(header: bytes) -> None:
    for end in range(len(header)):
        try:
            parse(header[:end])
        except IncompleteHeader as exc:
            assert exc.needed >= 1
        else:
            raise AssertionError(f"a {end}-byte prefix parsed")


@given(st.integers(0, 255), st.binary(max_size=300), st.binary(max_size=32))
def test_any_v2_local_header_is_accepted_whole(family: int, block: bytes, after: bytes) -> None:
    # The spec: under LOCAL the family and the block are ignored, whatever they hold.
    header = V2_SIGNATURE + bytes((0x20, family)) + len(block).to_bytes(2, "big") + block
    parsed = parse(header + after)
    assert (parsed.command, parsed.length, parsed.source) == ("LOCAL", len(header), None)
    for end in range(len(header)):
        try:
            parse(header[:end])
        except IncompleteHeader as exc:
            assert 1 <= exc.needed <= len(header) - end
        else:
            raise AssertionError(f"a {end}-byte prefix parsed")


@given(st.binary(min_size=0, max_size=3))
def test_a_v2_prefix_under_16_bytes_is_incomplete(tail: bytes) -> None:
    with_tail = V2_SIGNATURE + tail
    try:
        parse(with_tail)
    except IncompleteHeader as exc:
        assert exc.needed == 16 - len(with_tail)
    else:
        raise AssertionError("a short v2 prefix parsed")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["0.0.0.0:2222", "[::1]:22", "127.0.0.1:22", "192.0.2.0/24", "5s", "x"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(), scalars))
key_names = st.sampled_from([k.name for k in KEYS] + ["unknown_key"])
_CONFIG = Path(tempfile.mkdtemp(prefix="mmproxy-properties-")) / "instance.yaml"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(key_names, values, max_size=8))
def test_any_mapping_loads_or_says_what_is_wrong(mapping: dict[str, object]) -> None:
    _CONFIG.write_text(yaml.safe_dump(mapping))
    try:
        load_config(str(_CONFIG))
    except ConfigError as exc:
        assert str(exc).startswith(str(_CONFIG))  # names the file (and line, key)

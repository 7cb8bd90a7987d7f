"""Differential fuzzing of the C pre-parser (_splice.parse_header) against the codec.

Whatever the C code accepts must be exactly the codec's header; it may decline anything.
The codec is instrumented, so inputs that reach new branches of the grammar are kept.
    python tests/fuzz/fuzz_header_c.py -runs=1000000 tests/fuzz/corpus/proxy_protocol
"""

import sys

import atheris

with atheris.instrument_imports():
    from mmproxy.proxy_protocol import ProxyProtocolError, parse

from mmproxy._splice import parse_header


def test_one(data: bytes) -> None:
    fast = parse_header(data)
    try:
        header = parse(data)
    except ProxyProtocolError:
        assert fast is None, (data, fast)
        return
    if fast is not None:
        assert not header.tlvs, data
        expected = (header.version, header.command, header.family, header.source,
                    header.destination, header.length)  # fmt: skip
        assert fast == expected, (data, fast, expected)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()

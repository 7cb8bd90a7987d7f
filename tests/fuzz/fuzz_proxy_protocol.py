"""Coverage-guided fuzzing of the PROXY protocol codec (atheris).

Any bytes either parse or raise ProxyProtocolError; a parsed header occupies exactly
`length` bytes, and re-encoding it parses to the same header.
    python tests/fuzz/fuzz_proxy_protocol.py -runs=1000000 tests/fuzz/corpus/proxy_protocol
"""

import sys

import atheris

with atheris.instrument_imports():
    from mmproxy.proxy_protocol import ProxyProtocolError, encode, parse


def test_one(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    assert 0 < header.length <= len(data)
    assert parse(data[: header.length]) == header
    again = parse(encode(header))
    assert (again.family, again.source, again.destination) == (
        header.family,
        header.source,
        header.destination,
    )


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()

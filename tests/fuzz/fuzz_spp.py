"""Coverage-guided fuzzing of the Simple Proxy Protocol codec (atheris).

Any bytes either parse or raise SppError; a parsed header is rebuilt to the same 38 bytes.
    python tests/fuzz/fuzz_spp.py -runs=1000000 tests/fuzz/corpus/spp
"""

import sys

import atheris

with atheris.instrument_imports():
    from mmproxy.spp import HEADER_SIZE, SppError, build, parse


def test_one(data: bytes) -> None:
    try:
        header = parse(data)
    except SppError:
        return
    assert build(header.client, header.proxy) == data[:HEADER_SIZE]


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()

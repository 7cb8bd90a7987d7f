"""Coverage-guided fuzzing of the configuration loader (atheris).

Any file content either loads or raises ConfigError (file, line, key): never another
exception.
    python tests/fuzz/fuzz_config.py -runs=1000000 tests/fuzz/corpus/config
"""

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from mmproxy.config import ConfigError, load_config

PATH = os.path.join(tempfile.mkdtemp(prefix="fuzz-config-"), "fuzz.yaml")


def test_one(data: bytes) -> None:
    with open(PATH, "wb") as out:
        out.write(data)
    try:
        load_config(PATH)
    except ConfigError as exc:
        assert str(exc).startswith(PATH)  # every error says where


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()

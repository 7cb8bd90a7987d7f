"""A short run of each coverage-guided fuzzer (`make fuzz` runs 1,000,000 each)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"


@pytest.mark.parametrize(
    ("target", "runs", "seeds"),
    [
        ("proxy_protocol", 30000, "proxy_protocol"),
        ("config", 2000, "config"),
        ("spp", 20000, "spp"),
        ("header_c", 30000, "proxy_protocol"),  # the C pre-parser, against the codec
        ("udp_engine", 20000, "udp_engine"),
    ],
)
def test_fuzzer_finds_no_crash(tmp_path: Path, target: str, runs: int, seeds: str) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / seeds, corpus)  # the short run must not grow the tree
    proc = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-runs={runs}", "-max_len=1024",
         str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done {runs} runs" in proc.stderr

"""`make demo` is the README's first command: it must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_shows_the_real_client_addresses() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmproxy.demo", "etc/mmproxy/example.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "application saw 203.0.113.7:51234, got hello" in proc.stdout
    assert "application saw [2001:db8::7]:51235, got hello" in proc.stdout
    assert "demo OK" in proc.stdout

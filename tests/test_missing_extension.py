"""Without the C part (mmproxy._splice did not build, or cannot be loaded), the commands
that do not relay still work, and the ones that do say plainly what is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "etc/mmproxy/example.yaml"

# sys.modules[name] = None makes every import of the module fail, as a missing file does.
WITHOUT_C = """\
import sys
sys.modules["mmproxy._splice"] = None
from mmproxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def mmproxy_without_c(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_C, *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip


def test_version_and_help_work_without_the_c_part() -> None:
    version = mmproxy_without_c("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("mmproxy ")
    for args in (["--help"], ["check", "--help"], ["routing", "--help"]):
        proc = mmproxy_without_c(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: mmproxy"), proc.stdout


def test_the_configuration_is_still_checked_without_the_c_part(tmp_path: Path) -> None:
    proc = mmproxy_without_c("check", "-c", str(EXAMPLE))
    assert f"configuration {EXAMPLE}: valid" in proc.stdout
    assert "the self-checks need it: the C extension mmproxy._splice" in proc.stderr
    assert proc.returncode == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text('listen: "127.0.0.1:2222"\nipv4: "127.0.0.1:22"\nmark: -1\n')
    proc = mmproxy_without_c("check", "-c", str(bad))
    assert proc.returncode == 78, proc.stdout + proc.stderr  # the file's error comes first
    assert "bad.yaml" in proc.stderr


@pytest.mark.parametrize("command", ["run", "check", "routing"])
def test_commands_that_need_the_c_part_say_what_is_missing(command: str) -> None:
    args = ["-c", str(EXAMPLE)]
    if command == "routing":
        args = ["up", *args]
    proc = mmproxy_without_c(command, *args)
    assert proc.returncode == 1
    assert f"mmproxy {command}: cannot run:" in proc.stderr, proc.stderr
    assert "mmproxy._splice" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr

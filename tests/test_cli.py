"""The command line: the original mmproxy's flags, and errors before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmproxy.address import Address
from mmproxy.cli import EX_CONFIG, build_parser, overrides_from
from mmproxy.config import load_config


def config_from(argv: list[str]):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(argv)
    return load_config(args.config, overrides_from(args))


def test_the_original_command_line_works_verbatim(tmp_path: Path) -> None:
    networks = tmp_path / "allowed-networks.txt"
    networks.write_text("0.0.0.0/0\n::/0\n")
    config = config_from(
        ["--allowed-networks", str(networks), "-l", "0.0.0.0:2222",
         "-4", "127.0.0.1:22", "-6", "[::1]:22"]
    )  # fmt: skip
    assert config.listen == (Address("0.0.0.0", 2222),)
    assert config.ipv4 == Address("127.0.0.1", 22)
    assert config.ipv6 == Address("::1", 22)
    assert len(config.allowed_networks) == 2


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(
        'listen: "0.0.0.0:2222"\nipv4: "127.0.0.1:22"\nallowed_networks: ["192.0.2.0/24"]\n'
        "mark: 5\n"
    )
    config = config_from(["-c", str(path), "--mark", "9", "-l", "127.0.0.1:3333", "-v"])
    assert config.mark == 9
    assert config.listen == (Address("127.0.0.1", 3333),)
    assert config.log_level == "debug"


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmproxy", *argv], capture_output=True, text=True, timeout=30
    )


def test_a_bad_config_refuses_to_start_with_the_place_at_fault(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('listen: "0.0.0.0:2222"\nipv4: "127.0.0.1:22"\nmark: abc\n')
    proc = run_cli("-c", str(path))
    assert proc.returncode == EX_CONFIG
    assert f"{path}:3" in proc.stderr and "mark" in proc.stderr


def test_no_allowed_networks_is_refused() -> None:
    proc = run_cli("-l", "127.0.0.1:2222", "-4", "127.0.0.1:22")
    assert proc.returncode == EX_CONFIG
    assert "0.0.0.0/0" in proc.stderr  # the message says how to allow everyone explicitly


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version(flag: str) -> None:
    proc = run_cli(flag)
    assert proc.returncode == 0 and "mmproxy" in proc.stdout


def test_the_collector_the_installed_script_disables_runs_again(tmp_path: Path) -> None:
    """/usr/bin/mmproxy disables the cyclic garbage collector for the start-up's imports
    (issue 15); every command enables it again (`run` once its imports are done)."""
    config = tmp_path / "bad.yaml"
    config.write_text("listen: [\n")
    script = (
        "import gc, sys; gc.disable(); from mmproxy.cli import main; "
        "status = main(sys.argv[1:]); print(gc.isenabled(), status)"
    )
    for command in (["check", "-c", str(config)], ["routing", "down", "-c", str(config)]):
        proc = subprocess.run(
            [sys.executable, "-c", script, *command],
            capture_output=True, text=True, check=False, timeout=60,
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                 "MMPROXY_RUNTIME_DIR": str(tmp_path / "run")},
        )  # fmt: skip
        assert proc.stdout.split()[0] == "True", (command, proc.stdout, proc.stderr)

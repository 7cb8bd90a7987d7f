"""Configuration files read as root and at boot (issue 11, item 9): the loader refuses
aliases, deep nesting, files over 1 MiB and anything but a regular file; the generator
goes on past a bad file; `mmproxy routing` reads only its keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmproxy.cli import EX_CONFIG
from mmproxy.config import ConfigError, load_config
from mmproxy.generator import generate
from mmproxy.networks import NetworkError, read_networks_file

GOOD = 'listen: "127.0.0.1:2222"\nipv4: "127.0.0.1:22"\nallowed_networks: "198.51.100.0/24"\n'

# Nine levels of ten: 10**9 strings once expanded. With aliases refused it costs nothing;
# expanded, it would take the memory of the machine.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def refused(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return caught.value


def test_an_alias_is_refused_with_its_line(tmp_path: Path) -> None:
    error = refused(write(tmp_path / "x.yaml", GOOD + "base: &net 198.51.100.0/24\n"
                          "allowed_networks_file: *net\n"))  # fmt: skip
    assert (error.path, error.line) == (str(tmp_path / "x.yaml"), 5)
    assert "aliases (*net) are not allowed" in str(error)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    error = refused(write(tmp_path / "x.yaml", BOMB + "listen: *i\n"))
    assert error.line == 2 and "aliases (*a) are not allowed" in str(error)


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    error = refused(write(tmp_path / "x.yaml", "listen: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert error.line == 1 and "nested more than 16 levels deep" in str(error)


def test_a_file_over_1_mib_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", GOOD + "#" * (1 << 20) + "\n")
    assert str(refused(path)) == (
        f"{path}: cannot read the configuration file: larger than 1 MiB, the most mmproxy reads"
    )
    with pytest.raises(NetworkError, match="larger than 1 MiB"):
        read_networks_file(str(write(tmp_path / "n.txt", "# " + "x" * (1 << 20) + "\n")))


LOAD = """
import sys
from mmproxy.config import ConfigError, load_config
try:
    load_config(sys.argv[1])
except ConfigError as exc:
    print(exc)
"""


def load_in_child(path: Path) -> str:
    """load_config in a child process: the old loader waited forever for a FIFO's writer."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_config({path}) still waiting after 60 s")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert load_in_child(fifo) == (
        f"{fifo}: cannot read the configuration file: expected a regular file, got a named "
        "pipe (FIFO)"
    )
    path = write(tmp_path / "x.yaml", GOOD + f"allowed_networks_file: {fifo}\n")
    assert "got a named pipe (FIFO)" in load_in_child(path)
    path = write(tmp_path / "z.yaml", GOOD + "allowed_networks_file: /dev/zero\n")
    assert "got a character device" in load_in_child(path)


def test_the_generator_goes_on_past_a_file_it_cannot_use(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc / "a-deep.yaml", "listen: " + "[" * 5000 + "]" * 5000 + "\n")
    write(etc / "b-bomb.yaml", BOMB + "listen: *i\n")
    write(etc / "c-big.yaml", GOOD + "#" * (1 << 20) + "\n")
    write(etc / "d-alias.yaml", 'x: &l "127.0.0.1:2222"\nlisten: *l\n')
    write(etc / "z-good.yaml", GOOD)
    problems = generate(etc, out)
    assert [p.split(":")[0].rsplit("/", 1)[1] for p in problems] == [
        "a-deep.yaml", "b-bomb.yaml", "c-big.yaml", "d-alias.yaml"
    ]  # fmt: skip
    assert all("gets no listen address" in p for p in problems)
    assert (out / "mmproxy@z-good.socket.d" / "50-listen.conf").exists()


def test_the_generator_skips_a_fifo(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    os.mkfifo(etc / "a.yaml")
    write(etc / "b.yaml", GOOD)
    code = "import sys; from pathlib import Path; from mmproxy.generator import generate; " \
        "print(generate(Path(sys.argv[1]), Path(sys.argv[2])))"  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(etc), str(out)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the generator still waits for the FIFO after 60 s")
    assert "got a named pipe (FIFO)" in proc.stdout
    assert (out / "mmproxy@b.socket.d" / "50-listen.conf").exists()


def routing_up(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmproxy", "routing", "up", *argv],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["key", "flag"])
def test_the_routing_helper_never_shows_lines_of_other_files(tmp_path: Path, how: str) -> None:
    """`mmproxy routing up` runs as root: naming /etc/passwd as the networks file, in the
    file or with --allowed-networks, must not make it print a line of that file."""
    secret = write(tmp_path / "secret", "root:x:0:0:root:/root:/bin/bash\n")
    # check_failure: warn: the host checks that follow find no routing on this machine.
    text = "manage_routing: false\ncheck_failure: warn\n" + GOOD
    extra: list[str] = []
    if how == "key":
        text += f"allowed_networks_file: {secret}\n"
    else:
        extra = ["--allowed-networks", str(secret)]
    proc = routing_up("-c", str(write(tmp_path / "x.yaml", text)), *extra)
    assert "root:x:0:0" not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "manage_routing is false" in proc.stdout


def test_the_routing_helper_still_checks_its_own_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", GOOD + "mark: lots\n")
    proc = routing_up("-c", str(path))
    assert proc.returncode == EX_CONFIG
    assert f"{path}:4: mark:" in proc.stderr


# --------------------------------------------------------------------------
# follow_destination_port needs its list of ports (issue 11, item 8)


def test_follow_destination_port_without_a_port_list_refuses_to_start(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", GOOD + "follow_destination_port: true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mmproxy", "-c", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == EX_CONFIG
    assert proc.stderr.startswith(f"mmproxy: {path}:4: follow_destination_port: true lets ")
    assert "allowed_destination_ports" in proc.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("443", ((443, 443),)),
        ('[80, 443, "8000-8099", 8050]', ((80, 80), (443, 443), (8000, 8099), (8050, 8050))),
        ("[8000-8099, 22]", ((22, 22), (8000, 8099))),
        ('" 1 - 65535 "', ((1, 65535),)),
    ],
)
def test_allowed_destination_ports(
    tmp_path: Path, value: str, expected: tuple[tuple[int, int], ...]
) -> None:
    text = GOOD + f"follow_destination_port: true\nallowed_destination_ports: {value}\n"
    config = load_config(str(write(tmp_path / "x.yaml", text)))
    assert config.allowed_destination_ports == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0", "expected an integer from 1 to 65535, got 0"),
        ("65536", "got 65536"),
        ('"9000-8000"', "'9000-8000': expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535"),
        ("[80, http]", "got 'http'"),
        ("[]", "empty list"),
        ("true", "got true"),
        ("1:30", "base-60"),
    ],
)
def test_allowed_destination_ports_refused(tmp_path: Path, value: str, fragment: str) -> None:
    text = GOOD + f"follow_destination_port: true\nallowed_destination_ports: {value}\n"
    error = refused(write(tmp_path / "x.yaml", text))
    assert str(error).startswith(f"{tmp_path / 'x.yaml'}:5: allowed_destination_ports: ")
    assert fragment in str(error)


def test_allowed_destination_ports_alone_is_refused(tmp_path: Path) -> None:
    error = refused(write(tmp_path / "x.yaml", GOOD + "allowed_destination_ports: [80]\n"))
    assert (error.line, error.key) == (4, "allowed_destination_ports")
    assert "no effect without follow_destination_port: true" in str(error)

"""`listen:` port ranges (issue 13): "0.0.0.0:27015-27030" is one address per port, in
the file and on the command line, capped at MAX_LISTEN_RANGE ports per range."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmproxy.address import MAX_LISTEN_RANGE, Address
from mmproxy.cli import build_parser, overrides_from
from mmproxy.config import (
    ConfigError,
    load_config,
    parse_address,
    parse_listen,
)

TARGET = 'ipv4: "127.0.0.1:22"\nallowed_networks: ["192.0.2.0/24"]\n'


def load(tmp_path: Path, listen: str, *flags: str) -> tuple[Address, ...]:
    path = tmp_path / "game.yaml"
    path.write_text(f"{TARGET}listen: {listen}\n")
    args = build_parser().parse_args(["-c", str(path), *flags])
    return load_config(str(path), overrides_from(args)).listen


def error(tmp_path: Path, listen: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, listen)
    return caught.value


def test_a_range_is_one_address_per_port(tmp_path: Path) -> None:
    listen = load(tmp_path, '"0.0.0.0:27015-27030"')
    assert listen == tuple(Address("0.0.0.0", port) for port in range(27015, 27031))


def test_udp_ipv6_range_beside_a_single_address(tmp_path: Path) -> None:
    listen = load(tmp_path, '["udp://[::]:7000-7010", "0.0.0.0:2222"]')
    assert listen[:11] == tuple(Address("::", port, "udp") for port in range(7000, 7011))
    assert listen[11:] == (Address("0.0.0.0", 2222),)


def test_the_command_line_expands_a_range(tmp_path: Path) -> None:
    listen = load(tmp_path, '"0.0.0.0:1"', "-l", "[::1]:7000-7002", "-l", "127.0.0.1:9")
    assert [str(a) for a in listen] == ["[::1]:7000", "[::1]:7001", "[::1]:7002", "127.0.0.1:9"]


def test_a_one_port_range_and_the_cap(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:5-5") == (Address("127.0.0.1", 5),)
    last = 10000 + MAX_LISTEN_RANGE - 1
    assert len(parse_listen(f"0.0.0.0:10000-{last}")) == MAX_LISTEN_RANGE == 1024


def test_past_the_cap_points_to_tproxy(tmp_path: Path) -> None:
    caught = error(tmp_path, '"0.0.0.0:10000-11024"')
    assert (caught.key, caught.line) == ("listen", 3)
    assert "has 1025 ports, at most 1024" in str(caught)
    assert "TPROXY" in str(caught)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ('"0.0.0.0:27030-27015"', "runs backwards; write 27015-27030"),
        ('"0.0.0.0:27015-"', "expected FIRST-LAST"),
        ('"0.0.0.0:1-2-3"', "expected FIRST-LAST"),
        ('"0.0.0.0:0-5"', "port 0 is out of range"),
        ('"0.0.0.0:65535-65536"', "port 65536 is out of range"),
        ('"0.0.0.0:07-9"', "leading zero"),
        ('"0.0.0.0:a-9"', "is not a number"),
        ('"localhost:1-2"', "host names are not resolved"),
    ],
    ids=["backwards", "open-end", "three-parts", "port-0", "above-65535", "zero", "letter", "name"],
)
def test_bad_range_names_the_problem(tmp_path: Path, listen: str, message: str) -> None:
    caught = error(tmp_path, listen)
    assert caught.key == "listen"
    assert message in str(caught)


def test_overlapping_ranges_name_the_port_and_line(tmp_path: Path) -> None:
    caught = error(tmp_path, '\n  - "0.0.0.0:100-110"\n  - "0.0.0.0:110-120"')
    assert "0.0.0.0:110 is listed twice (also on line 4)" in str(caught)
    assert caught.line == 5


def test_the_same_range_over_tcp_and_udp_is_no_overlap(tmp_path: Path) -> None:
    listen = load(tmp_path, '["0.0.0.0:100-101", "udp://0.0.0.0:100-101"]')
    assert [a.transport for a in listen] == ["tcp", "tcp", "udp", "udp"]


@pytest.mark.parametrize("what", ["ipv4", "ipv6"])
def test_a_target_takes_no_range(what: str) -> None:
    host = "127.0.0.1" if what == "ipv4" else "[::1]"
    with pytest.raises(ConfigError, match=r"a port range .* is only allowed in `listen`"):
        parse_address(f"{host}:22-23", what=what)

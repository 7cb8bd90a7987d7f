from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

import pytest

from mmproxy.networks import AllowedNetworks, NetworkError, parse_network, read_networks_file

# --------------------------------------------------------------------------
# parse_network


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("192.0.2.0/24", IPv4Network("192.0.2.0/24"), id="ipv4-cidr"),
        pytest.param("2001:db8::/32", IPv6Network("2001:db8::/32"), id="ipv6-cidr"),
        pytest.param("192.0.2.7", IPv4Network("192.0.2.7/32"), id="bare-ipv4-is-/32"),
        pytest.param("2001:db8::1", IPv6Network("2001:db8::1/128"), id="bare-ipv6-is-/128"),
        pytest.param("  10.0.0.0/8\t", IPv4Network("10.0.0.0/8"), id="surrounding-space"),
        pytest.param("0.0.0.0/0", IPv4Network("0.0.0.0/0"), id="all-ipv4"),
        pytest.param("::/0", IPv6Network("::/0"), id="all-ipv6"),
        pytest.param("2001:DB8::/32", IPv6Network("2001:db8::/32"), id="upper-case-ipv6"),
    ],
)
def test_parse_network_accepts(text: str, expected: IPv4Network | IPv6Network) -> None:
    assert parse_network(text) == expected


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        pytest.param("192.0.2.1/24", "192.0.2.1/24 has host bits set; write 192.0.2.0/24", id="v4"),
        pytest.param("10.1.2.3/8", "write 10.0.0.0/8 (or 10.1.2.3/32", id="v4-single-hint"),
        pytest.param("2001:db8::1/32", "write 2001:db8::/32", id="v6"),
    ],
)
def test_parse_network_host_bits_names_the_fix(text: str, fix: str) -> None:
    with pytest.raises(NetworkError, match="host bits set") as caught:
        parse_network(text)
    assert fix in str(caught.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "got an empty value", id="empty"),
        pytest.param("   ", "got an empty value", id="blank"),
        pytest.param("localhost", "host names are not allowed", id="hostname"),
        pytest.param("10.0.0.0/33", "from 0 to 32 for IPv4", id="v4-prefix-too-long"),
        pytest.param("::/129", "from 0 to 128 for IPv6", id="v6-prefix-too-long"),
        pytest.param("10.0.0.0/", "prefix length", id="missing-prefix"),
        pytest.param("10.0.0.300/8", "Octet 300", id="octet-out-of-range"),
        pytest.param("010.0.0.0/8", "Leading zeros", id="leading-zero"),
        pytest.param("10.0.0/8", "Expected 4 octets", id="three-octets"),
        pytest.param("10.0.0.0/8 10.1.0.0/16", "one network per entry", id="two-on-a-line"),
        pytest.param("10.0.0.0/8,10.1.0.0/16", "one network per entry", id="comma-separated"),
        pytest.param("fe80::/10%eth0", "zone indexes", id="zone-index"),
    ],
)
def test_parse_network_rejects_garbage_saying_what_was_expected(text: str, fragment: str) -> None:
    with pytest.raises(NetworkError) as caught:
        parse_network(text)
    message = str(caught.value)
    assert "expected a network in CIDR form like 192.0.2.0/24" in message
    assert fragment in message


def test_network_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_network("nope")


# --------------------------------------------------------------------------
# read_networks_file


def write(tmp_path: Path, text: str, name: str = "allowed.txt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_networks_file_cloudflare_format(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# load balancers\n"
        "10.0.0.0/8\n"
        "\n"
        "   192.0.2.0/24   # trailing comment\n"
        "\t2001:db8::/32\t\n"
        "    # indented comment\n"
        "198.51.100.7\n",
    )
    assert read_networks_file(path) == [
        (2, ip_network("10.0.0.0/8")),
        (4, ip_network("192.0.2.0/24")),
        (5, ip_network("2001:db8::/32")),
        (7, ip_network("198.51.100.7/32")),
    ]


def test_read_networks_file_empty_file_is_empty(tmp_path: Path) -> None:
    assert read_networks_file(write(tmp_path, "# nothing yet\n\n")) == []


def test_read_networks_file_keeps_duplicates_with_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "10.0.0.0/8\n10.0.0.0/8\n")
    assert [line for line, _ in read_networks_file(path)] == [1, 2]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        pytest.param("10.0.0.0/8\n192.0.2.1/24\n", 2, "write 192.0.2.0/24", id="host-bits"),
        pytest.param("# c\n\nbalancer.example\n", 3, "host names are not allowed", id="name"),
        pytest.param("10.0.0.0/8 10.2.0.0/16\n", 1, "one network per entry", id="two"),
        pytest.param("10.0.0.0/8\r\n10.0.0.0/40\r\n", 2, "from 0 to 32", id="crlf-bad"),
    ],
)
def test_read_networks_file_bad_line_is_an_error_with_path_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(NetworkError) as caught:
        read_networks_file(path)
    error = caught.value
    assert str(error).startswith(f"{path}:{line}: ")
    assert fragment in str(error)
    assert (error.path, error.line) == (path, line)
    assert fragment in error.detail
    assert path not in error.detail


def test_read_networks_file_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.txt")
    with pytest.raises(NetworkError) as caught:
        read_networks_file(path)
    assert str(caught.value) == (
        f"{path}: cannot read the allowed networks file: No such file or directory"
    )
    assert caught.value.line is None


def test_read_networks_file_directory(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match="expected a regular file, got a directory") as caught:
        read_networks_file(str(tmp_path))
    assert str(caught.value).startswith(f"{tmp_path}: ")


def test_read_networks_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_bytes(b"10.0.0.0/8\n\xff\xfe\n")
    with pytest.raises(NetworkError, match="not a UTF-8 text file") as caught:
        read_networks_file(str(path))
    assert str(path) in str(caught.value)


# --------------------------------------------------------------------------
# AllowedNetworks


@pytest.fixture
def allowed() -> AllowedNetworks:
    return AllowedNetworks(
        parse_network(text) for text in ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "fe80::/10")
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        pytest.param("10.1.2.3", True, id="v4-inside"),
        pytest.param("10.255.255.255", True, id="v4-last"),
        pytest.param("11.0.0.0", False, id="v4-outside"),
        pytest.param("192.0.2.7", True, id="v4-single-host"),
        pytest.param("192.0.2.8", False, id="v4-next-to-single-host"),
        pytest.param("2001:db8::1", True, id="v6-inside"),
        pytest.param("2001:db9::1", False, id="v6-outside"),
        pytest.param("::ffff:10.1.2.3", True, id="mapped-inside"),
        pytest.param("::ffff:11.1.2.3", False, id="mapped-outside"),
        pytest.param("::FFFF:10.1.2.3", True, id="mapped-upper-case"),
        pytest.param("::ffff:a01:203", True, id="mapped-hex-form"),
        pytest.param("::ffff:b01:203", False, id="mapped-hex-form-outside"),
        pytest.param("fe80::1%eth0", True, id="link-local-with-zone"),
        pytest.param("fe80::1", True, id="link-local"),
        pytest.param("", False, id="empty-string"),
        pytest.param("garbage", False, id="garbage"),
        pytest.param("10.1.2.3%eth0", False, id="v4-with-zone"),
        pytest.param("10.1.2", False, id="short-v4"),
    ],
)
def test_allowed_contains(allowed: AllowedNetworks, address: str, expected: bool) -> None:
    assert (address in allowed) is expected


@pytest.mark.parametrize(
    ("networks", "address"),
    [
        # A single 128-bit trie compares raw bits: 10.0.0.0/8 would match 0a00::/8.
        pytest.param(["10.0.0.0/8"], "a00::1", id="v4-net-vs-v6-address"),
        pytest.param(["2001:db8::/32"], "32.1.13.184", id="v6-net-vs-v4-address"),
        pytest.param(["0.0.0.0/0"], "::1", id="all-v4-vs-v6-loopback"),
        pytest.param(["0.0.0.0/0"], "2001:db8::1", id="all-v4-vs-v6"),
        pytest.param(["::/0"], "10.1.2.3", id="all-v6-vs-v4"),
        # A mapped address is an IPv4 client: ::/0 must not let it in.
        pytest.param(["::/0"], "::ffff:10.1.2.3", id="all-v6-vs-mapped"),
    ],
)
def test_allowed_families_do_not_leak(networks: list[str], address: str) -> None:
    assert address not in AllowedNetworks(parse_network(text) for text in networks)


def test_allowed_everyone_when_written_explicitly() -> None:
    everyone = AllowedNetworks([parse_network("0.0.0.0/0"), parse_network("::/0")])
    for address in ("10.1.2.3", "::1", "::ffff:192.0.2.1", "2001:db8::1"):
        assert address in everyone


def test_allowed_mapped_network_written_in_ipv6_form_matches_ipv4() -> None:
    allowed = AllowedNetworks([parse_network("::ffff:192.0.2.0/120")])
    assert "192.0.2.9" in allowed
    assert "::ffff:192.0.2.9" in allowed
    assert "192.0.3.9" not in allowed


def test_allowed_len_networks_and_dedup(allowed: AllowedNetworks) -> None:
    assert len(allowed) == 4
    assert allowed.networks == (
        ip_network("10.0.0.0/8"),
        ip_network("192.0.2.7/32"),
        ip_network("2001:db8::/32"),
        ip_network("fe80::/10"),
    )
    twice = AllowedNetworks([ip_network("10.0.0.0/8"), ip_network("10.0.0.0/8")])
    assert len(twice) == 1
    assert "10.0.0.0/8" in repr(allowed)


def test_allowed_empty_allows_nobody() -> None:
    nobody = AllowedNetworks([])
    assert len(nobody) == 0
    assert not nobody
    assert nobody.networks == ()
    assert "10.1.2.3" not in nobody
    assert "::1" not in nobody


def test_allowed_accepts_a_generator_once() -> None:
    allowed = AllowedNetworks(ip_network(text) for text in ("10.0.0.0/8",))
    assert "10.0.0.1" in allowed
    assert len(allowed) == 1


def test_allowed_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "10.0.0.0/8\n2001:db8::/32\n")
    allowed = AllowedNetworks(network for _, network in read_networks_file(path))
    assert "10.9.9.9" in allowed
    assert "2001:db8::9" in allowed
    assert os.path.exists(path)

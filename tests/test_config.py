from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import tempfile
from ipaddress import ip_network
from pathlib import Path

import pytest

from mmproxy.address import Address
from mmproxy.config import (
    KEYS,
    Config,
    ConfigError,
    Override,
    load_config,
    parse_address,
)
from mmproxy.networks import AllowedNetworks
from tests.readable import copy_for_others
from tests.support import needs_root

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mmproxy" / "example.yaml"

# The smallest valid configuration; tests replace one key and append it last,
# so the key under test is always on the file's last line.
BASE = {
    "listen": '"0.0.0.0:2222"',
    "ipv4": '"127.0.0.1:22"',
    "allowed_networks": '["192.0.2.0/24"]',
}


def write(tmp_path: Path, text: str, name: str = "mmproxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_text(key: str | None = None, value: str | None = None) -> str:
    lines = [f"{name}: {text}" for name, text in BASE.items() if name != key]
    if key is not None and value is not None:
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


def load_text(tmp_path: Path, text: str, overrides: tuple[Override, ...] = ()) -> Config:
    return load_config(write(tmp_path, text), overrides)


def load_error(tmp_path: Path, text: str, overrides: tuple[Override, ...] = ()) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value


def last_line(text: str) -> int:
    return len(text.splitlines())


# --------------------------------------------------------------------------
# Every key: accepted values


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        pytest.param("listen", '"0.0.0.0:2222"', (Address("0.0.0.0", 2222),), id="listen-one"),
        pytest.param("listen", "0.0.0.0:2222", (Address("0.0.0.0", 2222),), id="listen-unquoted"),
        pytest.param(
            "listen",
            '["0.0.0.0:2222", "[::]:2222"]',
            (Address("0.0.0.0", 2222), Address("::", 2222)),
            id="listen-list",
        ),
        pytest.param(
            "listen", '"tcp://127.0.0.1:80"', (Address("127.0.0.1", 80),), id="listen-tcp-prefix"
        ),
        pytest.param(
            "listen", '"[2001:DB8::1]:443"', (Address("2001:db8::1", 443),), id="listen-v6-lower"
        ),
        pytest.param("ipv4", '"10.0.0.1:8080"', Address("10.0.0.1", 8080), id="ipv4"),
        pytest.param("ipv4", '"tcp://127.0.0.1:22"', Address("127.0.0.1", 22), id="ipv4-tcp"),
        pytest.param("ipv6", '"[::1]:22"', Address("::1", 22), id="ipv6"),
        pytest.param("ipv6", '"[::1]:65535"', Address("::1", 65535), id="ipv6-max-port"),
        pytest.param("mark", "1", 1, id="mark-one"),
        pytest.param("mark", "4294967295", 2**32 - 1, id="mark-max"),
        pytest.param("mark", "0x7b", 123, id="mark-hex"),
        pytest.param("table", "1", 1, id="table-min"),
        pytest.param("table", "252", 252, id="table-below-reserved"),
        pytest.param("table", "256", 256, id="table-above-reserved"),
        pytest.param("table", "4294967295", 2**32 - 1, id="table-max"),
        pytest.param("header_timeout", "3", 3.0, id="header-timeout-min"),
        pytest.param("header_timeout", "7.5", 7.5, id="header-timeout-float"),
        pytest.param("header_timeout", "5s", 5.0, id="header-timeout-seconds"),
        pytest.param("header_timeout", "3500ms", 3.5, id="header-timeout-ms"),
        pytest.param("header_timeout", "2m", 120.0, id="header-timeout-minutes"),
        pytest.param("header_timeout", "1h", 3600.0, id="header-timeout-hour"),
        pytest.param("header_timeout", "3600", 3600.0, id="header-timeout-max"),
        pytest.param("connect_timeout", "500ms", 0.5, id="connect-timeout-ms"),
        pytest.param("connect_timeout", "0.1", 0.1, id="connect-timeout-float"),
        pytest.param("connect_timeout", "1m", 60.0, id="connect-timeout-minute"),
        pytest.param("connect_timeout", '"10"', 10.0, id="connect-timeout-quoted-number"),
        pytest.param("max_connections", "1", 1, id="max-connections-min"),
        pytest.param("max_connections", "1000000", 1_000_000, id="max-connections-max"),
        pytest.param("allow_local_sources", "true", True, id="allow-local-true"),
        pytest.param("allow_local_sources", "false", False, id="allow-local-false"),
        pytest.param("allow_local_sources", "True", True, id="allow-local-capital"),
        pytest.param("log_level", "debug", "debug", id="log-debug"),
        pytest.param("log_level", "warning", "warning", id="log-warning"),
        pytest.param("log_level", "ERROR", "error", id="log-upper-case"),
    ],
)
def test_key_accepts(tmp_path: Path, key: str, value: str, expected: object) -> None:
    config = load_text(tmp_path, config_text(key, value))
    assert getattr(config, key) == expected


def test_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, config_text())
    config = load_config(path)
    assert config == Config(
        path=path,
        listen=(Address("0.0.0.0", 2222),),
        ipv4=Address("127.0.0.1", 22),
        ipv6=None,
        allowed_networks=(ip_network("192.0.2.0/24"),),
        allowed_networks_file=None,
        mark=123,
        table=100,
        header_timeout=5.0,
        connect_timeout=5.0,
        max_connections=10000,
        allow_local_sources=False,
        log_level="info",
    )


def test_ipv6_only_backend_is_enough(tmp_path: Path) -> None:
    text = config_text("ipv4", None) + 'ipv6: "[::1]:22"\n'
    config = load_text(tmp_path, text)
    assert (config.ipv4, config.ipv6) == (None, Address("::1", 22))


def test_allowed_networks_single_string_and_dedup(tmp_path: Path) -> None:
    value = '["10.0.0.0/8", "2001:db8::/32", "10.0.0.0/8", "192.0.2.7"]'
    config = load_text(tmp_path, config_text("allowed_networks", value))
    assert config.allowed_networks == (
        ip_network("10.0.0.0/8"),
        ip_network("2001:db8::/32"),
        ip_network("192.0.2.7/32"),
    )
    single = load_text(tmp_path, config_text("allowed_networks", "10.0.0.0/8"))
    assert single.allowed_networks == (ip_network("10.0.0.0/8"),)


def test_allowed_returns_a_lookup(tmp_path: Path) -> None:
    allowed = load_text(tmp_path, config_text()).allowed()
    assert isinstance(allowed, AllowedNetworks)
    assert "192.0.2.10" in allowed
    assert "::ffff:192.0.2.10" in allowed
    assert "198.51.100.1" not in allowed


# --------------------------------------------------------------------------
# Every key: rejected values, with file, line, key and the fix in the message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        # listen
        pytest.param("listen", "2222", "got 2222", id="listen-integer"),
        pytest.param("listen", '"2222"', "write 0.0.0.0:2222", id="listen-port-only"),
        pytest.param("listen", '"0.0.0.0"', "missing port", id="listen-no-port"),
        pytest.param("listen", '"localhost:22"', "write 127.0.0.1:22", id="listen-localhost"),
        pytest.param("listen", '"example.org:22"', "host names are not resolved", id="listen-name"),
        pytest.param("listen", '"0.0.0.0:0"', "port 0 is out of range", id="listen-port-0"),
        pytest.param("listen", '"0.0.0.0:65536"', "expected 1 to 65535", id="listen-port-big"),
        pytest.param("listen", '"0.0.0.0:022"', "leading zero; write 22", id="listen-port-zero"),
        pytest.param("listen", '"0.0.0.0:ssh"', "'ssh' is not a number", id="listen-port-name"),
        pytest.param("listen", '"0.0.0.0:"', "missing port", id="listen-port-empty"),
        pytest.param("listen", '":22"', "missing IP address", id="listen-host-empty"),
        pytest.param("listen", '"::1:22"', "need brackets; write [::1]:22", id="listen-v6-bare"),
        pytest.param("listen", '"[::1]"', "missing port", id="listen-v6-no-port"),
        pytest.param("listen", '"[::1:22"', "missing ']'", id="listen-v6-no-bracket"),
        pytest.param("listen", '"[127.0.0.1]:22"', "write 127.0.0.1:22", id="listen-v4-brackets"),
        pytest.param("listen", '"10.0.0.256:22"', "Octet 256", id="listen-bad-octet"),
        pytest.param("listen", '"010.0.0.1:22"', "Leading zeros", id="listen-octal-octet"),
        pytest.param("ipv4", '"udp://127.0.0.1:53"', "serves both TCP and UDP", id="ipv4-udp"),
        pytest.param("listen", '"sctp://0.0.0.0:53"', "udp:// or nothing", id="listen-sctp"),
        pytest.param("listen", '"http://0.0.0.0:80"', "unknown scheme", id="listen-http"),
        pytest.param("listen", '"0.0.0.0: 22"', "cannot contain spaces", id="listen-space"),
        pytest.param("listen", '""', "got an empty string", id="listen-empty-string"),
        pytest.param("listen", "[]", "empty list", id="listen-empty-list"),
        pytest.param("listen", "{a: 1}", "got a mapping", id="listen-mapping"),
        pytest.param("listen", "[[1]]", "got a list", id="listen-nested-list"),
        pytest.param("listen", '["0.0.0.0:1", "0.0.0.0:1"]', "listed twice", id="listen-duplicate"),
        # ipv4 / ipv6
        pytest.param("ipv4", '"[::1]:22"', "IPv6 backends belong in ipv6", id="ipv4-given-v6"),
        pytest.param("ipv4", '"127.0.0.1"', "missing port", id="ipv4-no-port"),
        pytest.param("ipv4", "22", "got 22", id="ipv4-integer"),
        pytest.param("ipv4", "true", "got true", id="ipv4-bool"),
        pytest.param("ipv6", '"127.0.0.1:22"', "IPv4 backends belong in ipv4", id="ipv6-given-v4"),
        pytest.param("ipv6", '"localhost:22"', "instead of localhost", id="ipv6-localhost"),
        # allowed_networks
        pytest.param(
            "allowed_networks",
            '["192.0.2.1/24"]',
            "192.0.2.1/24 has host bits set; write 192.0.2.0/24",
            id="networks-host-bits",
        ),
        pytest.param(
            "allowed_networks", '"10.0.0.0/8, 10.1.0.0/16"', "one network", id="networks-comma"
        ),
        pytest.param("allowed_networks", "[10]", "got 10", id="networks-integer-item"),
        pytest.param("allowed_networks", '["nope"]', "expected a network", id="networks-garbage"),
        pytest.param("allowed_networks", "{a: 1}", "got a mapping", id="networks-mapping"),
        # allowed_networks_file
        pytest.param("allowed_networks_file", "42", "expected a file path", id="file-integer"),
        pytest.param("allowed_networks_file", '""', "got an empty string", id="file-empty"),
        pytest.param("allowed_networks_file", "[a]", "got a list", id="file-list"),
        # mark
        pytest.param(
            "mark",
            "abc",
            "mark: expected an integer from 1 to 4294967295, got 'abc'",
            id="mark-string",
        ),
        pytest.param("mark", "0", "mark 0 would match every packet", id="mark-zero"),
        pytest.param("mark", "0x0", "mark 0 would match every packet", id="mark-zero-hex"),
        pytest.param("mark", "-1", "got -1", id="mark-negative"),
        pytest.param("mark", "4294967296", "got 4294967296", id="mark-too-big"),
        pytest.param("mark", "1.5", "got 1.5", id="mark-float"),
        pytest.param("mark", "5.0", "got 5.0; write 5", id="mark-integral-float"),
        pytest.param("mark", "true", "got true", id="mark-bool"),
        pytest.param("mark", "yes", "got yes", id="mark-yes"),
        pytest.param("mark", '"123"', "remove the quotes", id="mark-quoted"),
        pytest.param("mark", "", "got nothing", id="mark-empty"),
        pytest.param("mark", "0123", "reads as octal (83); write 123", id="mark-octal"),
        pytest.param("mark", "1:30", "base-60", id="mark-sexagesimal"),
        pytest.param("mark", "[1]", "got a list", id="mark-list"),
        pytest.param("mark", "2024-01-01", "which YAML reads as a date", id="mark-date"),
        # table
        pytest.param("table", "0", "from 1 to 4294967295", id="table-zero"),
        pytest.param("table", "253", "reserved by the kernel (the 'default' table)", id="t-253"),
        pytest.param("table", "254", "reserved by the kernel (the 'main' table)", id="t-254"),
        pytest.param("table", "255", "reserved by the kernel (the 'local' table)", id="t-255"),
        pytest.param("table", "4294967296", "got 4294967296", id="table-too-big"),
        pytest.param("table", "main", "got 'main'", id="table-name"),
        pytest.param("table", "false", "got false", id="table-bool"),
        # header_timeout
        pytest.param("header_timeout", "2.9", "at least 3 seconds", id="header-timeout-short"),
        pytest.param("header_timeout", "0", "TCP retransmit", id="header-timeout-zero"),
        pytest.param("header_timeout", "500ms", "0.5s is too short", id="header-timeout-ms"),
        pytest.param("header_timeout", "3601", "at most 3600s", id="header-timeout-long"),
        pytest.param("header_timeout", "2h", "7200s is too long", id="header-timeout-hours"),
        pytest.param("header_timeout", "-5", "got -5", id="header-timeout-negative"),
        pytest.param("header_timeout", "abc", "got 'abc'", id="header-timeout-string"),
        pytest.param("header_timeout", "5 sec", "got '5 sec'", id="header-timeout-bad-unit"),
        pytest.param("header_timeout", ".nan", "got .nan", id="header-timeout-nan"),
        pytest.param("header_timeout", ".inf", "got .inf", id="header-timeout-inf"),
        pytest.param("header_timeout", "true", "got true", id="header-timeout-bool"),
        pytest.param("header_timeout", "", "got nothing", id="header-timeout-empty"),
        # connect_timeout
        pytest.param("connect_timeout", "0", "more than 0 seconds", id="connect-timeout-zero"),
        pytest.param("connect_timeout", "0ms", "more than 0 seconds", id="connect-timeout-0ms"),
        pytest.param("connect_timeout", "3601", "at most 3600s", id="connect-timeout-long"),
        pytest.param("connect_timeout", "[5]", "got a list", id="connect-timeout-list"),
        # max_connections
        pytest.param("max_connections", "0", "from 1 to 1000000, got 0", id="max-conn-zero"),
        pytest.param("max_connections", "1000001", "got 1000001", id="max-conn-too-big"),
        pytest.param("max_connections", "1e3", "got '1e3'", id="max-conn-exponent"),
        pytest.param("max_connections", "many", "got 'many'", id="max-conn-string"),
        # allow_local_sources
        pytest.param("allow_local_sources", "yes", "got 'yes'; write true", id="bool-yes"),
        pytest.param("allow_local_sources", "off", "got 'off'; write false", id="bool-off"),
        pytest.param("allow_local_sources", '"true"', "remove the quotes", id="bool-quoted"),
        pytest.param("allow_local_sources", "1", "expected true or false, got 1", id="bool-one"),
        pytest.param("allow_local_sources", "", "got nothing", id="bool-empty"),
        # log_level
        pytest.param("log_level", "warn", "did you mean 'warning'?", id="log-warn"),
        pytest.param("log_level", "verbose", "one of debug, info, warning, error", id="log-bad"),
        pytest.param("log_level", "3", "got 3", id="log-number"),
        pytest.param("log_level", "off", "got off", id="log-off-is-bool"),
    ],
)
def test_key_rejects(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    text = config_text(key, value)
    error = load_error(tmp_path, text)
    path = str(tmp_path / "mmproxy.yaml")
    line = last_line(text)
    assert str(error).startswith(f"{path}:{line}: {key}: ")
    assert fragment in str(error)
    assert (error.path, error.line, error.key, error.origin) == (path, line, key, None)


def test_error_message_is_one_readable_line(tmp_path: Path) -> None:
    text = "listen: 0.0.0.0:2222\nipv4: 127.0.0.1:22\nallowed_networks: 10.0.0.0/8\n"
    text += "\n\n\nmark: abc\n"
    error = load_error(tmp_path, text)
    assert str(error) == (
        f"{tmp_path / 'mmproxy.yaml'}:7: mark: expected an integer from 1 to 4294967295, got 'abc'"
    )


def test_list_item_errors_point_at_the_item(tmp_path: Path) -> None:
    text = config_text("listen", None) + (
        "listen:\n"  # line 3
        '  - "0.0.0.0:2222"\n'
        '  - "[::]:2222"\n'
        '  - "localhost:2222"\n'  # line 6
    )
    error = load_error(tmp_path, text)
    assert error.line == 6
    assert ":6: listen: invalid address 'localhost:2222'" in str(error)


def test_network_item_errors_point_at_the_item(tmp_path: Path) -> None:
    text = config_text("allowed_networks", None) + (
        "allowed_networks:\n"  # line 3
        "  - 10.0.0.0/8\n"
        "  # a comment\n"
        "  - 192.168.1.1/16\n"  # line 6
    )
    error = load_error(tmp_path, text)
    assert error.line == 6
    assert error.key == "allowed_networks"
    assert "write 192.168.0.0/16" in str(error)


def test_duplicate_listen_names_the_first_line(tmp_path: Path) -> None:
    text = config_text("listen", None) + 'listen:\n  - "[::]:1"\n  - "[::0]:1"\n'
    error = load_error(tmp_path, text)
    assert error.line == 5
    assert "[::]:1 is listed twice (also on line 4)" in str(error)


# --------------------------------------------------------------------------
# File-level problems


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        pytest.param("alowed_networks", "allowed_networks", id="typo"),
        pytest.param("allowed-networks", "allowed_networks", id="dashes"),
        pytest.param("Listen", "listen", id="capital"),
        pytest.param("header-timeout", "header_timeout", id="dash-timeout"),
        pytest.param("max_connection", "max_connections", id="singular"),
        pytest.param("loglevel", "log_level", id="no-underscore"),
    ],
)
def test_unknown_key_suggests(tmp_path: Path, name: str, suggestion: str) -> None:
    text = config_text() + f"{name}: 1\n"
    error = load_error(tmp_path, text)
    assert str(error) == (
        f"{tmp_path / 'mmproxy.yaml'}:4: {name}: unknown key; did you mean {suggestion!r}?"
    )
    assert (error.line, error.key) == (4, name)


def test_unknown_key_without_suggestion_lists_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, config_text() + "frobnicate: 1\n")
    assert "frobnicate: unknown key; known keys are: listen, ipv4, ipv6," in str(error)


def test_yaml_boolean_word_as_key_is_an_unknown_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, config_text() + "on: 1\n")
    assert error.key == "on"
    assert "unknown key" in str(error)


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    text = config_text() + "mark: 1\n# comment\nmark: 2\n"
    error = load_error(tmp_path, text)
    assert str(error) == (
        f"{tmp_path / 'mmproxy.yaml'}:6: mark: this key appears twice, on lines 4 and 6; "
        "keep only one"
    )


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("\n\n", id="blank-lines"),
        pytest.param("# only a comment\n", id="comment-only"),
    ],
)
def test_empty_file(tmp_path: Path, text: str) -> None:
    error = load_error(tmp_path, text)
    assert str(error).startswith(f"{tmp_path / 'mmproxy.yaml'}: the file is empty")
    assert "listen" in str(error)


@pytest.mark.parametrize(
    ("text", "got"),
    [
        pytest.param("- listen\n", "got a list", id="list"),
        pytest.param("listen 0.0.0.0:2222\n", "got a single value", id="missing-colon"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    error = load_error(tmp_path, text)
    assert str(error).startswith(f"{tmp_path / 'mmproxy.yaml'}:1: expected settings as")
    assert got in str(error)


def test_non_scalar_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, config_text() + "? [a, b]\n: 1\n")
    assert error.line == 4
    assert "expected a setting name" in str(error)


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        pytest.param(
            "listen: 0.0.0.0:2222\nmark: [1, 2\n", 3, 1, "expected ',' or ']'", id="open-list"
        ),
        pytest.param("listen: a: b\n", 1, 10, "mapping values are not allowed", id="colon"),
        pytest.param("listen: x\n\tmark: 1\n", 2, 1, "tabs for indentation", id="tab"),
        pytest.param("ipv6: [::1]:22\n", 1, 8, "quote values that start with", id="unquoted-v6"),
        pytest.param("a: 1\n---\nb: 2\n", 2, 1, "expected a single document", id="two-docs"),
        pytest.param('mark: "abc\n', 2, 1, "found unexpected end of stream", id="open-quote"),
    ],
)
def test_yaml_syntax_error(
    tmp_path: Path, text: str, line: int, column: int, fragment: str
) -> None:
    error = load_error(tmp_path, text)
    path = tmp_path / "mmproxy.yaml"
    assert str(error).startswith(f"{path}:{line}:{column}: YAML syntax error: ")
    assert fragment in str(error)
    assert (error.line, error.column) == (line, column)


def test_yaml_control_character(tmp_path: Path) -> None:
    error = load_error(tmp_path, config_text() + "mark: 1\x01\n")
    assert str(error).startswith(f"{tmp_path / 'mmproxy.yaml'}:4: YAML syntax error: ")
    assert "unacceptable character" in str(error)


def test_unknown_yaml_tag(tmp_path: Path) -> None:
    error = load_error(tmp_path, config_text() + "mark: !custom 1\n")
    assert error.line == 4
    assert "mark: cannot read this value" in str(error)
    assert "!custom" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: cannot read the configuration file: No such file or directory"
    )
    assert (caught.value.path, caught.value.line, caught.value.key) == (path, None, None)


def test_unreadable_file_is_a_directory(tmp_path: Path) -> None:
    # Tests run as root, where chmod 000 does not stop reads; a directory does.
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path}: cannot read the configuration file: expected a regular file, got a directory"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "mmproxy.yaml"
    path.write_bytes(config_text().encode() + b"mark: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}:4: not UTF-8 text (bad byte 0xff)"


# --------------------------------------------------------------------------
# Required settings after merging


def test_listen_required(tmp_path: Path) -> None:
    path = write(tmp_path, config_text("listen", None))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: listen: nothing to listen on")
    assert (caught.value.path, caught.value.key) == (path, "listen")


def test_a_backend_required(tmp_path: Path) -> None:
    path = write(tmp_path, config_text("ipv4", None))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: no backend: set ipv4")
    assert "ipv6" in str(caught.value)


def test_null_backend_means_unset(tmp_path: Path) -> None:
    text = config_text("ipv4", "~")
    error = load_error(tmp_path, text)
    assert "no backend" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(config_text("allowed_networks", None), id="missing"),
        pytest.param(config_text("allowed_networks", "[]"), id="empty-list"),
    ],
)
def test_allowed_networks_required_fail_closed(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: allowed_networks: no allowed networks: refusing to accept PROXY headers "
        "from anyone; to allow every peer write 0.0.0.0/0 and ::/0 explicitly"
    )


def test_allowed_networks_file_alone_is_enough(tmp_path: Path) -> None:
    (tmp_path / "nets.txt").write_text("10.0.0.0/8\n")
    text = config_text("allowed_networks", None) + "allowed_networks_file: nets.txt\n"
    config = load_text(tmp_path, text)
    assert config.allowed_networks == (ip_network("10.0.0.0/8"),)


def test_empty_networks_file_and_no_list_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "nets.txt").write_text("# nobody yet\n")
    text = config_text("allowed_networks", None) + "allowed_networks_file: nets.txt\n"
    assert "no allowed networks" in str(load_error(tmp_path, text))


# --------------------------------------------------------------------------
# allowed_networks_file


def test_networks_file_relative_to_yaml_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = tmp_path / "etc"
    instance.mkdir()
    (instance / "nets").mkdir()
    (instance / "nets" / "lb.txt").write_text("# balancers\n10.0.0.0/8\n198.51.100.0/24\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = config_text() + "allowed_networks_file: nets/lb.txt\n"
    config = load_config(write(instance, text))
    assert config.allowed_networks_file == str(instance / "nets" / "lb.txt")
    assert config.allowed_networks == (
        ip_network("192.0.2.0/24"),
        ip_network("10.0.0.0/8"),
        ip_network("198.51.100.0/24"),
    )


def test_networks_file_absolute_path(tmp_path: Path) -> None:
    nets = tmp_path / "abs.txt"
    nets.write_text("10.0.0.0/8\n")
    other = tmp_path / "sub"
    other.mkdir()
    config = load_config(write(other, config_text() + f"allowed_networks_file: {nets}\n"))
    assert config.allowed_networks_file == str(nets)


def test_networks_union_is_deduplicated_in_order(tmp_path: Path) -> None:
    (tmp_path / "nets.txt").write_text("2001:db8::/32\n192.0.2.0/24\n10.0.0.0/8\n")
    text = config_text() + "allowed_networks_file: nets.txt\n"
    config = load_text(tmp_path, text)
    assert config.allowed_networks == (
        ip_network("192.0.2.0/24"),
        ip_network("2001:db8::/32"),
        ip_network("10.0.0.0/8"),
    )


def test_networks_file_bad_line_reported_at_its_own_path_and_line(tmp_path: Path) -> None:
    nets = tmp_path / "nets.txt"
    nets.write_text("# balancers\n10.0.0.0/8\n\n192.0.2.1/24  # typo\n")
    text = config_text() + "allowed_networks_file: nets.txt\n"
    error = load_error(tmp_path, text)
    assert str(error).startswith(f"{nets}:4: allowed_networks_file: 192.0.2.1/24 has host bits")
    assert "write 192.0.2.0/24" in str(error)
    assert f"given by allowed_networks_file in {tmp_path / 'mmproxy.yaml'}:4" in str(error)
    assert (error.path, error.line, error.key) == (str(nets), 4, "allowed_networks_file")


def test_networks_file_missing_reported_at_the_yaml_line(tmp_path: Path) -> None:
    text = config_text() + "allowed_networks_file: missing.txt\n"
    error = load_error(tmp_path, text)
    path = tmp_path / "mmproxy.yaml"
    assert str(error) == (
        f"{path}:4: allowed_networks_file: {tmp_path / 'missing.txt'}: cannot read the "
        "allowed networks file: No such file or directory"
    )
    assert (error.path, error.line, error.key) == (str(path), 4, "allowed_networks_file")


def test_networks_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "nets.d").mkdir()
    error = load_error(tmp_path, config_text() + "allowed_networks_file: nets.d\n")
    assert "expected a regular file, got a directory" in str(error)
    assert error.line == 4


# --------------------------------------------------------------------------
# Command-line overrides


def test_override_beats_the_file(tmp_path: Path) -> None:
    text = config_text() + "mark: 5\n"
    config = load_text(tmp_path, text, (Override("mark", 7, "option --mark"),))
    assert config.mark == 7


def test_override_listen_replaces_the_list(tmp_path: Path) -> None:
    text = config_text("listen", '["0.0.0.0:1", "0.0.0.0:2"]')
    override = Override("listen", ["[::]:3"], "option -l")
    assert load_text(tmp_path, text, (override,)).listen == (Address("::", 3),)


def test_override_string_is_read_like_unquoted_yaml(tmp_path: Path) -> None:
    overrides = (
        Override("mark", "0x10", "option --mark"),
        Override("header_timeout", "10s", "option --header-timeout"),
        Override("connect_timeout", "2", "option --connect-timeout"),
        Override("allow_local_sources", "true", "option --allow-local-sources"),
        Override("listen", "127.0.0.1:9", "option -l"),
    )
    config = load_text(tmp_path, config_text(), overrides)
    assert (config.mark, config.header_timeout, config.connect_timeout) == (16, 10.0, 2.0)
    assert config.allow_local_sources is True
    assert config.listen == (Address("127.0.0.1", 9),)


def test_override_networks_file_replaces_and_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = tmp_path / "etc"
    instance.mkdir()
    (instance / "file.txt").write_text("10.0.0.0/8\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "cli.txt").write_text("172.16.0.0/12\n")
    monkeypatch.chdir(cwd)
    path = write(instance, config_text() + "allowed_networks_file: file.txt\n")
    config = load_config(path, [Override("allowed_networks_file", "cli.txt", "option -a")])
    assert config.allowed_networks_file == "cli.txt"
    assert config.allowed_networks == (ip_network("192.0.2.0/24"), ip_network("172.16.0.0/12"))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        pytest.param(
            Override("mark", "abc", "option --mark"),
            "option --mark: mark: expected an integer from 1 to 4294967295, got 'abc'",
            id="mark-string",
        ),
        pytest.param(
            Override("mark", True, "option --mark"),
            "option --mark: mark: expected an integer",
            id="mark-python-bool",
        ),
        pytest.param(
            Override("listen", ["0.0.0.0:1", "localhost:2"], "option -l"),
            "option -l: listen: invalid address 'localhost:2'",
            id="listen-list-item",
        ),
        pytest.param(
            Override("allow_local_sources", "yes", "option --allow-local-sources"),
            "option --allow-local-sources: allow_local_sources: expected true or false, got 'yes'",
            id="bool-yes",
        ),
        pytest.param(
            Override("header_timeout", 1, "option --header-timeout"),
            "option --header-timeout: header_timeout: 1s is too short",
            id="header-timeout-short",
        ),
        pytest.param(
            Override("allowed_networks", ["10.0.0.1/8"], "option --allow"),
            "option --allow: allowed_networks: 10.0.0.1/8 has host bits set; write 10.0.0.0/8",
            id="network-host-bits",
        ),
        pytest.param(
            Override("alowed_networks", [], "option --x"),
            "option --x: alowed_networks: unknown key; did you mean 'allowed_networks'?",
            id="unknown-key",
        ),
        pytest.param(
            Override("allowed_networks_file", "/nonexistent/nets.txt", "option -a"),
            "option -a: allowed_networks_file: /nonexistent/nets.txt: cannot read",
            id="networks-file-missing",
        ),
    ],
)
def test_override_errors_name_the_origin(tmp_path: Path, override: Override, fragment: str) -> None:
    error = load_error(tmp_path, config_text(), (override,))
    assert str(error).startswith(fragment)
    assert error.origin == override.origin
    assert error.path is None
    assert error.line is None


def test_override_networks_file_bad_line_names_the_option(tmp_path: Path) -> None:
    nets = tmp_path / "cli.txt"
    nets.write_text("10.0.0.0/8\nbogus\n")
    override = Override("allowed_networks_file", str(nets), "option -a")
    error = load_error(tmp_path, config_text(), (override,))
    assert str(error).startswith(f"{nets}:2: allowed_networks_file: ")
    assert "(file given by allowed_networks_file in option -a)" in str(error)


def test_override_is_checked_even_when_the_file_is_fine(tmp_path: Path) -> None:
    text = config_text() + "mark: 5\n"
    error = load_error(tmp_path, text, (Override("mark", -1, "option --mark"),))
    assert str(error).startswith("option --mark: mark:")


def test_override_none_unsets_a_backend(tmp_path: Path) -> None:
    text = config_text() + 'ipv6: "[::1]:22"\n'
    config = load_text(tmp_path, text, (Override("ipv4", None, "option --no-ipv4"),))
    assert (config.ipv4, config.ipv6) == (None, Address("::1", 22))


def test_no_file_only_overrides() -> None:
    config = load_config(
        None,
        [
            Override("listen", "0.0.0.0:2222", "option -l"),
            Override("ipv4", "127.0.0.1:22", "option -4"),
            Override("allowed_networks", ["0.0.0.0/0", "::/0"], "option --allow"),
        ],
    )
    assert config.path is None
    assert config.listen == (Address("0.0.0.0", 2222),)
    assert "2001:db8::1" in config.allowed()


def test_no_file_missing_settings_errors_without_a_path() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [Override("ipv4", "127.0.0.1:22", "option -4")])
    assert str(caught.value).startswith("listen: nothing to listen on")
    assert caught.value.path is None


def test_invalid_file_is_reported_even_if_overrides_would_fix_it(tmp_path: Path) -> None:
    text = config_text() + "mark: abc\n"
    error = load_error(tmp_path, text, (Override("mark", 1, "option --mark"),))
    assert error.line == 4


# --------------------------------------------------------------------------
# parse_address and Address


@pytest.mark.parametrize(
    ("text", "host", "port", "family", "shown"),
    [
        pytest.param("127.0.0.1:22", "127.0.0.1", 22, socket.AF_INET, "127.0.0.1:22", id="v4"),
        pytest.param("[::1]:22", "::1", 22, socket.AF_INET6, "[::1]:22", id="v6"),
        pytest.param("tcp://[::]:80", "::", 80, socket.AF_INET6, "[::]:80", id="tcp-v6"),
        pytest.param("TCP://1.2.3.4:5", "1.2.3.4", 5, socket.AF_INET, "1.2.3.4:5", id="upper"),
        pytest.param(
            "[2001:db8:0::1]:443",
            "2001:db8::1",
            443,
            socket.AF_INET6,
            "[2001:db8::1]:443",
            id="v6-normalised",
        ),
    ],
)
def test_parse_address(
    text: str, host: str, port: int, family: socket.AddressFamily, shown: str
) -> None:
    address = parse_address(text, what="listen")
    assert address == Address(host, port)
    assert address.family == family
    assert str(address) == shown
    assert address.sockaddr == (host, port)


def test_parse_address_error_names_what() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_address("udp://127.0.0.1:53", what="ipv4")
    assert str(caught.value) == (
        "ipv4: invalid address 'udp://127.0.0.1:53': a target serves both TCP and UDP "
        "clients: write it without a scheme, as '127.0.0.1:53'"
    )
    assert caught.value.key == "ipv4"


@pytest.mark.parametrize(
    ("text", "shown", "transport"),
    [
        ("udp://0.0.0.0:53", "udp://0.0.0.0:53", "udp"),
        ("UDP://[::]:53", "udp://[::]:53", "udp"),
        ("tcp://[::1]:22", "[::1]:22", "tcp"),
        ("0.0.0.0:22", "0.0.0.0:22", "tcp"),
    ],
)
def test_listen_transport(text: str, shown: str, transport: str) -> None:
    address = parse_address(text, what="listen")
    assert (str(address), address.transport) == (shown, transport)
    assert address.endpoint == shown.removeprefix("udp://")


def test_same_endpoint_on_tcp_and_udp_is_not_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "dns.yaml"
    path.write_text(
        'listen: ["0.0.0.0:53", "udp://0.0.0.0:53"]\nipv4: "127.0.0.1:53"\n'
        'allowed_networks: ["192.0.2.0/24"]\n'
    )
    config = load_config(str(path))
    assert [a.transport for a in config.listen] == ["tcp", "udp"]


def test_address_is_frozen_and_hashable() -> None:
    address = Address("127.0.0.1", 22)
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.port = 23  # type: ignore[misc]
    assert len({address, Address("127.0.0.1", 22)}) == 1


# --------------------------------------------------------------------------
# The key table and the example file


def test_key_table_matches_config_fields_and_defaults() -> None:
    fields = {field.name: field for field in dataclasses.fields(Config)}
    assert [key.name for key in KEYS] == [name for name in fields if name != "path"]
    for key in KEYS:
        assert key.default == fields[key.name].default, key.name
        assert key.help, key.name


def test_config_error_attributes() -> None:
    error = ConfigError("expected x", path="/etc/mmproxy/a.yaml", line=3, key="mark")
    assert str(error) == "/etc/mmproxy/a.yaml:3: mark: expected x"
    assert (error.path, error.line, error.key) == ("/etc/mmproxy/a.yaml", 3, "mark")
    assert str(ConfigError("boom")) == "boom"


def test_example_file_loads() -> None:
    config = load_config(str(EXAMPLE))
    assert config.listen == (Address("0.0.0.0", 2222),)
    assert config.ipv4 == Address("127.0.0.1", 22)
    assert config.ipv6 == Address("::1", 22)
    assert config.allowed_networks == (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    assert config.allowed_networks_file is None
    defaults = Config()
    for key in KEYS:
        if key.name not in ("listen", "ipv4", "ipv6", "allowed_networks"):
            assert getattr(config, key.name) == getattr(defaults, key.name), key.name
    assert "127.0.0.1" in config.allowed()


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in KEYS:
        assert re.search(rf"^(# )?{key.name}: ", text, re.MULTILINE), key.name
        assert re.search(rf"^# {key.name}: \w", text, re.MULTILINE), f"no comment for {key.name}"
    assert "192.0.2.0/24" in text
    assert "0.0.0.0/0" in text
    assert "::/0" in text


def test_example_networks_file_line_works_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    (tmp_path / "nets.txt").write_text("192.0.2.0/24\n")
    text = re.sub(
        r'^# allowed_networks_file: "/.*$',
        "allowed_networks_file: nets.txt",
        text,
        flags=re.MULTILINE,
    )
    config = load_text(tmp_path, text)
    assert ip_network("192.0.2.0/24") in config.allowed_networks


def test_an_escape_beyond_unicode_is_a_syntax_error(tmp_path: Path) -> None:
    # Found by the fuzzer: PyYAML raised a bare ValueError from chr().
    path = tmp_path / "bad.yaml"
    path.write_text('listen: "\\U4DDDDDDD"\n')
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(str(path))


# --------------------------------------------------------------------------
# The matrix: every key of the table, wrong in each way that applies to it (a wrong type,
# out of range, a word it does not know), is refused naming the file, line and key.

_WRONG_TYPE = [("{a: 1}", "got a mapping"), ("!!binary aGk=", "got")]
_WRONG_FOR_SCALARS = [("[1]", "got a list")]
_BY_KIND: dict[str, list[tuple[str, str]]] = {
    "bool": [("yes", "write true"), ("2", "expected true or false"), ('"false"', "quotes")],
    "duration": [("-1", "got -1"), ("abc", "got 'abc'"), ("3601", "at most 3600s"),
                 (".nan", "got .nan"), ("true", "got true"), ("5 sec", "got '5 sec'")],
    "choice": [("maybe", "expected one of"), ("1", "expected one of"), ("true", "one of")],
    "count": [("0", "got 0"), ("1000001", "got 1000001"), ("many", "got 'many'")],
    "address": [("9877", "got 9877"), ("localhost:9877", "not resolved")],
    "group": [('"a b"', "not a group name"), ("12", "got 12")],
}  # fmt: skip
_KIND = {
    "follow_destination_port": "bool",
    "manage_routing": "bool",
    "share_table": "bool",
    "tcp_keepalive": "bool",
    "allow_local_sources": "bool",
    "drain_timeout": "duration",
    "idle_timeout": "duration",
    "half_close_timeout": "duration",
    "udp_idle_timeout": "duration",
    "header_timeout": "duration",
    "connect_timeout": "duration",
    "check_failure": "choice",
    "routing": "choice",
    "firewall": "choice",
    "log_level": "choice",
    "log_connections": "choice",
    "max_connections": "count",
    "udp_max_flows": "count",
    "udp_max_flows_per_balancer": "count",
    "udp_header": "choice",
    "workers": "count",  # or "auto"
    "metrics_listen": "address",
    "status_group": "group",
}
_LISTS = {"listen", "allowed_networks", "allowed_destination_ports"}  # a list is right here


def _matrix() -> list[object]:
    cases: list[object] = []
    for key in KEYS:
        wrong = _WRONG_TYPE + ([] if key.name in _LISTS else _WRONG_FOR_SCALARS)
        wrong = wrong + _BY_KIND.get(_KIND.get(key.name, ""), [])
        for value, fragment in wrong:
            cases.append(pytest.param(key.name, value, fragment, id=f"{key.name}={value}"))
    return cases


@pytest.mark.parametrize(("key", "value", "fragment"), _matrix())
def test_every_key_wrong_in_every_way(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    text = config_text(key, value)
    error = load_error(tmp_path, text)
    path = str(tmp_path / "mmproxy.yaml")
    assert str(error).startswith(f"{path}:{last_line(text)}: {key}: "), str(error)
    assert fragment in str(error)
    assert "\n" not in str(error)


def test_the_matrix_knows_every_key() -> None:
    """A new key must be given its kind here, so the matrix tests its wrong values."""
    scalars = {k.name for k in KEYS} - _LISTS - {"ipv4", "ipv6", "allowed_networks_file"}
    scalars -= {"mark", "table"}  # integers with their own cases in test_key_rejects
    assert scalars <= set(_KIND), scalars - set(_KIND)


@pytest.mark.parametrize("where", ["config", "networks"])
def test_a_file_that_cannot_be_read_for_lack_of_permission(where: str) -> None:
    """Unreadable (mode 000) as an ordinary user: root reads anything, so the load runs in a
    child process that drops to nobody; skipped when not root."""
    needs_root("reading as another user needs root (to switch to that user)")
    # Somewhere nobody can reach (pytest's tmp_path is under a directory only root enters).
    with tempfile.TemporaryDirectory(prefix="mmproxy-perm-") as name:
        directory = Path(name)
        directory.chmod(0o755)
        nets = directory / "nets.txt"
        nets.write_text("192.0.2.0/24\n")
        text = config_text() + f"allowed_networks_file: {nets}\n"
        path = Path(write(directory, text))
        path.chmod(0o000 if where == "config" else 0o644)
        nets.chmod(0o000 if where == "networks" else 0o644)
        code = (
            "import sys\nfrom mmproxy.config import ConfigError, load_config\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc)\n"
        )
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        # nobody runs a readable copy of the code: the checkout may be under /root.
        with copy_for_others() as code_copy:
            out = subprocess.run(
                [*nobody, code_copy.python, "-c", code, str(path)],
                capture_output=True, text=True, check=True, cwd=code_copy.path,
                env=code_copy.env(),
            ).stdout.strip()  # fmt: skip
    if where == "config":
        assert out == f"{path}: cannot read the configuration file: Permission denied"
    else:
        assert out == (
            f"{path}:4: allowed_networks_file: {nets}: cannot read the allowed networks "
            "file: Permission denied"
        )

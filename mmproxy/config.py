"""Configuration: one YAML file per instance, plus command-line overrides.

Values are checked strictly because a typo in a proxy that decides whose source
address to forge must stop the service, not be guessed around.  The layers, each
using only the ones before it: address (the Address type), config_yaml (the file
with line numbers, ConfigError), config_values (one parser per kind of value), and
this module (the key table, Config, loading).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from mmproxy.address import Address, read_address, read_addresses
from mmproxy.config_yaml import (
    ConfigError,
    Invalid,
    Value,
    Where,
    fail,
    implicit_tag,
    read_mapping,
    value_from_node,
    value_from_python,
)
from mmproxy.networks import (
    AllowedNetworks,
    Network,
    NetworkError,
    parse_network,
    read_networks_file,
)

__all__ = [
    "KEYS",
    "Config",
    "ConfigError",
    "Key",
    "Override",
    "load_config",
    "parse_address",
    "parse_listen",
]

U32_MAX = 2**32 - 1
LOG_LEVELS = ("debug", "info", "warning", "error")
RESERVED_TABLES = {253: "default", 254: "main", 255: "local"}
MAX_SECONDS = 3600.0
# PROXY protocol spec, section 2: receivers must wait long enough for a
# retransmitted segment carrying the header; at least 3 seconds.
MIN_HEADER_TIMEOUT = 3.0

_TAG = "tag:yaml.org,2002:"


# --------------------------------------------------------------------------
# Describing what we got


def _describe(value: Value) -> str:
    if value.kind == "sequence":
        return "a list"
    if value.kind == "mapping":
        return "a mapping (nested key: value pairs)"
    data = value.data
    if data is None:
        return "nothing (an empty value)"
    if isinstance(data, str):
        return repr(data)
    if isinstance(data, bool | int | float):
        return value.text if value.text is not None else repr(data)
    shown = value.text if value.text is not None else str(data)
    return f"{shown!r} (which YAML reads as a {type(data).__name__})"


def _hint(value: Value) -> str:
    if value.kind != "scalar":
        return ""
    if value.data is None:
        return "; write a value after the colon, or delete the line to use the default"
    if isinstance(value.data, str) and value.quoted:
        tag = implicit_tag(value.data)
        if tag in (_TAG + "int", _TAG + "float", _TAG + "bool"):
            return "; remove the quotes"
    return ""


def _yaml11_trap(value: Value) -> None:
    """Refuse numbers that YAML 1.1 reads differently from how they look."""
    text = value.text
    if text is None or not isinstance(value.data, int | float):
        return
    if ":" in text:
        fail(
            value,
            f"{text!r} is read by YAML as a base-60 number ({value.data}); write a plain "
            "number instead",
        )
    if re.fullmatch(r"[-+]?0[0-7_]+", text):
        sign = text[0] if text[0] in "+-" else ""
        plain = sign + (text.lstrip("+-").lstrip("0_") or "0")
        fail(
            value,
            f"{text!r} has a leading zero, which YAML reads as octal ({value.data}); write {plain}",
        )


# --------------------------------------------------------------------------
# Scalar parsers


def _expect_str(value: Value, expected: str) -> str:
    if value.kind == "scalar" and isinstance(value.data, str):
        return value.data
    if value.where.origin is not None and value.text is not None:
        # On the command line there are no quotes: a string key takes the text.
        return value.text
    fail(value, f"expected {expected}, got {_describe(value)}{_hint(value)}")


def _is_int(value: Value) -> bool:
    data = value.data
    # bool is a subclass of int: `mark: true` must not become mark 1.
    return value.kind == "scalar" and isinstance(data, int) and not isinstance(data, bool)


def _integer(low: int, high: int, extra: str = "") -> Callable[[Value], int]:
    expected = f"an integer from {low} to {high}{extra}"

    def parse(value: Value) -> int:
        if _is_int(value):
            _yaml11_trap(value)
            number = value.data
            assert isinstance(number, int)
            if low <= number <= high:
                return number
        elif value.kind == "scalar" and isinstance(value.data, float) and value.data.is_integer():
            fail(value, f"expected {expected}, got {_describe(value)}; write {int(value.data)}")
        fail(value, f"expected {expected}, got {_describe(value)}{_hint(value)}")

    return parse


def _parse_workers(value: Value) -> int:
    """ "auto" is 0 (one worker process per CPU mmproxy may run on), else the count."""
    data = value.data
    if value.kind == "scalar" and isinstance(data, str) and data.strip().lower() == "auto":
        return 0
    return _integer(1, 256, ' or "auto"')(value)


def _parse_mark(value: Value) -> int:
    if _is_int(value) and value.data == 0:
        # `ip rule add fwmark 0` matches every packet: with the table's `local 0.0.0.0/0`,
        # all of this host's traffic (SSH included) would be delivered to lo.
        fail(
            value,
            "mark 0 would match every packet (an `ip rule fwmark 0` takes over the whole "
            "host's routing); pick a non-zero mark, such as the default 123",
        )
    return _integer(1, U32_MAX)(value)


def _parse_table(value: Value) -> int:
    table = _integer(1, U32_MAX, " other than 253, 254 and 255")(value)
    if table in RESERVED_TABLES:
        fail(
            value,
            f"table {table} is reserved by the kernel (the '{RESERVED_TABLES[table]}' table); "
            "mmproxy needs a routing table of its own: pick another number, such as the "
            "default 100",
        )
    return table


def _parse_bool(value: Value) -> bool:
    data = value.data
    if value.kind == "scalar" and isinstance(data, bool):
        if value.text is None or value.text.lower() in ("true", "false"):
            return data
        fail(
            value,
            f"expected true or false, got {value.text!r}; write {str(data).lower()} "
            "(yes/no/on/off are not accepted, to avoid YAML 1.1 surprises)",
        )
    fail(value, f"expected true or false, got {_describe(value)}{_hint(value)}")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DURATION_EXPECTED = (
    "a duration: a number of seconds (5, 2.5) or a number with a unit (500ms, 5s, 2m)"
)


def _seconds(value: Value) -> float:
    """A non-negative finite duration in seconds, from a number or "5s"-style text."""
    data = value.data
    if _is_int(value) or (value.kind == "scalar" and isinstance(data, float)):
        _yaml11_trap(value)
        assert isinstance(data, int | float)
        seconds = float(data)
    elif value.kind == "scalar" and isinstance(data, str):
        match = _DURATION.fullmatch(data.strip())
        if match is None:
            fail(value, f"expected {_DURATION_EXPECTED}, got {data!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        fail(value, f"expected {_DURATION_EXPECTED}, got {_describe(value)}{_hint(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        fail(value, f"expected {_DURATION_EXPECTED}, got {_describe(value)}")
    return seconds


def _show_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def _parse_header_timeout(value: Value) -> float:
    seconds = _seconds(value)
    if seconds < MIN_HEADER_TIMEOUT:
        fail(
            value,
            f"{_show_seconds(seconds)} is too short: the PROXY protocol specification asks "
            "receivers to wait at least 3 seconds for the header, long enough for a TCP "
            "retransmit; write 3s or more (default 5s)",
        )
    if seconds > MAX_SECONDS:
        fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


def _parse_connect_timeout(value: Value) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        fail(value, "expected more than 0 seconds, got 0; the default is 5s")
    if seconds > MAX_SECONDS:
        fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


def _parse_udp_idle_timeout(value: Value) -> float:
    seconds = _seconds(value)
    if seconds < 1:
        fail(
            value,
            f"{_show_seconds(seconds)} is too short: a UDP flow needs at least 1s to see "
            "its reply; the default is 60s",
        )
    if seconds > MAX_SECONDS:
        fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


def _choice(*options: str) -> Callable[[Value], str]:
    expected = "one of " + ", ".join(options)

    def parse(value: Value) -> str:
        word = _expect_str(value, expected).strip().lower()
        if word in options:
            return word
        close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        fail(value, f"expected {expected}, got {_describe(value)}{suggestion}")

    return parse


_parse_log_level = _choice(*LOG_LEVELS)


def _parse_duration(value: Value) -> float:
    seconds = _seconds(value)
    if seconds > MAX_SECONDS:
        fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


# --------------------------------------------------------------------------
# Addresses


def parse_address(text: str, *, what: str) -> Address:
    """Parse an address such as "127.0.0.1:22", "tcp://[::1]:22" or, for `listen`,
    "udp://0.0.0.0:53".

    `what` names the setting in the error, e.g. "listen".
    """
    try:
        return read_address(text, udp=what == "listen")
    except ValueError as exc:
        raise ConfigError(str(exc), key=what) from None


def parse_listen(text: str) -> tuple[Address, ...]:
    """A `listen:` entry: one address, or one per port of a range such as
    "0.0.0.0:27015-27030" or "udp://[::]:7000-7010"."""
    try:
        return read_addresses(text, udp=True, ranges=True)
    except ValueError as exc:
        raise ConfigError(str(exc), key="listen") from None


def _address_value(value: Value, udp: bool = False) -> Address:
    text = _expect_str(value, 'an address string like "127.0.0.1:22" or "[::1]:22"')
    try:
        return read_address(text, udp)
    except ValueError as exc:
        fail(value, str(exc))


def _listen_value(value: Value) -> tuple[Address, ...]:
    text = _expect_str(value, 'an address string like "0.0.0.0:2222" or "[::]:7000-7010"')
    try:
        return read_addresses(text, udp=True, ranges=True)
    except ValueError as exc:
        fail(value, str(exc))


def _items(value: Value, expected: str) -> list[Value]:
    """A single value or a list of them: `listen: "a"` and `listen: ["a", "b"]`."""
    if value.kind == "sequence":
        assert isinstance(value.data, list)
        return value.data
    if value.kind == "mapping":
        fail(value, f"expected {expected}, got {_describe(value)}")
    return [value]


def _parse_listen(value: Value) -> tuple[Address, ...]:
    items = _items(value, "an address or a list of addresses")
    if not items:
        fail(value, 'empty list; expected at least one address, e.g. ["0.0.0.0:2222"]')
    seen: dict[Address, int | None] = {}
    for item in items:
        for address in _listen_value(item):
            if address in seen:
                fail(item, f"{address} is listed twice (also on line {seen[address]}); keep one")
            seen[address] = item.where.line
    return tuple(seen)


def _backend(version: int) -> Callable[[Value], Address | None]:
    other = 6 if version == 4 else 4
    example = "127.0.0.1:22" if version == 4 else "[::1]:22"

    def parse(value: Value) -> Address | None:
        if value.kind == "scalar" and value.data is None:
            return None  # explicitly unset: no backend for this family
        address = _address_value(value)
        if address.family != (socket.AF_INET if version == 4 else socket.AF_INET6):
            fail(
                value,
                f"expected an IPv{version} address like {example}, got {address}; "
                f"IPv{other} backends belong in ipv{other}",
            )
        return address

    return parse


def _parse_networks(value: Value) -> tuple[Network, ...]:
    networks: list[Network] = []
    for item in _items(value, "a network or a list of networks"):
        text = _expect_str(item, 'a network string like "192.0.2.0/24"')
        try:
            networks.append(parse_network(text))
        except NetworkError as exc:
            fail(item, exc.detail)
    return tuple(dict.fromkeys(networks))


def _parse_networks_file(value: Value) -> str | None:
    if value.kind == "scalar" and value.data is None:
        return None
    path = _expect_str(value, 'a file path like "/etc/mmproxy/allowed-networks.txt"')
    if not path.strip():
        fail(value, "expected a file path, got an empty string")
    if value.where.origin is None and value.where.path and not os.path.isabs(path):
        # Relative to the YAML file, so an instance directory can be moved as a whole.
        path = os.path.join(os.path.dirname(value.where.path), path)
    return path


_PORT_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")
_PORTS_EXPECTED = 'a port from 1 to 65535, a range like "8000-8099", or a list of them'


def _parse_ports(value: Value) -> tuple[tuple[int, int], ...]:
    """Ports and ranges as (low, high) pairs, for allowed_destination_ports."""
    ranges = [_port_range(item) for item in _items(value, _PORTS_EXPECTED)]
    if not ranges:
        fail(value, f'empty list; expected {_PORTS_EXPECTED}, e.g. [80, 443, "8000-8099"]')
    return tuple(sorted(set(ranges)))


def _port_range(item: Value) -> tuple[int, int]:
    if _is_int(item):
        port = _integer(1, 65535)(item)
        return port, port
    if item.kind == "scalar" and isinstance(item.data, str):
        match = _PORT_RANGE.fullmatch(item.data)
        if match is not None:
            low, high = int(match.group(1)), int(match.group(2))
            if 1 <= low <= high <= 65535:
                return low, high
            fail(item, f"{item.data!r}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
    fail(item, f"expected {_PORTS_EXPECTED}, got {_describe(item)}{_hint(item)}")


# --------------------------------------------------------------------------
# The key table: adding a setting is one line here plus one Config field.


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Value], Any]
    default: Any
    help: str


KEYS: tuple[Key, ...] = (
    Key("listen", _parse_listen, (), "addresses (or port ranges) to accept connections on"),
    Key("ipv4", _backend(4), None, "where to connect for IPv4 clients (IPv4 address:port)"),
    Key("ipv6", _backend(6), None, "where to connect for IPv6 clients ([IPv6 address]:port)"),
    Key("allowed_networks", _parse_networks, (), "peers allowed to send PROXY headers"),
    Key("allowed_networks_file", _parse_networks_file, None, "more allowed networks, one a line"),
    Key("mark", _parse_mark, 123, "firewall mark put on connections to the backend"),
    Key("table", _parse_table, 100, "routing table that routes replies back to mmproxy"),
    Key("header_timeout", _parse_header_timeout, 5.0, "how long to wait for the PROXY header"),
    Key("connect_timeout", _parse_connect_timeout, 5.0, "how long to wait for the backend"),
    Key("max_connections", _integer(1, 1_000_000), 10000, "concurrent connections at most"),
    Key("workers", _parse_workers, 0, "worker processes; 0 is auto: one per CPU"),
    Key("allow_local_sources", _parse_bool, False, "accept loopback/unspecified client sources"),
    Key("log_level", _parse_log_level, "info", "one of debug, info, warning, error"),
    Key("follow_destination_port", _parse_bool, False, "target port = the header's dest port"),
    Key("allowed_destination_ports", _parse_ports, (), "ports follow_destination_port may use"),
    Key("drain_timeout", _parse_duration, 30.0, "how long a stop waits for connections"),
    Key("check_failure", _choice("fail", "warn"), "fail", "what a failed self-check does"),
    Key("manage_routing", _parse_bool, True, "apply and remove the routing rules"),
    Key("share_table", _parse_bool, False, "allow `table` to hold routes mmproxy did not add"),
    Key("routing", _choice("auto", "lo", "fwmark"), "auto", "which routing variant to use"),
    Key("firewall", _choice("nftables", "iptables"), "nftables", "tool for the fwmark rules"),
    Key("idle_timeout", _parse_duration, 0.0, "close after this long without traffic"),
    Key("half_close_timeout", _parse_duration, 60.0, "close a half-closed one after"),
    Key("tcp_keepalive", _parse_bool, True, "TCP keepalive towards client and target"),
    Key("udp_idle_timeout", _parse_udp_idle_timeout, 60.0, "close a quiet UDP flow after"),
    Key("udp_max_flows", _integer(1, 1_000_000), 10000, "concurrent UDP flows at most"),
    Key(
        "udp_max_flows_per_balancer",
        _integer(1, 1_000_000),
        None,
        "UDP flows one balancer address may hold; default: udp_max_flows",
    ),
    Key("udp_header", _choice("v2", "spp"), "v2", "UDP framing: PROXY v2 or Spectrum's SPP"),
)
_KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class Config:
    """A validated configuration; defaults match the KEYS table."""

    path: str | None = None
    listen: tuple[Address, ...] = ()
    ipv4: Address | None = None
    ipv6: Address | None = None
    allowed_networks: tuple[Network, ...] = ()
    allowed_networks_file: str | None = None
    mark: int = 123
    table: int = 100
    header_timeout: float = 5.0
    connect_timeout: float = 5.0
    max_connections: int = 10000
    workers: int = 0  # "auto": one per CPU
    allow_local_sources: bool = False
    log_level: str = "info"
    follow_destination_port: bool = False
    allowed_destination_ports: tuple[tuple[int, int], ...] = ()  # (low, high) ranges
    drain_timeout: float = 30.0
    check_failure: str = "fail"
    manage_routing: bool = True
    share_table: bool = False
    routing: str = "auto"
    firewall: str = "nftables"
    idle_timeout: float = 0.0
    half_close_timeout: float = 60.0
    tcp_keepalive: bool = True
    udp_idle_timeout: float = 60.0
    udp_max_flows: int = 10000
    udp_max_flows_per_balancer: int | None = None  # None: udp_max_flows
    udp_header: str = "v2"  # "v2" or "spp" (Simple Proxy Protocol)

    def allowed(self) -> AllowedNetworks:
        return AllowedNetworks(self.allowed_networks)

    def destination_port_allowed(self, port: int) -> bool:
        """Whether follow_destination_port may connect to `port`."""
        return any(low <= port <= high for low, high in self.allowed_destination_ports)

    def targets(self) -> tuple[Address, ...]:
        return tuple(t for t in (self.ipv4, self.ipv6) if t is not None)

    def routing_variant(self) -> str:
        """ "lo" when every target is on loopback, else "fwmark" (unless set explicitly)."""
        if self.routing != "auto":
            return self.routing
        loopback = all(ipaddress.ip_address(t.host).is_loopback for t in self.targets())
        return "lo" if loopback else "fwmark"


@dataclass(frozen=True)
class Override:
    """A setting given on the command line; it replaces the file's value."""

    key: str
    value: object
    origin: str  # e.g. "option --mark", used in error messages


# --------------------------------------------------------------------------
# Loading


@dataclass(frozen=True, slots=True)
class _Setting:
    value: Any
    where: Where


def _error(exc: Invalid, key: str) -> ConfigError:
    where = exc.where
    path = None if where.origin is not None else where.path
    return ConfigError(exc.message, path=path, line=where.line, key=key, origin=where.origin)


def _read_file(path: str, only: Collection[str] | None = None) -> dict[str, _Setting]:
    settings: dict[str, _Setting] = {}
    for name, line, value_node in read_mapping(path):
        if only is not None and name not in only:
            continue
        if name in settings:
            first = settings[name].where.line
            raise ConfigError(
                f"this key appears twice, on lines {first} and {line}; keep only one",
                path=path,
                line=line,
                key=name,
            )
        key = _known_key(name, Where(path, line))
        try:
            value = value_from_node(value_node, path)
            settings[name] = _Setting(key.parse(value), value.where)
        except Invalid as exc:
            raise _error(exc, name) from None
    return settings


def _known_key(name: str, where: Where) -> Key:
    key = _KEYS_BY_NAME.get(name)
    if key is not None:
        return key
    names = [key.name for key in KEYS]
    close = difflib.get_close_matches(name.replace("-", "_").lower(), names, n=1, cutoff=0.6)
    if close:
        message = f"unknown key; did you mean {close[0]!r}?"
    else:
        message = f"unknown key; known keys are: {', '.join(names)}"
    raise _error(Invalid(message, where), name)


def _override(override: Override) -> _Setting:
    where = Where(None, origin=override.origin)
    key = _known_key(override.key, where)
    try:
        return _Setting(key.parse(value_from_python(override.value, where)), where)
    except Invalid as exc:
        raise _error(exc, override.key) from None


def _file_networks(setting: _Setting) -> tuple[Network, ...]:
    try:
        return tuple(network for _, network in read_networks_file(setting.value))
    except NetworkError as exc:
        raise _networks_file_error(exc, setting.where) from None


def _networks_file_error(exc: NetworkError, where: Where) -> ConfigError:
    key = "allowed_networks_file"
    if exc.line is not None:
        # Point at the bad line of the networks file itself, and say who named it.
        named_by = where.origin or f"{where.path}:{where.line}"
        message = f"{exc.detail} (file given by {key} in {named_by})"
        return ConfigError(message, path=exc.path, line=exc.line, key=key)
    path = None if where.origin else where.path
    return ConfigError(str(exc), path=path, line=where.line, key=key, origin=where.origin)


def _check_required(path: str | None, values: dict[str, Any]) -> None:
    if not values["listen"]:
        raise ConfigError(
            'nothing to listen on: add e.g. listen: "0.0.0.0:2222", or give it on the command line',
            path=path,
            key="listen",
        )
    if values["ipv4"] is None and values["ipv6"] is None:
        raise ConfigError(
            'no backend: set ipv4 (e.g. ipv4: "127.0.0.1:22"), ipv6 (e.g. ipv6: "[::1]:22"), '
            "or both",
            path=path,
        )
    if not values["allowed_networks"]:
        raise ConfigError(
            "no allowed networks: refusing to accept PROXY headers from anyone; to allow "
            "every peer write 0.0.0.0/0 and ::/0 explicitly",
            path=path,
            key="allowed_networks",
        )


def load_config(
    path: str | None, overrides: Sequence[Override] = (), only: Collection[str] | None = None
) -> Config:
    """Read the YAML file at `path` (None: no file), apply overrides, validate.

    `only`: read just these keys, for the helpers that run as root (the generator, `mmproxy
    routing`). Every other key keeps its default and is not looked at, nor is any file it
    names, and no key is required: the daemon checks the whole file when it starts.
    """
    settings = _read_file(path, only) if path is not None else {}
    for override in overrides:
        if only is None or override.key in only:
            settings[override.key] = _override(override)
    values: dict[str, Any] = {key.name: key.default for key in KEYS}
    values.update({name: setting.value for name, setting in settings.items()})
    if only is not None:
        return Config(path=path, **values)
    networks_file = settings.get("allowed_networks_file")
    if networks_file is not None and networks_file.value is not None:
        merged = values["allowed_networks"] + _file_networks(networks_file)
        values["allowed_networks"] = tuple(dict.fromkeys(merged))
    _check_required(path, values)
    _check_destination_ports(settings, values)
    return Config(path=path, **values)


def _check_destination_ports(settings: dict[str, _Setting], values: dict[str, Any]) -> None:
    """follow_destination_port lets the balancer pick the port: only from a list."""
    follow = settings.get("follow_destination_port")
    if follow is not None and follow.value and not values["allowed_destination_ports"]:
        message = (
            "true lets the balancer pick any port on the target host; list the ports it "
            'may pick in allowed_destination_ports, e.g. [80, 443, "8000-8099"]'
        )
        raise _error(Invalid(message, follow.where), "follow_destination_port")
    ports = settings.get("allowed_destination_ports")
    if ports is not None and not values["follow_destination_port"]:
        message = "has no effect without follow_destination_port: true; set both, or neither"
        raise _error(Invalid(message, ports.where), "allowed_destination_ports")

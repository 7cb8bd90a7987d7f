"""Configuration: one YAML file per instance, plus command-line overrides.

The file is composed (not loaded) so that every key and value keeps its line
number: administrators get "/etc/mmproxy/ssh.yaml:7: mark: ..." rather than a
bare "invalid value".  Values are checked strictly because a typo in a proxy
that decides whose source address to forge must stop the service, not be
guessed around.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from mmproxy.networks import (
    AllowedNetworks,
    Network,
    NetworkError,
    parse_network,
    read_networks_file,
)

__all__ = [
    "KEYS",
    "Address",
    "Config",
    "ConfigError",
    "Key",
    "Override",
    "load_config",
    "parse_address",
]

U32_MAX = 2**32 - 1
LOG_LEVELS = ("debug", "info", "warning", "error")
RESERVED_TABLES = {253: "default", 254: "main", 255: "local"}
MAX_SECONDS = 3600.0
# PROXY protocol spec, section 2: receivers must wait long enough for a
# retransmitted segment carrying the header; at least 3 seconds.
MIN_HEADER_TIMEOUT = 3.0

_TAG = "tag:yaml.org,2002:"


class ConfigError(Exception):
    """A configuration problem, worded for the administrator who has to fix it.

    str() reads like a compiler message: "FILE:LINE: KEY: what is wrong; fix".
    Errors from a command-line override name the option (`origin`) instead.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
        origin: str | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        self.origin = origin
        self.column = column
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [part for part in (self._location(), self.key, self.message) if part]
        return ": ".join(parts)

    def _location(self) -> str | None:
        if self.origin is not None:
            return self.origin
        if self.path is None:
            return None
        location = self.path
        if self.line is not None:
            location += f":{self.line}"
            if self.column is not None:
                location += f":{self.column}"
        return location


# --------------------------------------------------------------------------
# Values with their origin


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a value came from: a file line, or a command-line option."""

    path: str | None
    line: int | None = None
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class _Value:
    """A YAML (or override) value before validation, with its location.

    For sequences `data` is a list of _Value so that each item keeps its line.
    `text` is the scalar as written: YAML reads `yes` as true and `0123` as 83,
    and only the text tells us that happened.
    """

    data: object
    where: _Where
    kind: str = "scalar"  # "scalar", "sequence" or "mapping"
    text: str | None = None
    quoted: bool = False


class _Invalid(Exception):
    """Raised by value parsers; the loader turns it into a located ConfigError."""

    def __init__(self, message: str, where: _Where) -> None:
        super().__init__(message)
        self.message = message
        self.where = where


def _fail(value: _Value, message: str) -> NoReturn:
    raise _Invalid(message, value.where)


def _construct_scalar(node: ScalarNode, where: _Where) -> object:
    try:
        return SafeConstructor().construct_object(node)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise _Invalid(f"cannot read this value: {problem}", where) from None


def _from_node(node: Node, path: str) -> _Value:
    where = _Where(path, node.start_mark.line + 1)
    if isinstance(node, SequenceNode):
        return _Value([_from_node(item, path) for item in node.value], where, "sequence")
    if isinstance(node, MappingNode):
        return _Value(None, where, "mapping")
    assert isinstance(node, ScalarNode)
    data = _construct_scalar(node, where)
    return _Value(data, where, text=node.value, quoted=node.style in ("'", '"'))


def _implicit_tag(text: str) -> str:
    """The tag YAML gives `text` written unquoted (int, bool, str...)."""
    tag = Resolver().resolve(ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    return str(tag)


def _resolve_plain(text: str, where: _Where) -> _Value:
    # A command-line string is read as if written unquoted in the YAML file,
    # so "--mark 7" is the integer 7 and goes through the same checks.
    tag = _implicit_tag(text)
    data = _construct_scalar(ScalarNode(tag, text), where)
    return _Value(data, where, text=text)


def _from_python(value: object, where: _Where) -> _Value:
    if isinstance(value, list | tuple):
        return _Value([_from_python(item, where) for item in value], where, "sequence")
    if isinstance(value, dict):
        return _Value(None, where, "mapping")
    if isinstance(value, str):
        return _resolve_plain(value, where)
    return _Value(value, where)


# --------------------------------------------------------------------------
# Describing what we got


def _describe(value: _Value) -> str:
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


def _hint(value: _Value) -> str:
    if value.kind != "scalar":
        return ""
    if value.data is None:
        return "; write a value after the colon, or delete the line to use the default"
    if isinstance(value.data, str) and value.quoted:
        tag = _implicit_tag(value.data)
        if tag in (_TAG + "int", _TAG + "float", _TAG + "bool"):
            return "; remove the quotes"
    return ""


def _yaml11_trap(value: _Value) -> None:
    """Refuse numbers that YAML 1.1 reads differently from how they look."""
    text = value.text
    if text is None or not isinstance(value.data, int | float):
        return
    if ":" in text:
        _fail(
            value,
            f"{text!r} is read by YAML as a base-60 number ({value.data}); write a plain "
            "number instead",
        )
    if re.fullmatch(r"[-+]?0[0-7_]+", text):
        sign = text[0] if text[0] in "+-" else ""
        plain = sign + (text.lstrip("+-").lstrip("0_") or "0")
        _fail(
            value,
            f"{text!r} has a leading zero, which YAML reads as octal ({value.data}); write {plain}",
        )


# --------------------------------------------------------------------------
# Scalar parsers


def _expect_str(value: _Value, expected: str) -> str:
    if value.kind == "scalar" and isinstance(value.data, str):
        return value.data
    if value.where.origin is not None and value.text is not None:
        # On the command line there are no quotes: a string key takes the text.
        return value.text
    _fail(value, f"expected {expected}, got {_describe(value)}{_hint(value)}")


def _is_int(value: _Value) -> bool:
    data = value.data
    # bool is a subclass of int: `mark: true` must not become mark 1.
    return value.kind == "scalar" and isinstance(data, int) and not isinstance(data, bool)


def _integer(low: int, high: int, extra: str = "") -> Callable[[_Value], int]:
    expected = f"an integer from {low} to {high}{extra}"

    def parse(value: _Value) -> int:
        if _is_int(value):
            _yaml11_trap(value)
            number = value.data
            assert isinstance(number, int)
            if low <= number <= high:
                return number
        elif value.kind == "scalar" and isinstance(value.data, float) and value.data.is_integer():
            _fail(value, f"expected {expected}, got {_describe(value)}; write {int(value.data)}")
        _fail(value, f"expected {expected}, got {_describe(value)}{_hint(value)}")

    return parse


def _parse_workers(value: _Value) -> int:
    """ "auto" is 0 (one worker process per CPU mmproxy may run on), else the count."""
    data = value.data
    if value.kind == "scalar" and isinstance(data, str) and data.strip().lower() == "auto":
        return 0
    return _integer(1, 256, ' or "auto"')(value)


def _parse_table(value: _Value) -> int:
    table = _integer(1, U32_MAX, " other than 253, 254 and 255")(value)
    if table in RESERVED_TABLES:
        _fail(
            value,
            f"table {table} is reserved by the kernel (the '{RESERVED_TABLES[table]}' table); "
            "mmproxy needs a routing table of its own: pick another number, such as the "
            "default 100",
        )
    return table


def _parse_bool(value: _Value) -> bool:
    data = value.data
    if value.kind == "scalar" and isinstance(data, bool):
        if value.text is None or value.text.lower() in ("true", "false"):
            return data
        _fail(
            value,
            f"expected true or false, got {value.text!r}; write {str(data).lower()} "
            "(yes/no/on/off are not accepted, to avoid YAML 1.1 surprises)",
        )
    _fail(value, f"expected true or false, got {_describe(value)}{_hint(value)}")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DURATION_EXPECTED = (
    "a duration: a number of seconds (5, 2.5) or a number with a unit (500ms, 5s, 2m)"
)


def _seconds(value: _Value) -> float:
    """A non-negative finite duration in seconds, from a number or "5s"-style text."""
    data = value.data
    if _is_int(value) or (value.kind == "scalar" and isinstance(data, float)):
        _yaml11_trap(value)
        assert isinstance(data, int | float)
        seconds = float(data)
    elif value.kind == "scalar" and isinstance(data, str):
        match = _DURATION.fullmatch(data.strip())
        if match is None:
            _fail(value, f"expected {_DURATION_EXPECTED}, got {data!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        _fail(value, f"expected {_DURATION_EXPECTED}, got {_describe(value)}{_hint(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        _fail(value, f"expected {_DURATION_EXPECTED}, got {_describe(value)}")
    return seconds


def _show_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def _parse_header_timeout(value: _Value) -> float:
    seconds = _seconds(value)
    if seconds < MIN_HEADER_TIMEOUT:
        _fail(
            value,
            f"{_show_seconds(seconds)} is too short: the PROXY protocol specification asks "
            "receivers to wait at least 3 seconds for the header, long enough for a TCP "
            "retransmit; write 3s or more (default 5s)",
        )
    if seconds > MAX_SECONDS:
        _fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


def _parse_connect_timeout(value: _Value) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        _fail(value, "expected more than 0 seconds, got 0; the default is 5s")
    if seconds > MAX_SECONDS:
        _fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


def _parse_udp_idle_timeout(value: _Value) -> float:
    seconds = _seconds(value)
    if seconds < 1:
        _fail(
            value,
            f"{_show_seconds(seconds)} is too short: a UDP flow needs at least 1s to see "
            "its reply; the default is 60s",
        )
    if seconds > MAX_SECONDS:
        _fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


def _choice(*options: str) -> Callable[[_Value], str]:
    expected = "one of " + ", ".join(options)

    def parse(value: _Value) -> str:
        word = _expect_str(value, expected).strip().lower()
        if word in options:
            return word
        close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        _fail(value, f"expected {expected}, got {_describe(value)}{suggestion}")

    return parse


_parse_log_level = _choice(*LOG_LEVELS)


def _parse_duration(value: _Value) -> float:
    seconds = _seconds(value)
    if seconds > MAX_SECONDS:
        _fail(value, f"{_show_seconds(seconds)} is too long: expected at most 3600s (1 hour)")
    return seconds


# --------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True, slots=True)
class Address:
    """An IP literal and a port; host names are never resolved. `transport` matters only
    for listen addresses ("udp" from udp://); targets serve both."""

    host: str
    port: int
    transport: str = "tcp"

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def endpoint(self) -> str:
        """host:port with IPv6 in brackets, without a scheme (systemd's notation)."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"udp://{self.endpoint}" if self.transport == "udp" else self.endpoint


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_ADDRESS_EXPECTED = "expected an address like 127.0.0.1:22 or [::1]:22"


def _strip_scheme(text: str, udp: bool) -> tuple[str, str]:
    """(transport, the rest); `udp` says whether udp:// may be written here."""
    match = _SCHEME.match(text)
    if match is None:
        return "tcp", text
    scheme, rest = match.group(1).lower(), text[match.end() :]
    if scheme == "udp" and not udp:
        raise ValueError(
            f"a target serves both TCP and UDP clients: write it without a scheme, as {rest!r}"
        )
    if scheme not in ("tcp", "udp"):
        written = "tcp://, udp:// or nothing" if udp else "tcp:// or nothing"
        raise ValueError(f"unknown scheme '{scheme}://'; write {written}, as in {rest!r}")
    return scheme, rest


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        return _split_bracketed(text)
    if ":" not in text:
        if text.isascii() and text.isdigit():
            raise ValueError(
                f"missing IP address; write 0.0.0.0:{text} for every IPv4 address, "
                f"[::]:{text} for every IPv6 address, or 127.0.0.1:{text} for this host only"
            )
        raise ValueError(f"missing port; write {text}:PORT, e.g. 127.0.0.1:22")
    host, _, port = text.rpartition(":")
    if ":" in host:
        raise ValueError(_unbracketed_ipv6(text, host, port))
    return host, port


def _split_bracketed(text: str) -> tuple[str, str]:
    end = text.find("]")
    if end < 0:
        raise ValueError("missing ']' after the IPv6 address; write e.g. [::1]:22")
    host, rest = text[1:end], text[end + 1 :]
    if not rest:
        raise ValueError(f"missing port; write {text}:PORT, e.g. [::1]:22")
    if not rest.startswith(":"):
        raise ValueError(f"expected ':' and a port after ']', got {rest!r}")
    if _is_ipv4(host):
        raise ValueError(f"brackets are only for IPv6 addresses; write {host}{rest}")
    return host, rest[1:]


def _unbracketed_ipv6(text: str, host: str, port: str) -> str:
    if _is_ip(host):
        return f"IPv6 addresses need brackets; write [{host}]:{port}"
    if _is_ip(text):
        return f"missing port, and IPv6 addresses need brackets; write [{text}]:PORT"
    return f"{_ADDRESS_EXPECTED} (IPv6 addresses in brackets)"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _parse_host(host: str, port: str) -> str:
    if not host:
        raise ValueError(f"missing IP address before ':'; write e.g. 127.0.0.1:{port}")
    version = ipaddress.IPv6Address if ":" in host else ipaddress.IPv4Address
    try:
        return str(version(host))
    except ValueError as exc:
        reason = str(exc)  # family-specific: "Octet 300 (> 255) not permitted..."
    if host.lower() == "localhost":
        raise ValueError(
            f"host names are not resolved; write 127.0.0.1:{port} (or [::1]:{port}) "
            "instead of localhost"
        )
    if re.fullmatch(r"[0-9a-fA-F.:%]+", host):
        raise ValueError(f"{host!r} is not a valid IP address ({reason})")
    raise ValueError(
        f"{host!r} is not an IP address: host names are not resolved; write its IP address, "
        f"e.g. 127.0.0.1:{port}"
    )


def _parse_port(port: str) -> int:
    if not port:
        raise ValueError("missing port after ':'; expected a number from 1 to 65535")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"port {port!r} is not a number; expected 1 to 65535")
    if len(port) > 1 and port.startswith("0"):
        raise ValueError(f"port {port!r} has a leading zero; write {int(port)}")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range; expected 1 to 65535")
    return number


def _address(text: str, udp: bool = False) -> Address:
    """Parse [tcp://]host:port or [tcp://][v6]:port (and udp:// when `udp`); ValueError
    says what to write."""
    original = text
    try:
        if not text.strip():
            raise ValueError(f"{_ADDRESS_EXPECTED}, got an empty string")
        if text != text.strip() or any(ch.isspace() for ch in text):
            raise ValueError("addresses cannot contain spaces")
        transport, rest = _strip_scheme(text, udp)
        host, port = _split_host_port(rest)
        return Address(_parse_host(host, port), _parse_port(port), transport)
    except ValueError as exc:
        raise ValueError(f"invalid address {original!r}: {exc}") from None


def parse_address(text: str, *, what: str) -> Address:
    """Parse an address such as "127.0.0.1:22", "tcp://[::1]:22" or, for `listen`,
    "udp://0.0.0.0:53".

    `what` names the setting in the error, e.g. "listen".
    """
    try:
        return _address(text, udp=what == "listen")
    except ValueError as exc:
        raise ConfigError(str(exc), key=what) from None


def _address_value(value: _Value, udp: bool = False) -> Address:
    text = _expect_str(value, 'an address string like "127.0.0.1:22" or "[::1]:22"')
    try:
        return _address(text, udp)
    except ValueError as exc:
        _fail(value, str(exc))


def _items(value: _Value, expected: str) -> list[_Value]:
    """A single value or a list of them: `listen: "a"` and `listen: ["a", "b"]`."""
    if value.kind == "sequence":
        assert isinstance(value.data, list)
        return value.data
    if value.kind == "mapping":
        _fail(value, f"expected {expected}, got {_describe(value)}")
    return [value]


def _parse_listen(value: _Value) -> tuple[Address, ...]:
    items = _items(value, "an address or a list of addresses")
    if not items:
        _fail(value, 'empty list; expected at least one address, e.g. ["0.0.0.0:2222"]')
    seen: dict[Address, int | None] = {}
    for item in items:
        address = _address_value(item, udp=True)
        if address in seen:
            _fail(item, f"{address} is listed twice (also on line {seen[address]}); keep one")
        seen[address] = item.where.line
    return tuple(seen)


def _backend(version: int) -> Callable[[_Value], Address | None]:
    other = 6 if version == 4 else 4
    example = "127.0.0.1:22" if version == 4 else "[::1]:22"

    def parse(value: _Value) -> Address | None:
        if value.kind == "scalar" and value.data is None:
            return None  # explicitly unset: no backend for this family
        address = _address_value(value)
        if address.family != (socket.AF_INET if version == 4 else socket.AF_INET6):
            _fail(
                value,
                f"expected an IPv{version} address like {example}, got {address}; "
                f"IPv{other} backends belong in ipv{other}",
            )
        return address

    return parse


def _parse_networks(value: _Value) -> tuple[Network, ...]:
    networks: list[Network] = []
    for item in _items(value, "a network or a list of networks"):
        text = _expect_str(item, 'a network string like "192.0.2.0/24"')
        try:
            networks.append(parse_network(text))
        except NetworkError as exc:
            _fail(item, exc.detail)
    return tuple(dict.fromkeys(networks))


def _parse_networks_file(value: _Value) -> str | None:
    if value.kind == "scalar" and value.data is None:
        return None
    path = _expect_str(value, 'a file path like "/etc/mmproxy/allowed-networks.txt"')
    if not path.strip():
        _fail(value, "expected a file path, got an empty string")
    if value.where.origin is None and value.where.path and not os.path.isabs(path):
        # Relative to the YAML file, so an instance directory can be moved as a whole.
        path = os.path.join(os.path.dirname(value.where.path), path)
    return path


# --------------------------------------------------------------------------
# The key table: adding a setting is one line here plus one Config field.


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[_Value], Any]
    default: Any
    help: str


KEYS: tuple[Key, ...] = (
    Key("listen", _parse_listen, (), "addresses to accept PROXY-protocol connections on"),
    Key("ipv4", _backend(4), None, "where to connect for IPv4 clients (IPv4 address:port)"),
    Key("ipv6", _backend(6), None, "where to connect for IPv6 clients ([IPv6 address]:port)"),
    Key("allowed_networks", _parse_networks, (), "peers allowed to send PROXY headers"),
    Key("allowed_networks_file", _parse_networks_file, None, "more allowed networks, one a line"),
    Key("mark", _integer(0, U32_MAX), 123, "firewall mark put on connections to the backend"),
    Key("table", _parse_table, 100, "routing table that routes replies back to mmproxy"),
    Key("header_timeout", _parse_header_timeout, 5.0, "how long to wait for the PROXY header"),
    Key("connect_timeout", _parse_connect_timeout, 5.0, "how long to wait for the backend"),
    Key("max_connections", _integer(1, 1_000_000), 10000, "concurrent connections at most"),
    Key("workers", _parse_workers, 0, "worker processes; 0 is auto: one per CPU"),
    Key("allow_local_sources", _parse_bool, False, "accept loopback/unspecified client sources"),
    Key("log_level", _parse_log_level, "info", "one of debug, info, warning, error"),
    Key("log_connections", _choice("all", "rejected", "none"), "all", "per-connection log records"),
    Key("follow_destination_port", _parse_bool, False, "target port = the header's dest port"),
    Key("drain_timeout", _parse_duration, 30.0, "how long a stop waits for connections"),
    Key("check_failure", _choice("fail", "warn"), "fail", "what a failed self-check does"),
    Key("manage_routing", _parse_bool, True, "apply and remove the routing rules"),
    Key("routing", _choice("auto", "lo", "fwmark"), "auto", "which routing variant to use"),
    Key("firewall", _choice("nftables", "iptables"), "nftables", "tool for the fwmark rules"),
    Key("idle_timeout", _parse_duration, 0.0, "close after this long without traffic"),
    Key("half_close_timeout", _parse_duration, 60.0, "close a half-closed one after"),
    Key("tcp_keepalive", _parse_bool, True, "TCP keepalive towards client and target"),
    Key("udp_idle_timeout", _parse_udp_idle_timeout, 60.0, "close a quiet UDP flow after"),
    Key("udp_max_flows", _integer(1, 1_000_000), 10000, "concurrent UDP flows at most"),
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
    log_connections: str = "all"  # all | rejected (their warnings only) | none
    follow_destination_port: bool = False
    drain_timeout: float = 30.0
    check_failure: str = "fail"
    manage_routing: bool = True
    routing: str = "auto"
    firewall: str = "nftables"
    idle_timeout: float = 0.0
    half_close_timeout: float = 60.0
    tcp_keepalive: bool = True
    udp_idle_timeout: float = 60.0
    udp_max_flows: int = 10000

    def allowed(self) -> AllowedNetworks:
        return AllowedNetworks(self.allowed_networks)

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
    where: _Where


def _error(exc: _Invalid, key: str) -> ConfigError:
    where = exc.where
    path = None if where.origin is not None else where.path
    return ConfigError(exc.message, path=path, line=where.line, key=key, origin=where.origin)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the configuration file: {exc.strerror or exc}", path=path
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"not UTF-8 text (bad byte 0x{data[exc.start]:02x})", path=path, line=line
        ) from None


def _syntax_hint(source_line: str) -> str:
    if "\t" in source_line:
        return "; YAML does not allow tabs for indentation, use spaces"
    if "[" in source_line and "]:" in source_line:
        return "; quote values that start with '[', e.g. ipv6: \"[::1]:22\""
    return ""


def _compose(path: str, text: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        if mark is None:
            raise ConfigError(f"YAML syntax error: {problem}", path=path) from None
        lines = text.splitlines()
        source = lines[mark.line] if mark.line < len(lines) else ""
        raise ConfigError(
            f"YAML syntax error: {problem}{_syntax_hint(source)}",
            path=path,
            line=mark.line + 1,
            column=mark.column + 1,
        ) from None
    except yaml.YAMLError as exc:
        # ReaderError (control characters) carries a character offset, not a mark.
        position = getattr(exc, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else None
        reason = getattr(exc, "reason", None) or str(exc)
        character = getattr(exc, "character", None)
        if isinstance(character, str):  # PyYAML gives a code point or a character
            character = ord(character)
        if isinstance(character, int):
            reason = f"unacceptable character #x{character:04x}: {reason}"
        raise ConfigError(f"YAML syntax error: {reason}", path=path, line=line) from None
    except (ValueError, OverflowError) as exc:
        # PyYAML lets some escapes through unchecked: "\U4DDDDDDD" is beyond Unicode.
        raise ConfigError(f"YAML syntax error: {exc}", path=path) from None


def _read_file(path: str) -> dict[str, _Setting]:
    root = _compose(path, _read_text(path))
    if root is None:
        raise ConfigError(
            'the file is empty; expected settings such as listen: "0.0.0.0:2222" '
            "(see example.yaml)",
            path=path,
        )
    if not isinstance(root, MappingNode):
        kind = "a list" if isinstance(root, SequenceNode) else "a single value"
        raise ConfigError(
            f"expected settings as 'key: value' lines at the top level, got {kind}",
            path=path,
            line=root.start_mark.line + 1,
        )
    settings: dict[str, _Setting] = {}
    for key_node, value_node in root.value:
        name, line = _key_name(path, key_node), key_node.start_mark.line + 1
        if name in settings:
            first = settings[name].where.line
            raise ConfigError(
                f"this key appears twice, on lines {first} and {line}; keep only one",
                path=path,
                line=line,
                key=name,
            )
        key = _known_key(name, _Where(path, line))
        try:
            value = _from_node(value_node, path)
            settings[name] = _Setting(key.parse(value), value.where)
        except _Invalid as exc:
            raise _error(exc, name) from None
    return settings


def _key_name(path: str, node: Node) -> str:
    if not isinstance(node, ScalarNode):
        raise ConfigError(
            "expected a setting name before ':', got a list or mapping",
            path=path,
            line=node.start_mark.line + 1,
        )
    # The text as written: YAML would turn a key `on:` into True.
    return str(node.value)


def _known_key(name: str, where: _Where) -> Key:
    key = _KEYS_BY_NAME.get(name)
    if key is not None:
        return key
    names = [key.name for key in KEYS]
    close = difflib.get_close_matches(name.replace("-", "_").lower(), names, n=1, cutoff=0.6)
    if close:
        message = f"unknown key; did you mean {close[0]!r}?"
    else:
        message = f"unknown key; known keys are: {', '.join(names)}"
    raise _error(_Invalid(message, where), name)


def _override(override: Override) -> _Setting:
    where = _Where(None, origin=override.origin)
    key = _known_key(override.key, where)
    try:
        return _Setting(key.parse(_from_python(override.value, where)), where)
    except _Invalid as exc:
        raise _error(exc, override.key) from None


def _file_networks(setting: _Setting) -> tuple[Network, ...]:
    try:
        return tuple(network for _, network in read_networks_file(setting.value))
    except NetworkError as exc:
        raise _networks_file_error(exc, setting.where) from None


def _networks_file_error(exc: NetworkError, where: _Where) -> ConfigError:
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


def load_config(path: str | None, overrides: Sequence[Override] = ()) -> Config:
    """Read the YAML file at `path` (None: no file), apply overrides, validate."""
    settings = _read_file(path) if path is not None else {}
    for override in overrides:
        settings[override.key] = _override(override)
    values: dict[str, Any] = {key.name: key.default for key in KEYS}
    values.update({name: setting.value for name, setting in settings.items()})
    networks_file = settings.get("allowed_networks_file")
    if networks_file is not None and networks_file.value is not None:
        merged = values["allowed_networks"] + _file_networks(networks_file)
        values["allowed_networks"] = tuple(dict.fromkeys(merged))
    _check_required(path, values)
    return Config(path=path, **values)

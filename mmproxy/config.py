"""Configuration: one YAML file per instance, plus command-line overrides.

Values are checked strictly because a typo in a proxy that decides whose source
address to forge must stop the service, not be guessed around.  The layers, each
using only the ones before it: address (the Address type), config_yaml (the file
with line numbers, ConfigError), config_values (one parser per kind of value), and
this module (the key table, Config, loading).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from mmproxy.address import Address, read_address, read_addresses
from mmproxy.config_values import (
    backend,
    choice,
    integer,
    parse_bool,
    parse_connect_timeout,
    parse_duration,
    parse_group,
    parse_header_timeout,
    parse_listen_value,
    parse_log_level,
    parse_mark,
    parse_metrics_listen,
    parse_networks,
    parse_networks_file,
    parse_ports,
    parse_table,
    parse_udp_idle_timeout,
    parse_workers,
)
from mmproxy.config_yaml import (
    ConfigError,
    Invalid,
    Value,
    Where,
    read_mapping,
    value_from_node,
    value_from_python,
)
from mmproxy.networks import (
    AllowedNetworks,
    Network,
    NetworkError,
    read_networks_file,
)

T = TypeVar("T")

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


# --------------------------------------------------------------------------
# The key table. A setting is one Config field: its type, its default (written only
# there), its parser and a line of help; KEYS is read from those fields.


@dataclass(frozen=True)
class Key:
    """One setting as the loader sees it, read from a Config field."""

    name: str
    parse: Callable[[Value], Any]
    default: Any
    help: str


def _setting(default: T, parse: Callable[[Value], Any], help: str) -> T:
    """A Config field that is a setting: `default` applies when the file leaves it out."""
    return field(default=default, metadata={"parse": parse, "help": help})


@dataclass(frozen=True)
class Config:
    """A validated configuration; its fields after `path` are the settings, in file order."""

    path: str | None = None
    listen: tuple[Address, ...] = _setting(
        (), parse_listen_value, "addresses (or port ranges) to accept connections on"
    )
    ipv4: Address | None = _setting(
        None, backend(4), "where to connect for IPv4 clients (IPv4 address:port)"
    )
    ipv6: Address | None = _setting(
        None, backend(6), "where to connect for IPv6 clients ([IPv6 address]:port)"
    )
    allowed_networks: tuple[Network, ...] = _setting(
        (), parse_networks, "peers allowed to send PROXY headers"
    )
    allowed_networks_file: str | None = _setting(
        None, parse_networks_file, "more allowed networks, one a line"
    )
    mark: int = _setting(123, parse_mark, "firewall mark put on connections to the backend")
    table: int = _setting(100, parse_table, "routing table that routes replies back to mmproxy")
    header_timeout: float = _setting(
        5.0, parse_header_timeout, "how long to wait for the PROXY header"
    )
    connect_timeout: float = _setting(
        5.0, parse_connect_timeout, "how long to wait for the backend"
    )
    max_connections: int = _setting(10000, integer(1, 1_000_000), "concurrent connections at most")
    workers: int = _setting(0, parse_workers, "worker processes; 0 is auto: one per CPU")
    allow_local_sources: bool = _setting(
        False, parse_bool, "accept loopback/unspecified client sources"
    )
    log_level: str = _setting("info", parse_log_level, "one of debug, info, warning, error")
    log_connections: str = _setting(
        "all", choice("all", "rejected", "none"), "per-connection log records"
    )
    follow_destination_port: bool = _setting(
        False, parse_bool, "target port = the header's dest port"
    )
    # (low, high) ranges
    allowed_destination_ports: tuple[tuple[int, int], ...] = _setting(
        (), parse_ports, "ports follow_destination_port may use"
    )
    drain_timeout: float = _setting(30.0, parse_duration, "how long a stop waits for connections")
    check_failure: str = _setting("fail", choice("fail", "warn"), "what a failed self-check does")
    manage_routing: bool = _setting(True, parse_bool, "apply and remove the routing rules")
    share_table: bool = _setting(
        False, parse_bool, "allow `table` to hold routes mmproxy did not add"
    )
    routing: str = _setting("auto", choice("auto", "lo", "fwmark"), "which routing variant to use")
    firewall: str = _setting(
        "nftables", choice("nftables", "iptables"), "tool for the fwmark rules"
    )
    idle_timeout: float = _setting(0.0, parse_duration, "close after this long without traffic")
    half_close_timeout: float = _setting(60.0, parse_duration, "close a half-closed one after")
    tcp_keepalive: bool = _setting(True, parse_bool, "TCP keepalive towards client and target")
    udp_idle_timeout: float = _setting(60.0, parse_udp_idle_timeout, "close a quiet UDP flow after")
    udp_max_flows: int = _setting(10000, integer(1, 1_000_000), "concurrent UDP flows at most")
    udp_max_flows_per_balancer: int | None = _setting(
        None,
        integer(1, 1_000_000),
        "UDP flows one balancer address may hold; default: udp_max_flows",
    )
    udp_header: str = _setting("v2", choice("v2", "spp"), "UDP framing: PROXY v2 or Spectrum's SPP")
    metrics_listen: Address | None = _setting(
        None, parse_metrics_listen, "serve Prometheus metrics at http://ADDR/metrics; off"
    )
    status_group: str | None = _setting(
        None, parse_group, "group that may read `mmproxy status` besides root"
    )

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


KEYS: tuple[Key, ...] = tuple(
    Key(f.name, f.metadata["parse"], f.default, f.metadata["help"])
    for f in fields(Config)
    if f.name != "path"
)
_KEYS_BY_NAME = {key.name: key for key in KEYS}


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
    import difflib  # for a misspelt key only: not on every start-up

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

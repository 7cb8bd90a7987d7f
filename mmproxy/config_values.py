"""Parsers for mmproxy's setting values: each takes a located Value and returns the
checked Python value, or raises Invalid saying what to write instead.

One duration parser serves every timeout; only its lower bound and the message for a
shorter value differ between keys.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from mmproxy.address import Address, read_address, read_addresses
from mmproxy.config_yaml import Value, fail, implicit_tag
from mmproxy.networks import Network, NetworkError, parse_network

T = TypeVar("T")
Parser: TypeAlias = Callable[[Value], T]

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


def integer(low: int, high: int, extra: str = "") -> Parser[int]:
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


def parse_workers(value: Value) -> int:
    """ "auto" is 0 (one worker process per CPU mmproxy may run on), else the count."""
    data = value.data
    if value.kind == "scalar" and isinstance(data, str) and data.strip().lower() == "auto":
        return 0
    return integer(1, 256, ' or "auto"')(value)


def parse_mark(value: Value) -> int:
    if _is_int(value) and value.data == 0:
        # `ip rule add fwmark 0` matches every packet: with the table's `local 0.0.0.0/0`,
        # all of this host's traffic (SSH included) would be delivered to lo.
        fail(
            value,
            "mark 0 would match every packet (an `ip rule fwmark 0` takes over the whole "
            "host's routing); pick a non-zero mark, such as the default 123",
        )
    return integer(1, U32_MAX)(value)


def parse_table(value: Value) -> int:
    table = integer(1, U32_MAX, " other than 253, 254 and 255")(value)
    if table in RESERVED_TABLES:
        fail(
            value,
            f"table {table} is reserved by the kernel (the '{RESERVED_TABLES[table]}' table); "
            "mmproxy needs a routing table of its own: pick another number, such as the "
            "default 100",
        )
    return table


def parse_bool(value: Value) -> bool:
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


def duration(minimum: float = 0.0, too_short: str = "", *, above: bool = False) -> Parser[float]:
    """A duration of at least `minimum` seconds (more than it, with `above`) and at most
    MAX_SECONDS. `too_short` is the message for a shorter one; {shown} in it is replaced
    by the value in seconds, as in "2s"."""

    def parse(value: Value) -> float:
        seconds = _seconds(value)
        shown = _show_seconds(seconds)
        if seconds < minimum or (above and seconds == minimum):
            fail(value, too_short.format(shown=shown))
        if seconds > MAX_SECONDS:
            fail(value, f"{shown} is too long: expected at most 3600s (1 hour)")
        return seconds

    return parse


parse_duration = duration()
parse_header_timeout = duration(
    MIN_HEADER_TIMEOUT,
    "{shown} is too short: the PROXY protocol specification asks receivers to wait at "
    "least 3 seconds for the header, long enough for a TCP retransmit; write 3s or more "
    "(default 5s)",
)
parse_connect_timeout = duration(
    0.0, "expected more than 0 seconds, got 0; the default is 5s", above=True
)
parse_udp_idle_timeout = duration(
    1.0,
    "{shown} is too short: a UDP flow needs at least 1s to see its reply; the default is 60s",
)


def choice(*options: str) -> Parser[str]:
    expected = "one of " + ", ".join(options)

    def parse(value: Value) -> str:
        word = _expect_str(value, expected).strip().lower()
        if word in options:
            return word
        import difflib  # for a misspelt word only: not on every start-up

        close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        fail(value, f"expected {expected}, got {_describe(value)}{suggestion}")

    return parse


parse_log_level = choice(*LOG_LEVELS)


# --------------------------------------------------------------------------
# Addresses, networks and ports


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


def parse_listen_value(value: Value) -> tuple[Address, ...]:
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


def parse_metrics_listen(value: Value) -> Address | None:
    if value.kind == "scalar" and value.data is None:
        return None  # off
    return _address_value(value)


def parse_group(value: Value) -> str | None:
    if value.kind == "scalar" and value.data is None:
        return None
    text = _expect_str(value, 'a group name like "adm"')
    if not text or any(c.isspace() or c in ":/" for c in text):
        fail(value, f"{text!r} is not a group name")
    return text


def backend(version: int) -> Parser[Address | None]:
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


def parse_networks(value: Value) -> tuple[Network, ...]:
    networks: list[Network] = []
    for item in _items(value, "a network or a list of networks"):
        text = _expect_str(item, 'a network string like "192.0.2.0/24"')
        try:
            networks.append(parse_network(text))
        except NetworkError as exc:
            fail(item, exc.detail)
    return tuple(dict.fromkeys(networks))


def parse_networks_file(value: Value) -> str | None:
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


def parse_ports(value: Value) -> tuple[tuple[int, int], ...]:
    """Ports and ranges as (low, high) pairs, for allowed_destination_ports."""
    ranges = [_port_range(item) for item in _items(value, _PORTS_EXPECTED)]
    if not ranges:
        fail(value, f'empty list; expected {_PORTS_EXPECTED}, e.g. [80, 443, "8000-8099"]')
    return tuple(sorted(set(ranges)))


def _port_range(item: Value) -> tuple[int, int]:
    if _is_int(item):
        port = integer(1, 65535)(item)
        return port, port
    if item.kind == "scalar" and isinstance(item.data, str):
        match = _PORT_RANGE.fullmatch(item.data)
        if match is not None:
            low, high = int(match.group(1)), int(match.group(2))
            if 1 <= low <= high <= 65535:
                return low, high
            fail(item, f"{item.data!r}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
    fail(item, f"expected {_PORTS_EXPECTED}, got {_describe(item)}{_hint(item)}")

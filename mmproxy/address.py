"""The address value type: an IP literal and a port, as written in mmproxy's settings.

Runtime modules use Address; the text parsers here raise ValueError saying what to
write, and the configuration turns that into a located ConfigError.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = ["MAX_LISTEN_RANGE", "Address", "read_address", "read_addresses"]


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


# Ports in one `listen:` range. Each port is a socket (and a systemd ListenStream), so a
# wider span belongs to a firewall redirect onto one port, which needs no socket per port.
MAX_LISTEN_RANGE = 1024


def read_address(text: str, udp: bool = False) -> Address:
    """Parse [tcp://]host:port or [tcp://][v6]:port (and udp:// when `udp`); ValueError
    says what to write."""
    return read_addresses(text, udp, ranges=False)[0]


def read_addresses(text: str, udp: bool, ranges: bool) -> tuple[Address, ...]:
    """One address, or with `ranges` one per port of host:FIRST-LAST, in port order."""
    original = text
    try:
        if not text.strip():
            raise ValueError(f"{_ADDRESS_EXPECTED}, got an empty string")
        if text != text.strip() or any(ch.isspace() for ch in text):
            raise ValueError("addresses cannot contain spaces")
        transport, rest = _strip_scheme(text, udp)
        host, port = _split_host_port(rest)
        if "-" in port.lstrip("+-"):
            if not ranges:
                raise ValueError("a port range (FIRST-LAST) is only allowed in `listen`")
            ports = _parse_port_range(port)
        else:
            number = _parse_port(port)
            ports = range(number, number + 1)
        ip = _parse_host(host, str(ports[0]))
        return tuple(Address(ip, number, transport) for number in ports)
    except ValueError as exc:
        raise ValueError(f"invalid address {original!r}: {exc}") from None


def _parse_port_range(text: str) -> range:
    first_text, _, last_text = text.partition("-")
    if not first_text or not last_text or "-" in last_text:
        raise ValueError(f"port range {text!r}: expected FIRST-LAST, e.g. 27015-27030")
    first, last = _parse_port(first_text), _parse_port(last_text)
    if first > last:
        raise ValueError(f"port range {text!r} runs backwards; write {last}-{first}")
    if last - first + 1 > MAX_LISTEN_RANGE:
        raise ValueError(
            f"port range {text!r} has {last - first + 1} ports, at most {MAX_LISTEN_RANGE}; "
            "for more, redirect the span to one port in the firewall (a TPROXY-style "
            "set-up: mmproxy.yaml(5), PORT RANGES)"
        )
    return range(first, last + 1)

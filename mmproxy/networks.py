"""Networks allowed to send PROXY-protocol headers.

Only peers inside these networks (normally the load balancers) may tell mmproxy
which client address to impersonate; anyone else could spoof any source address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, NetmaskValueError

import pytricia

from mmproxy.files import FileRefused, read_small_file

Network = IPv4Network | IPv6Network

_EXPECTED = (
    "expected a network in CIDR form like 192.0.2.0/24 or 2001:db8::/32, "
    "or a single address like 192.0.2.7"
)

# ::ffff:0:0/96 holds IPv4 addresses as seen through a dual-stack [::] socket.
_V4_MAPPED = IPv6Network("::ffff:0:0/96")


class NetworkError(ValueError):
    """A network (or a networks file) that cannot be used.

    str() is the full message, prefixed with "path:line: " when the error comes
    from a file; `detail` is the message without that prefix so that callers
    can re-locate it (the config layer adds which key named the file).
    """

    def __init__(self, detail: str, *, path: str | None = None, line: int | None = None) -> None:
        self.detail = detail
        self.path = path
        self.line = line
        super().__init__(_locate(detail, path, line))


def _locate(detail: str, path: str | None, line: int | None) -> str:
    if path is None:
        return detail
    if line is None:
        return f"{path}: {detail}"
    return f"{path}:{line}: {detail}"


def parse_network(text: str) -> Network:
    """Parse one CIDR network; a bare address means a single host (/32 or /128)."""
    text = text.strip()
    if not text:
        raise NetworkError(f"{_EXPECTED}, got an empty value")
    if "," in text or any(ch.isspace() for ch in text):
        # Often several networks pasted on one line: name the fix, not just the failure.
        raise NetworkError(
            f"{_EXPECTED}, got {text!r}: write one network per entry (one per line in a "
            "networks file, one per list item in YAML)"
        )
    if "%" in text:
        raise NetworkError(f"{_EXPECTED}, got {text!r}: zone indexes (%...) are not allowed")
    version = IPv6Network if ":" in text else IPv4Network
    try:
        return version(text, strict=True)
    except NetmaskValueError:
        family, limit = ("IPv6", 128) if version is IPv6Network else ("IPv4", 32)
        raise NetworkError(
            f"{_EXPECTED}, got {text!r}: the prefix length after '/' must be a number "
            f"from 0 to {limit} for {family}"
        ) from None
    except ValueError as exc:
        if "host bits set" in str(exc):
            return _raise_host_bits(text, version)
        raise NetworkError(f"{_EXPECTED}, got {text!r}{_why(text, exc)}") from None


def _why(text: str, exc: ValueError) -> str:
    # ipaddress explains IP-looking mistakes well ("Octet 300 (> 255) not
    # permitted"); for anything else ("localhost") its wording only confuses.
    if re.fullmatch(r"[0-9A-Fa-f.:/]+", text):
        return f" ({exc})"
    return " (host names are not allowed here)"


def _raise_host_bits(text: str, version: type[Network]) -> Network:
    network = version(text, strict=False)
    address = text.partition("/")[0]
    single = f"{address}/{network.max_prefixlen}"
    raise NetworkError(
        f"{text} has host bits set; write {network} (or {single} for that single address)"
    )


def read_networks_file(path: str) -> list[tuple[int, Network]]:
    """Read an allowed-networks file in the format of Cloudflare's mmproxy.

    One network per line; '#' starts a comment; blank lines are ignored.  A bad
    line is an error, never skipped: silently dropping a balancer's network
    would look like an outage, silently dropping a typo could widen access.
    """
    try:
        lines = read_small_file(path).decode("utf-8").splitlines()
    except FileRefused as exc:
        raise NetworkError(f"cannot read the allowed networks file: {exc}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise NetworkError(
            f"not a UTF-8 text file (bad byte at offset {exc.start}); expected one "
            "network per line",
            path=path,
        ) from exc
    return list(_parse_lines(path, lines))


def _parse_lines(path: str, lines: list[str]) -> Iterable[tuple[int, Network]]:
    for number, raw in enumerate(lines, start=1):
        text = raw.partition("#")[0].strip()
        if not text:
            continue
        try:
            yield number, parse_network(text)
        except NetworkError as exc:
            raise NetworkError(exc.detail, path=path, line=number) from None


def _unmap(network: Network) -> Network:
    # A network written as ::ffff:a.b.c.d/n describes IPv4 peers; lookups of
    # mapped peer addresses are done in the IPv4 trie, so store it there.
    if isinstance(network, IPv6Network) and network.subnet_of(_V4_MAPPED):
        v4 = int(network.network_address) & 0xFFFFFFFF
        return IPv4Network((v4, network.prefixlen - 96))
    return network


class AllowedNetworks:
    """Set of networks answering `peer_ip in allowed` quickly, once per accept().

    Two tries, one per family: a single PyTricia(128) compares raw bits only, so
    10.0.0.0/8 would also match the IPv6 address 0a00::1 and 0.0.0.0/0 would
    match every IPv6 address.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self._networks = tuple(dict.fromkeys(networks))
        self._v4 = pytricia.PyTricia(32)
        self._v6 = pytricia.PyTricia(128)
        for network in self._networks:
            unmapped = _unmap(network)
            trie = self._v4 if unmapped.version == 4 else self._v6
            trie[str(unmapped)] = True

    def __contains__(self, address: str) -> bool:
        # Plain string tests only: this runs for every accepted connection.
        try:
            if ":" not in address:
                return address in self._v4
            if "%" in address:  # link-local peers come with a zone index
                address = address.partition("%")[0]
            if address[:7].lower() == "::ffff:":
                return self._contains_mapped(address)
            return address in self._v6
        except (ValueError, SystemError, TypeError):
            # pytricia raises SystemError on some malformed strings; an address
            # we cannot read is never allowed.
            return False

    def _contains_mapped(self, address: str) -> bool:
        tail = address[7:]
        if "." in tail:
            return tail in self._v4
        # Hex form (::ffff:c000:201): Linux never prints it, but stay correct.
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
        if mapped is None:  # e.g. ::ffff:1 is an ordinary IPv6 address
            return address in self._v6
        return str(mapped) in self._v4

    def __len__(self) -> int:
        return len(self._networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    @property
    def networks(self) -> tuple[Network, ...]:
        return self._networks

    def __repr__(self) -> str:
        shown = ", ".join(str(network) for network in self._networks)
        return f"AllowedNetworks([{shown}])"

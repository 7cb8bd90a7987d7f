"""Which client address a PROXY header may claim: this host's own, and special, addresses.

Letting a header claim 127.0.0.1 or an address of this host would let anyone who can
reach the balancer appear to the application as a local user. Policy (mmproxy.policy)
asks here, for TCP connections and UDP flows alike; transparent.py only makes sockets.

This host's addresses are every prefix of a `local` route (an address, or a whole AnyIP
prefix such as `ip route add local 192.0.2.0/24 dev lo`), anycast and broadcast route in
the `local` and `main` routing tables, read from the kernel over rtnetlink. Other tables
are not this host's: mmproxy's own table holds `local 0.0.0.0/0`, which must not make
every address look local. When they cannot be read, every source is refused.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import pytricia

log = logging.getLogger("mmproxy")

# rtnetlink (linux/netlink.h, linux/rtnetlink.h): Python's socket module lacks these.
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
RTA_DST, RTA_TABLE = 1, 15
RT_TABLE_MAIN, RT_TABLE_LOCAL = 254, 255
RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST = 2, 3, 4

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol,
#                                       scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type
_SEQUENCE = itertools.count(1)  # tells the answers to one request from stale ones

_KINDS = {
    RTN_LOCAL: "an address of this host",
    RTN_ANYCAST: "an anycast address of this host",
    RTN_BROADCAST: "a broadcast address of a local subnet",
}
UNREADABLE = "possibly an address of this host, whose addresses cannot be read"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """One route saying that `network` is this host's: `kind` is RTN_LOCAL, RTN_ANYCAST
    or RTN_BROADCAST."""

    network: Network
    kind: int


def read_local_routes() -> list[LocalRoute]:
    """The local, anycast and broadcast routes of the `local` and `main` tables, in the
    network namespace of the calling thread. OSError when the kernel cannot be asked."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(5.0)
        try:
            # The kernel then filters by table and type (Linux 4.20+); older ones send
            # everything, and _dump filters it here all the same.
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            pass
        routes: list[LocalRoute] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            routes += _dump(sock, family, RT_TABLE_LOCAL, 0)
            routes += _dump(sock, family, RT_TABLE_MAIN, RTN_LOCAL)
        return routes


def _dump(sock: socket.socket, family: int, table: int, kind: int) -> list[LocalRoute]:
    """One RTM_GETROUTE dump of `table` (only routes of type `kind`, 0: any)."""
    sequence = next(_SEQUENCE)
    request = _RTMSG.pack(family, 0, 0, 0, table, 0, 0, kind, 0)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0
    )
    sock.sendall(header + request)
    wanted = tuple(_KINDS) if kind == 0 else (kind,)
    routes: list[LocalRoute] = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise OSError("rtnetlink closed the dump early")
        for msg_type, payload in _messages(data, sequence):
            if msg_type == NLMSG_DONE:
                return routes
            if msg_type == NLMSG_ERROR:
                error = -struct.unpack_from("=i", payload)[0]
                if error:
                    raise OSError(error, f"rtnetlink route dump: {os.strerror(error)}")
                continue
            if msg_type == RTM_NEWROUTE:
                route = _route(payload, table, wanted)
                if route is not None:
                    routes.append(route)


def _messages(data: bytes, sequence: int) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise OSError("rtnetlink sent a truncated message")
        if seq == sequence:
            yield msg_type, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def _route(payload: bytes, table: int, wanted: Collection[int]) -> LocalRoute | None:
    family, dst_len, _, _, rtm_table, _, _, kind, _ = _RTMSG.unpack_from(payload)
    size = 4 if family == socket.AF_INET else 16
    dst = bytes(size)  # no RTA_DST: the default route, prefix length 0
    offset = _RTMSG.size
    while offset + _RTATTR.size <= len(payload):
        length, attr = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        value = payload[offset + _RTATTR.size : offset + length]
        if attr == RTA_DST and len(value) == size:
            dst = value
        elif attr == RTA_TABLE and len(value) == 4:
            rtm_table = struct.unpack("=I", value)[0]  # tables above 255 live only here
        offset += (length + 3) & ~3
    if rtm_table != table or kind not in wanted:
        return None
    if family == socket.AF_INET:
        return LocalRoute(ipaddress.IPv4Network((dst, dst_len), strict=False), kind)
    return LocalRoute(ipaddress.IPv6Network((dst, dst_len), strict=False), kind)


class _Routes:
    """Longest-prefix lookups of the local routes, one trie per family."""

    def __init__(self, routes: list[LocalRoute]) -> None:
        self._v4 = pytricia.PyTricia(32)
        self._v6 = pytricia.PyTricia(128)
        # A broadcast inside a local prefix (127.255.255.255 in 127.0.0.0/8): the longer
        # prefix wins. Two kinds for one prefix: local wins, being written last.
        for route in sorted(routes, key=lambda r: -r.kind):
            trie = self._v4 if route.network.version == 4 else self._v6
            trie[str(route.network)] = _KINDS[route.kind]

    def reason(self, host: str) -> str | None:
        if ":" in host:
            return self._v6.get(host.partition("%")[0])  # type: ignore[no-any-return]
        return self._v4.get(host)  # type: ignore[no-any-return]


class LocalAddresses:
    """This host's addresses (in the current network namespace), re-read every
    `max_age` seconds so that an address added after start-up is refused too.

    Fails closed: while they cannot be read, every address counts as this host's, and
    the journal says why (once, and once more when they can be read again).
    """

    def __init__(
        self,
        max_age: float = 2.0,
        reader: Callable[[], list[LocalRoute]] = read_local_routes,
    ) -> None:
        self._max_age = max_age
        self._reader = reader
        self._lock = threading.Lock()
        self._routes: _Routes | None = None  # None: the last read failed
        self._error: str | None = None
        self._read_at = float("-inf")
        self._generation = 0

    def reason(self, host: str) -> str | None:
        """Why `host` is this host's ("an address of this host"...), or None."""
        self.generation()
        routes = self._routes
        if routes is None:
            return UNREADABLE
        try:
            return routes.reason(host)
        except (ValueError, SystemError, TypeError):
            return "not an IP address"  # pytricia raises SystemError on some strings

    def generation(self) -> int:
        """How many times the addresses were read, re-reading them first when due: an
        answer derived from them holds while this number stays the same."""
        now = time.monotonic()
        if now - self._read_at > self._max_age:
            with self._lock:
                if now - self._read_at > self._max_age:
                    self._refresh()
                    self._read_at = now
                    self._generation += 1
        return self._generation

    def __contains__(self, host: str) -> bool:
        return self.reason(host) is not None

    def _refresh(self) -> None:
        try:
            routes = _Routes(self._reader())
        except (OSError, ValueError, struct.error) as exc:
            if self._error is None:
                log.error(
                    "cannot read this host's addresses (%s): every client address is "
                    "refused until they can be read",
                    exc,
                )
            self._error = str(exc)
            self._routes = None
            return
        if self._error is not None:
            log.warning("this host's addresses can be read again; clients are served")
            self._error = None
        self._routes = routes


def unmap(host: str) -> str:
    """'::ffff:192.0.2.1' -> '192.0.2.1': a dual-stack listener reports IPv4 peers mapped."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def forbidden_source_reason(host: str, local: LocalAddresses) -> str | None:
    """Why a header may not claim `host` as its client, or None when it may.

    Runs for every connection and datagram: the parse is cached; the local lookups are
    one or two trie searches.
    """
    special, candidates = _classify(host)
    if special is not None:
        return special
    for candidate, embedded in candidates:
        why = local.reason(candidate)
        if why is not None:
            return why + embedded
    return None


_V4 = ipaddress.IPv4Address


@functools.lru_cache(maxsize=4096)
def _classify(host: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """(why `host` is never a client, or None; the addresses to look up among this
    host's, each with how it was found: `host` itself and any IPv4 address inside it).

    Decoded from the address's value, not its text: inet_ntop writes ::127.0.0.1 with a
    dotted tail but ::ffff:0:7f00:1 without, and senders may write either.
    """
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return "not an IP address", ()
    if isinstance(addr, _V4):
        return _ipv4_special(int(addr)), ((str(addr), ""),)
    value = int(addr)
    reason = _ipv6_special(value)
    if reason is not None:
        return reason, ()
    candidates = [(str(addr), "")]
    for kind, v4 in _embedded_ipv4(value):
        text = str(_V4(v4))
        how = f" ({text} embedded in {kind} address)"
        reason = _ipv4_special(v4)
        if reason is not None:
            return reason + how, ()
        candidates.append((text, how))
    return None, tuple(candidates)


def _ipv4_special(value: int) -> str | None:
    first = value >> 24
    if first == 127:
        return "loopback"
    if value == 0:
        return "unspecified"
    if first == 0:
        return "this network (0.0.0.0/8)"
    if value >> 16 == 0xA9FE:
        return "link-local (169.254.0.0/16, where cloud metadata services answer)"
    if first >> 4 == 0xE:
        return "multicast"
    if value == 0xFFFFFFFF:
        return "broadcast"
    return None


def _ipv6_special(value: int) -> str | None:
    if value == 1:
        return "loopback"
    if value == 0:
        return "unspecified"
    if value >> 118 == 0x3FA:  # fe80::/10
        return "link-local"
    if value >> 120 == 0xFF:
        return "multicast"
    return None


_NAT64 = 0x0064FF9B << 96  # 64:ff9b::/96, RFC 6052's well-known prefix
_TEREDO = 0x20010000  # 2001::/32


def _embedded_ipv4(value: int) -> Iterator[tuple[str, int]]:
    """The IPv4 addresses an IPv6 address carries by a standard rule, for software that
    decodes them (an application, a NAT64 or 6to4 gateway on the way back)."""
    high96, low32 = value >> 32, value & 0xFFFFFFFF
    if high96 == 0:
        yield "an IPv4-compatible", low32  # ::a.b.c.d (RFC 4291, deprecated)
    elif high96 == 0xFFFF:
        yield "an IPv4-mapped", low32  # ::ffff:a.b.c.d
    elif high96 == 0xFFFF0000:
        yield "an IPv4-translated", low32  # ::ffff:0:a.b.c.d (RFC 2765)
    elif value >> 32 << 32 == _NAT64:
        yield "a NAT64", low32
    elif value >> 112 == 0x2002:
        yield "a 6to4", (value >> 80) & 0xFFFFFFFF  # 2002:AABB:CCDD::/48
    elif value >> 96 == _TEREDO:
        yield "a Teredo", (value >> 64) & 0xFFFFFFFF  # the server
        yield "a Teredo", low32 ^ 0xFFFFFFFF  # the client, stored inverted

"""Simple Proxy Protocol (SPP): the fixed 38-byte header Cloudflare Spectrum (and Tencent
EdgeOne) put in front of every UDP datagram. Pure codec, no I/O.

Layout, all fields in network byte order:

    offset  0  magic 0x56EC
            2  client address, 16 bytes (IPv6, or IPv4-mapped ::ffff:a.b.c.d)
           18  proxy address, 16 bytes (the balancer's address the client sent to)
           34  client port
           36  proxy port

The origin's replies carry a header too: the balancer strips 38 bytes from each.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

MAGIC = b"\x56\xec"
HEADER_SIZE = 38
_LAYOUT = struct.Struct("!2s16s16sHH")
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


class SppError(Exception):
    """The datagram does not start with a valid SPP header; str() says why."""


@dataclass(frozen=True, slots=True)
class SppHeader:
    """A parsed header; IPv4-mapped addresses are given as IPv4."""

    client: tuple[str, int]
    proxy: tuple[str, int]

    @property
    def family(self) -> str:
        """The PROXY v2 family the client's address would have: UDP4 or UDP6."""
        return "UDP6" if ":" in self.client[0] else "UDP4"


def parse(data: bytes | bytearray | memoryview) -> SppHeader:
    """The header at the start of `data`; SppError when there is none. The payload is
    everything from HEADER_SIZE on (possibly nothing)."""
    if len(data) < HEADER_SIZE:
        raise SppError(f"{len(data)} bytes, shorter than an SPP header ({HEADER_SIZE} bytes)")
    magic, client, proxy, client_port, proxy_port = _LAYOUT.unpack_from(data)
    if magic != MAGIC:
        raise SppError(f"bad SPP magic 0x{magic.hex()} (expected 0x56ec)")
    return SppHeader((_host(client), client_port), (_host(proxy), proxy_port))


def build(client: tuple[str, int], proxy: tuple[str, int]) -> bytes:
    """The 38-byte header for these endpoints (IPv4 ones are written IPv4-mapped);
    ValueError for a host that is no IP literal or a port beyond 0..65535."""
    for port in (client[1], proxy[1]):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 0..65535")
    return _LAYOUT.pack(MAGIC, _packed(client[0]), _packed(proxy[0]), client[1], proxy[1])


def _host(packed: bytes) -> str:
    # The same text the PROXY v2 parser gives (inet_ntop), so flows and records match.
    if packed.startswith(_MAPPED_PREFIX):
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def _packed(host: str) -> bytes:
    """ValueError for anything but an IP literal."""
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host)
        return _MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        raise ValueError(f"{host!r} is not an IP address") from None

"""PROXY protocol v1/v2 codec, after HAProxy's doc/proxy-protocol.txt.

A pure codec: no I/O, no sockets opened, no logging. `parse` answers one of three ways:
a complete header (`ProxyHeader`, with `length` the exact number of bytes it occupies),
a prefix of a possibly valid header (`IncompleteHeader`, with a lower bound of the bytes
still missing), or bytes that can never become a header (`InvalidHeader`, with a message
written for an admin's log). A v1 line is refused as soon as one byte proves it wrong; a
v2 header is judged once its 16-byte fixed part is in, never on a shorter prefix.

The v2 LOCAL command (a balancer's own health check) is taken as the spec says: the
receiver uses the real connection's endpoints and ignores the family byte and everything
after the fixed part, so those bytes are skipped, never judged.

Where the spec leaves the receiver a choice this module takes the strict one; every such
place is marked "STRICT" with the reason next to it.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NoReturn

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CLIENT_CERT",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_GROUP",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_SIG_SCHEME",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_MAX_CUSTOM",
    "PP2_TYPE_MAX_EXPERIMENT",
    "PP2_TYPE_MAX_FUTURE",
    "PP2_TYPE_MIN_CUSTOM",
    "PP2_TYPE_MIN_EXPERIMENT",
    "PP2_TYPE_MIN_FUTURE",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "UNIQUE_ID_MAX_LENGTH",
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "IncompleteHeader",
    "InvalidHeader",
    "ProxyHeader",
    "ProxyProtocolError",
    "SslInfo",
    "Tlv",
    "crc32c",
    "encode",
    "encode_v1",
    "encode_v2",
    "parse",
    "parse_ssl_tlv",
]

Address = tuple[str, int]
Tlv = tuple[int, bytes]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH: Final = 107  # worst case "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n"
V2_MAX_LENGTH: Final = 16 + 0xFFFF

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_SUBTYPE_SSL_GROUP: Final = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME: Final = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT: Final = 0x28
PP2_TYPE_NETNS: Final = 0x30
PP2_TYPE_MIN_CUSTOM: Final = 0xE0
PP2_TYPE_MAX_CUSTOM: Final = 0xEF
PP2_TYPE_MIN_EXPERIMENT: Final = 0xF0
PP2_TYPE_MAX_EXPERIMENT: Final = 0xF7
PP2_TYPE_MIN_FUTURE: Final = 0xF8
PP2_TYPE_MAX_FUTURE: Final = 0xFF

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04
_PP2_CLIENT_ALL: Final = PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS

UNIQUE_ID_MAX_LENGTH: Final = 128
_UNIX_PATH_SIZE: Final = 108


# --- errors ---------------------------------------------------------------------------


class ProxyProtocolError(ValueError):
    """The bytes are not (yet) a usable PROXY protocol header."""


class IncompleteHeader(ProxyProtocolError):
    """The data is a prefix of a possibly valid header: read at least `needed` more bytes.

    `needed` is a lower bound, never more than the header can still need, so a caller may
    read exactly that many without risking a wait on bytes the peer will never send.
    """

    def __init__(self, needed: int) -> None:
        # 0 would make a "read `needed` more, parse again" loop spin without reading.
        self.needed = max(1, needed)
        super().__init__(
            f"incomplete PROXY protocol header: at least {self.needed} more byte(s) needed"
        )

    def __reduce__(self) -> tuple[type[IncompleteHeader], tuple[int]]:
        # The default would call __init__ with the message instead of `needed`.
        return (type(self), (self.needed,))


class InvalidHeader(ProxyProtocolError):
    """The data can never become a valid header; str() is meant for an admin's log."""


# --- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The value of a PP2_TYPE_SSL TLV."""

    client: int  # PP2_CLIENT_* bit field
    verify: int  # 0 when the client presented a certificate and it was verified
    tlvs: list[Tlv] = field(default_factory=list, hash=False)  # sub-TLVs, wire order

    def tlv(self, sub_type: int) -> bytes | None:
        """The value of the first sub-TLV of this type, or None."""
        return _first(self.tlvs, sub_type)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `length` is the number of bytes it occupies in the input."""

    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL"
    family: str  # TCP4 TCP6 UDP4 UDP6 UNIX_STREAM UNIX_DGRAM, UNKNOWN (v1), UNSPEC (v2 LOCAL)
    source: Address | None  # (ip, port) for inet families, else None
    destination: Address | None
    length: int
    tlvs: list[Tlv] = field(default_factory=list, hash=False)  # wire order
    source_path: bytes | None = None  # UNIX families only, NUL padding removed
    destination_path: bytes | None = None

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        return _first(self.tlvs, tlv_type)

    def ssl_info(self) -> SslInfo | None:
        """The decoded PP2_TYPE_SSL TLV, or None (parse has already validated it)."""
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else parse_ssl_tlv(value)


def _first(tlvs: list[Tlv], tlv_type: int) -> bytes | None:
    for current, value in tlvs:
        if current == tlv_type:
            return value
    return None


# --- CRC32C ---------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B) of data."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_crc32c = crc32c  # encode_v2 has a parameter of the same name


# --- parse: detection -----------------------------------------------------------------


_V1_PREFIX: Final = b"PROXY "
_V1_SHORTEST: Final = len(b"PROXY UNKNOWN\r\n")
_HTTP_METHODS: Final = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PRI * HTTP/2.0",
)


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader:
    """Parse the PROXY protocol header at the start of data.

    Raises IncompleteHeader when data is a strict prefix of a possibly valid header and
    InvalidHeader when it cannot become one. Bytes after the header are never examined.
    """
    buf = data if isinstance(data, bytes) else _to_bytes(data)
    if buf.startswith(V2_SIGNATURE):
        return _parse_v2(buf)
    if buf.startswith(_V1_PREFIX):
        return _parse_v1(buf)
    size = len(buf)
    if size == 0:
        raise IncompleteHeader(_V1_SHORTEST)
    if V2_SIGNATURE.startswith(buf):
        raise IncompleteHeader(16 - size)
    if _V1_PREFIX.startswith(buf):
        raise IncompleteHeader(_V1_SHORTEST - size)
    raise _not_a_header(buf)


def _to_bytes(data: bytearray | memoryview) -> bytes:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = memoryview(view.tobytes())
    # No header is longer than this, so a huge buffer is not copied whole.
    return bytes(view[:V2_MAX_LENGTH])


def _not_a_header(buf: bytes) -> InvalidHeader:
    """Say what the bytes look like instead: misconfigured peers are the usual cause."""
    if buf[0] == 0x16:
        return InvalidHeader(
            f"not a PROXY protocol header (starts with {buf[:3]!r}: a TLS ClientHello?)"
        )
    for method in _HTTP_METHODS:
        if buf.startswith(method) or (len(buf) >= 3 and method.startswith(buf)):
            return InvalidHeader(
                f"not a PROXY protocol header: looks like HTTP ({buf[: len(method)]!r})"
            )
    if buf.startswith(b"SSH-"):
        return InvalidHeader(f"not a PROXY protocol header: looks like SSH ({buf[:16]!r})")
    if buf[0] == 0x0D:
        at = next(i for i, byte in enumerate(buf[:12]) if byte != V2_SIGNATURE[i])
        return InvalidHeader(
            f"not a PROXY protocol header (starts with {buf[:16]!r}; "
            f"byte {at} differs from the v2 signature)"
        )
    if buf[:5] == b"PROXY":
        return InvalidHeader(f"v1: expected one space after 'PROXY', got {buf[5:6]!r}")
    if len(buf) >= 2 and _V1_PREFIX.startswith(buf[:6].upper()):
        return InvalidHeader(f"v1: the keyword is case-sensitive: {buf[:5]!r} is not b'PROXY'")
    return InvalidHeader(f"not a PROXY protocol header (starts with {buf[:16]!r})")


# --- parse: v1 ------------------------------------------------------------------------


_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_FIELD_NAMES: Final = ("source address", "destination address", "source port", "dest port")
# Shortest complete line per protocol: a sound lower bound for IncompleteHeader.needed.
_V1_MIN_LENGTH: Final = {
    b"TCP4": len(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"),
    b"TCP6": len(b"PROXY TCP6 :: :: 0 0\r\n"),
}
_DIGITS: Final = b"0123456789"
_DIGITS_DOT: Final = b"0123456789."
_HEX_COLON: Final = b"0123456789abcdefABCDEF:"
_PRINTABLE: Final = bytes(range(0x20, 0x7F))


# Same rules as _ipv4_problem and _port_problem (no leading zeros, octets up to 255); the
# port's upper bound is checked after the match.
_OCTET: Final = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD: Final = rb"(" + _OCTET + rb"(?:\." + _OCTET + rb"){3})"
_PORT: Final = rb"(0|[1-9][0-9]{0,4})"
_V1_TCP4_LINE: Final = re.compile(
    rb"PROXY TCP4 " + _DOTTED_QUAD + b" " + _DOTTED_QUAD + b" " + _PORT + b" " + _PORT + rb"\r\n"
)


def _show(token: bytes) -> str:
    return repr(token.decode("ascii", "backslashreplace"))


def _parse_v1(buf: bytes) -> ProxyHeader:
    # Fast path for the common, valid TCP4 line; anything else, errors included, goes
    # through the field-by-field check, which alone writes the error messages.
    match = _V1_TCP4_LINE.match(buf)
    if match is not None:
        src, dst, sport, dport = match.groups()
        source_port, destination_port = int(sport), int(dport)
        if source_port <= 0xFFFF and destination_port <= 0xFFFF:
            source = (src.decode("ascii"), source_port)
            destination = (dst.decode("ascii"), destination_port)
            return ProxyHeader(1, "PROXY", "TCP4", source, destination, match.end())
    return _parse_v1_checked(buf)


def _parse_v1_checked(buf: bytes) -> ProxyHeader:
    end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        _v1_incomplete(buf)
    protocol, fields = _v1_check(buf[:end], complete=True)
    if protocol == b"UNKNOWN":
        # The spec: "use the real connection's parameters", so nothing is reported.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, end + 2)
    src, dst, sport, dport = fields
    if protocol == b"TCP4":
        source = (src.decode("ascii"), int(sport))
        destination = (dst.decode("ascii"), int(dport))
        return ProxyHeader(1, "PROXY", "TCP4", source, destination, end + 2)
    source = (_normal_ipv6(src), int(sport))
    destination = (_normal_ipv6(dst), int(dport))
    return ProxyHeader(1, "PROXY", "TCP6", source, destination, end + 2)


def _normal_ipv6(token: bytes) -> str:
    # One spelling per address, the same as v2 yields, whatever case or zeros were sent.
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, token.decode()))


def _v1_incomplete(buf: bytes) -> NoReturn:
    """No CRLF yet: raise InvalidHeader if the line is already wrong, else IncompleteHeader."""
    size = len(buf)
    if size >= V1_MAX_LENGTH:
        raise InvalidHeader(f"v1: no CRLF within the first {V1_MAX_LENGTH} bytes")
    if buf[-1] == 0x0D:
        # Only LF may follow a CR, so the line's content is final: check it as complete.
        _v1_check(buf[:-1], complete=True)
        raise IncompleteHeader(1)
    protocol, _ = _v1_check(buf, complete=False)
    needed = max(2, _V1_MIN_LENGTH.get(protocol, _V1_SHORTEST) - size)
    if size + needed > V1_MAX_LENGTH:
        raise InvalidHeader(
            f"v1: {size} bytes without CRLF; the line cannot end within {V1_MAX_LENGTH} bytes"
        )
    raise IncompleteHeader(needed)


def _v1_check(line: bytes, complete: bool) -> tuple[bytes, list[bytes]]:
    """Validate a v1 line without its CRLF; return (protocol, the four fields or []).

    With complete=False the line may stop anywhere, so its last token is only checked for
    being the start of a valid one; everything before it must already be exact.
    """
    if b"\n" in line:
        raise InvalidHeader("v1: bare LF in the line (a v1 line ends only with CRLF)")
    if b"\r" in line:
        raise InvalidHeader("v1: CR not followed by LF in the line")
    tokens = line.split(b" ")
    protocol = tokens[1]
    if not complete and len(tokens) == 2:
        if not any(known.startswith(protocol) for known in _V1_PROTOCOLS):
            raise InvalidHeader(_v1_bad_protocol(protocol))
        return protocol, []
    if protocol == b"UNKNOWN":
        _v1_check_unknown_tail(line[len(b"PROXY UNKNOWN") :])
        return protocol, []
    if protocol not in (b"TCP4", b"TCP6"):
        raise InvalidHeader(_v1_bad_protocol(protocol))
    fields = tokens[2:]
    address_problem = _ipv4_problem if protocol == b"TCP4" else _ipv6_problem
    last = len(fields) - 1
    # Fields in line order, so that the message names the first thing that went wrong.
    for index, token in enumerate(fields[:4]):
        open_ended = not complete and index == last
        name = _V1_FIELD_NAMES[index]
        if not token:
            if open_ended:
                break
            raise InvalidHeader(f"v1: empty {name} (two spaces in a row, or a space before CRLF)")
        problem = address_problem(token, open_ended) if index < 2 else _port_problem(token)
        if problem is not None:
            raise InvalidHeader(f"v1: {name} {_show(token)} {problem}")
    if len(fields) > 4:
        if fields[4]:
            raise InvalidHeader(f"v1: unexpected data after the dest port: {_show(fields[4])}")
        raise InvalidHeader("v1: space after the dest port (the line must end there)")
    if complete and len(fields) < 4:
        raise InvalidHeader(
            f"v1: {protocol.decode()} line ends after {len(fields)} of 4 fields "
            f"({_V1_FIELD_NAMES[len(fields)]} missing)"
        )
    return protocol, fields


def _v1_check_unknown_tail(tail: bytes) -> None:
    # The spec says the receiver "must ignore anything presented before the CRLF" for
    # UNKNOWN, so HAProxy's "exactly PROXY UNKNOWN\r\n" would reject conforming senders
    # (the spec's own 107-byte worst case has addresses). STRICT within that: the keyword
    # must end the line or be followed by one space, and the rest must be printable ASCII
    # since the whole line is defined as US-ASCII text.
    bad = tail.translate(None, _PRINTABLE)
    if bad:
        raise InvalidHeader(f"v1: non-printable byte {bad[:1]!r} after 'PROXY UNKNOWN'")


def _v1_bad_protocol(protocol: bytes) -> str:
    if not protocol:
        return "v1: empty protocol after 'PROXY ' (two spaces in a row?)"
    if protocol in (b"UDP4", b"UDP6"):
        return f"v1: protocol {_show(protocol)} does not exist in v1 (TCP4, TCP6, UNKNOWN)"
    if protocol.upper() in _V1_PROTOCOLS:
        return f"v1: protocol {_show(protocol)} must be upper case"
    return f"v1: unknown protocol {_show(protocol)} (expected TCP4, TCP6 or UNKNOWN)"


def _ipv4_problem(token: bytes, open_ended: bool = False) -> str | None:
    """Why token is not a strict dotted quad (or, open-ended, not the start of one)."""
    bad = token.translate(None, _DIGITS_DOT)
    if bad:
        if b":" in bad:
            return "is not an IPv4 address (TCP4 needs a dotted quad)"
        return f"contains {_show(bad[:1])}, not a digit or a dot"
    parts = token.split(b".")
    if len(parts) > 4:
        return "has more than 4 numbers"
    for index, part in enumerate(parts):
        if not part:
            if open_ended and index == len(parts) - 1:
                break
            return "has an empty number (two dots in a row, or a dot at an end)"
        # Leading zeros are forbidden so that nobody reads them as octal.
        if len(part) > 1 and part[0] == 0x30:
            return f"has a leading zero in {_show(part)}"
        if len(part) > 3 or int(part) > 255:
            return f"has {_show(part)}, above 255"
    if len(parts) < 4 and not open_ended:
        return "does not have 4 numbers"
    return None


def _ipv6_problem(token: bytes, open_ended: bool = False) -> str | None:
    """Why token is not an IPv6 address in v1's hex-groups form (or the start of one)."""
    if b"." in token:
        if b":" not in token:
            return "is an IPv4 address, not allowed with TCP6"
        # STRICT: the grammar is hex groups only ("series of sets of 4 hexadecimal digits
        # delimited by colons"), and "the advertised protocol family dictates what format
        # to use": a dotted tail (::ffff:192.0.2.1) is IPv4 text inside a TCP6 line.
        return "has a dotted IPv4 tail; TCP6 takes hex groups only (::ffff:c000:201)"
    bad = token.translate(None, _HEX_COLON)
    if bad:
        return f"contains {_show(bad[:1])}, not a hex digit or ':'"
    if len(token) > 39:
        return "is longer than 39 characters"
    if b":::" in token or token.count(b"::") > 1:
        return "has ':::' or more than one '::'"
    # Groups of 1 to 4 digits: "sets of 4 hexadecimal digits" is read as at most 4, as
    # every sender (inet_ntop) drops leading zeros; demanding exactly 4 rejects them all.
    if any(len(group) > 4 for group in token.split(b":")):
        return "has a group of more than 4 hex digits"
    if token[:1] == b":" and token[1:2] not in (b":", b""):
        return "starts with a single ':'"
    if open_ended:
        return None
    try:
        socket.inet_pton(socket.AF_INET6, token.decode("ascii"))
    except OSError:
        return "is not a valid IPv6 address"
    return None


def _port_problem(token: bytes) -> str | None:
    # Every rule here also holds for a prefix of a port, so no open-ended variant.
    bad = token.translate(None, _DIGITS)
    if bad:
        if token[0] in b"+-":
            return "has a sign"
        return f"contains {_show(bad[:1])}, not a digit"
    if len(token) > 1 and token[0] == 0x30:
        return "has a leading zero"
    if len(token) > 5 or int(token) > 0xFFFF:
        return "is above 65535"
    return None


# --- parse: v2 ------------------------------------------------------------------------


_V2_COMMANDS: Final = {0x0: "LOCAL", 0x1: "PROXY"}
# family/transport byte -> (family name, address block size). STRICT under PROXY: only
# the bytes the spec lists; nibble-valid mixes such as 0x01 or 0x10 are rejected.
_V2_FAMILIES: Final = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX_STREAM", 216),
    0x32: ("UNIX_DGRAM", 216),
}
_INET4_BLOCK: Final = struct.Struct("!4s4sHH")
_INET6_BLOCK: Final = struct.Struct("!16s16sHH")


def _parse_v2(buf: bytes) -> ProxyHeader:
    """Parse a header whose first 12 bytes are the v2 signature."""
    size = len(buf)
    if size < 16:
        # Nothing is judged before the fixed part is whole: a sender may write it in
        # pieces, and a LOCAL header's family byte means nothing until byte 13 says LOCAL.
        raise IncompleteHeader(16 - size)
    length = 16 + ((buf[14] << 8) | buf[15])
    command = _v2_command(buf[12])
    if command == "LOCAL":
        # The spec: accept, use the real endpoints, "discard the protocol block including
        # the family which is ignored". So no length, family or TLV check: a balancer's
        # health check (TCP4 with length 0, an opaque UNSPEC block, NOOP padding) must
        # never be refused, and nothing from these bytes is ever used.
        if size < length:
            raise IncompleteHeader(length - size)
        return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, length)
    family, block = _v2_family(buf[13])
    if length - 16 < block:
        # STRICT: a block shorter than its own family says means a broken sender.
        raise InvalidHeader(
            f"v2: length field is {length - 16}, too short for the {block}-byte "
            f"{family} address block"
        )
    if size < length:
        raise IncompleteHeader(length - size)
    source: Address | None = None
    destination: Address | None = None
    source_path: bytes | None = None
    destination_path: bytes | None = None
    if block == 12:
        src, dst, sport, dport = _INET4_BLOCK.unpack_from(buf, 16)
        source = (socket.inet_ntoa(src), sport)
        destination = (socket.inet_ntoa(dst), dport)
    elif block == 36:
        src, dst, sport, dport = _INET6_BLOCK.unpack_from(buf, 16)
        source = (socket.inet_ntop(socket.AF_INET6, src), sport)
        destination = (socket.inet_ntop(socket.AF_INET6, dst), dport)
    else:
        source_path = _unix_path(buf[16:124])
        destination_path = _unix_path(buf[124:232])
    tlvs: list[Tlv] = []
    # STRICT (like HAProxy): everything after the family's block is TLVs.
    if length > 16 + block:
        tlvs = _v2_tlvs(buf, 16 + block, length)
    return ProxyHeader(
        2, "PROXY", family, source, destination, length, tlvs, source_path, destination_path
    )


def _v2_command(ver_cmd: int) -> str:
    if ver_cmd >> 4 != 2:
        raise InvalidHeader(
            f"v2: unsupported version {ver_cmd >> 4} (byte 13 is 0x{ver_cmd:02X}; must be 2)"
        )
    command = _V2_COMMANDS.get(ver_cmd & 0x0F)
    if command is None:
        raise InvalidHeader(
            f"v2: undefined command {ver_cmd & 0x0F} (byte 13 is 0x{ver_cmd:02X}; "
            "only 0 LOCAL and 1 PROXY exist)"
        )
    return command


def _v2_family(fam: int) -> tuple[str, int]:
    """(family, address block size) for a PROXY command's family/transport byte."""
    entry = _V2_FAMILIES.get(fam)
    if entry is None:
        raise InvalidHeader(_v2_bad_family(fam))
    if entry[0] == "UNSPEC":
        # STRICT: the spec lets the receiver accept this or reject it. A relayed connection
        # whose client is unknown cannot be forwarded with the right source; refusing it
        # is safer than silently using the balancer's own address.
        raise InvalidHeader("v2: PROXY command with UNSPEC family (0x00): no client address")
    return entry


def _v2_bad_family(fam: int) -> str:
    known = "0x00, 0x11, 0x12, 0x21, 0x22, 0x31 or 0x32"
    if fam >> 4 > 3:
        why = f"undefined address family {fam >> 4}"
    elif fam & 0x0F > 2:
        why = f"undefined transport {fam & 0x0F}"
    else:
        why = "UNSPEC mixed with a defined nibble"
    return f"v2: family/transport byte 0x{fam:02X}: {why} (must be {known})"


def _unix_path(raw: bytes) -> bytes:
    # A path name ends at its first NUL; a Linux abstract name starts with NUL and may hold
    # NULs, so for it only the trailing padding is dropped.
    if raw[:1] == b"\x00":
        return raw.rstrip(b"\x00")
    end = raw.find(b"\x00")
    return raw if end < 0 else raw[:end]


def _v2_tlvs(buf: bytes, start: int, end: int) -> list[Tlv]:
    tlvs = _walk_tlvs(buf, start, end, "v2")
    crc_at = -1
    offset = start
    for tlv_type, value in tlvs:
        problem = _tlv_problem(tlv_type, value)
        if problem is not None:
            raise InvalidHeader(f"v2: {problem}")
        if tlv_type == PP2_TYPE_CRC32C:
            if crc_at >= 0:
                # STRICT: with two checksum fields "the" field to zero is ambiguous.
                raise InvalidHeader("v2: more than one CRC32C TLV")
            crc_at = offset + 3
        offset += 3 + len(value)
    if crc_at >= 0:
        _check_crc32c(buf[:end], crc_at)
    return tlvs


def _walk_tlvs(data: bytes, pos: int, end: int, where: str) -> list[Tlv]:
    # STRICT (like HAProxy): the area must be exactly a sequence of TLVs; a truncated one
    # or 1-2 stray bytes mean the sender is broken, so nothing of it can be trusted.
    tlvs: list[Tlv] = []
    while pos < end:
        if end - pos < 3:
            raise InvalidHeader(
                f"{where}: {end - pos} stray byte(s) at offset {pos}, too short for a TLV"
            )
        tlv_type = data[pos]
        start = pos + 3
        pos = start + ((data[pos + 1] << 8) | data[pos + 2])
        if pos > end:
            raise InvalidHeader(
                f"{where}: TLV 0x{tlv_type:02X} at offset {start - 3} declares "
                f"{pos - start} bytes but only {end - start} remain"
            )
        tlvs.append((tlv_type, data[start:pos]))
    return tlvs


def _check_crc32c(header: bytes, value_at: int) -> None:
    expected = int.from_bytes(header[value_at : value_at + 4], "big")
    computed = _crc32c(header[:value_at] + b"\x00\x00\x00\x00" + header[value_at + 4 :])
    if computed != expected:
        raise InvalidHeader(
            f"v2: CRC32C mismatch (header says 0x{expected:08X}, computed 0x{computed:08X})"
        )


def _tlv_problem(tlv_type: int, value: bytes) -> str | None:
    """What is wrong with a TLV of a registered type; unknown types are not judged."""
    if tlv_type == PP2_TYPE_AUTHORITY:
        return _text_problem("AUTHORITY TLV", value, "utf-8")
    if tlv_type == PP2_TYPE_CRC32C:
        if len(value) != 4:
            return f"CRC32C TLV is {len(value)} bytes, must be 4"
        return None
    if tlv_type == PP2_TYPE_UNIQUE_ID:
        if len(value) > UNIQUE_ID_MAX_LENGTH:
            return f"UNIQUE_ID TLV is {len(value)} bytes, at most {UNIQUE_ID_MAX_LENGTH} allowed"
        return None
    if tlv_type == PP2_TYPE_SSL:
        try:
            parse_ssl_tlv(value)
        except InvalidHeader as exc:
            return str(exc)
        return None
    if tlv_type == PP2_TYPE_NETNS:
        # STRICT: the spec defines the name as US-ASCII.
        return _text_problem("NETNS TLV", value, "ascii")
    return None


def _text_problem(what: str, value: bytes, encoding: str) -> str | None:
    try:
        value.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = value[exc.start : exc.start + 1]
        return f"{what} is not valid {encoding.upper()} (byte {exc.start} is {bad!r})"
    return None


# STRICT: sub-TLVs the spec defines as US-ASCII (or, for CN, UTF-8) strings must decode as
# such; CLIENT_CERT (DER) and unknown sub-types are opaque.
_SSL_TEXT_SUBTYPES: Final = {
    PP2_SUBTYPE_SSL_VERSION: ("SSL VERSION", "ascii"),
    PP2_SUBTYPE_SSL_CN: ("SSL CN", "utf-8"),
    PP2_SUBTYPE_SSL_CIPHER: ("SSL CIPHER", "ascii"),
    PP2_SUBTYPE_SSL_SIG_ALG: ("SSL SIG_ALG", "ascii"),
    PP2_SUBTYPE_SSL_KEY_ALG: ("SSL KEY_ALG", "ascii"),
    PP2_SUBTYPE_SSL_GROUP: ("SSL GROUP", "ascii"),
    PP2_SUBTYPE_SSL_SIG_SCHEME: ("SSL SIG_SCHEME", "ascii"),
}


def parse_ssl_tlv(value: bytes | bytearray | memoryview) -> SslInfo:
    """Decode the value of a PP2_TYPE_SSL TLV; raise InvalidHeader if it is malformed."""
    data = bytes(value)
    if len(data) < 5:
        raise InvalidHeader(
            f"SSL TLV is {len(data)} bytes, needs at least 5 (client u8, verify u32)"
        )
    client = data[0]
    if client & ~_PP2_CLIENT_ALL:
        # STRICT: only three client bits are defined; others mean a sender we do not know.
        raise InvalidHeader(f"SSL TLV client field 0x{client:02X} has undefined bits")
    verify = int.from_bytes(data[1:5], "big")
    tlvs = _walk_tlvs(data, 5, len(data), "SSL TLV")
    for sub_type, sub_value in tlvs:
        text = _SSL_TEXT_SUBTYPES.get(sub_type)
        if text is not None:
            problem = _text_problem(text[0], sub_value, text[1])
            if problem is not None:
                raise InvalidHeader(problem)
    return SslInfo(client, verify, tlvs)


# --- encode ---------------------------------------------------------------------------


def encode_v1(
    family: str, source: Address | None = None, destination: Address | None = None
) -> bytes:
    """A v1 line: family "TCP4", "TCP6" (with (ip, port) endpoints) or "UNKNOWN" (without)."""
    if family == "UNKNOWN":
        if source is not None or destination is not None:
            raise ValueError("encode_v1: UNKNOWN carries no addresses; pass None for both")
        return b"PROXY UNKNOWN\r\n"
    if family not in ("TCP4", "TCP6"):
        raise ValueError(f"encode_v1: family must be TCP4, TCP6 or UNKNOWN, not {family!r}")
    src_host, src_port = _endpoint(source, "source")
    dst_host, dst_port = _endpoint(destination, "destination")
    if family == "TCP4":
        src_text = _ipv4_text(src_host, "source")
        dst_text = _ipv4_text(dst_host, "destination")
    else:
        src_text = _ipv6_hex_text(_packed_ip(socket.AF_INET6, src_host, "source"))
        dst_text = _ipv6_hex_text(_packed_ip(socket.AF_INET6, dst_host, "destination"))
    line = f"PROXY {family} {src_text} {dst_text} {src_port} {dst_port}\r\n"
    return line.encode("ascii")


_V2_COMMAND_BYTES: Final = {"LOCAL": 0x20, "PROXY": 0x21}
_V2_FAMILY_BYTES: Final = {name: fam for fam, (name, _) in _V2_FAMILIES.items()}


def encode_v2(
    command: str = "PROXY",
    family: str = "TCP4",
    source: Address | bytes | None = None,
    destination: Address | bytes | None = None,
    tlvs: Iterable[Tlv] = (),
    *,
    crc32c: bool = False,
) -> bytes:
    """A v2 header. Inet families take (ip, port) endpoints, UNIX ones bytes paths,
    UNSPEC none. crc32c=True fills in the CRC32C TLV found in tlvs, or appends one.
    """
    ver_cmd = _V2_COMMAND_BYTES.get(command)
    if ver_cmd is None:
        raise ValueError(f"encode_v2: command must be PROXY or LOCAL, not {command!r}")
    fam = _V2_FAMILY_BYTES.get(family)
    if fam is None:
        raise ValueError(f"encode_v2: unknown family {family!r}")
    if command == "PROXY" and family == "UNSPEC":
        raise ValueError("encode_v2: PROXY with UNSPEC is rejected by strict receivers; use LOCAL")
    body = bytearray(_v2_address_block(family, source, destination))
    entries = [_checked_tlv(tlv_type, value) for tlv_type, value in tlvs]
    crc_count = sum(1 for tlv_type, _ in entries if tlv_type == PP2_TYPE_CRC32C)
    if crc_count > 1:
        raise ValueError("encode_v2: more than one CRC32C TLV")
    if crc_count and not crc32c:
        raise ValueError("encode_v2: a CRC32C TLV needs crc32c=True so that it gets computed")
    if crc32c and not crc_count:
        entries.append((PP2_TYPE_CRC32C, bytes(4)))
    crc_at = -1
    for tlv_type, value in entries:
        if tlv_type == PP2_TYPE_CRC32C:
            crc_at = 16 + len(body) + 3
            value = bytes(4)  # the checksum is computed with its own field zeroed
        body += struct.pack("!BH", tlv_type, len(value)) + value
    if len(body) > 0xFFFF:
        raise ValueError(f"encode_v2: {len(body)} bytes after the fixed part, at most 65535")
    header = bytearray(V2_SIGNATURE)
    header += struct.pack("!BBH", ver_cmd, fam, len(body))
    header += body
    if crc_at >= 0:
        header[crc_at : crc_at + 4] = _crc32c(header).to_bytes(4, "big")
    return bytes(header)


def encode(header: ProxyHeader) -> bytes:
    """Re-encode a header in its own version. A v1 UNKNOWN line comes out short."""
    if header.version == 1:
        if header.command != "PROXY":
            raise ValueError(f"encode: v1 has no {header.command} command")
        return encode_v1(header.family, header.source, header.destination)
    if header.version == 2:
        unix = header.family.startswith("UNIX")
        source = header.source_path if unix else header.source
        destination = header.destination_path if unix else header.destination
        crc = any(tlv_type == PP2_TYPE_CRC32C for tlv_type, _ in header.tlvs)
        return encode_v2(
            header.command, header.family, source, destination, header.tlvs, crc32c=crc
        )
    raise ValueError(f"encode: unsupported version {header.version!r}")


def _endpoint(value: object, role: str) -> Address:
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise ValueError(f"{role} must be an (address, port) pair, got {value!r}")
    host, port = value
    if not isinstance(host, str):
        raise ValueError(f"{role} address must be a str, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{role} port must be an int in 0-65535, got {port!r}")
    return host, port


def _ipv4_text(host: str, role: str) -> str:
    # The parser's own rule, so that nothing is sent that a strict receiver refuses.
    problem = _ipv4_problem(host.encode("ascii", "replace"))
    if problem is not None:
        raise ValueError(f"{role} address {host!r} {problem}")
    return host


def _packed_ip(family: socket.AddressFamily, host: str, role: str) -> bytes:
    if family == socket.AF_INET:
        _ipv4_text(host, role)
    try:
        return socket.inet_pton(family, host)
    except (OSError, ValueError):
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ValueError(f"{role} address {host!r} is not a valid {kind} address") from None


def _ipv6_hex_text(packed: bytes) -> str:
    """RFC 5952 text without the dotted IPv4 tail inet_ntop uses for ::ffff:0:0/96."""
    groups = struct.unpack("!8H", packed)
    best_start, best_len = -1, 1  # a single zero group is not compressed
    index = 0
    while index < 8:
        if groups[index]:
            index += 1
            continue
        run_end = index
        while run_end < 8 and not groups[run_end]:
            run_end += 1
        if run_end - index > best_len:
            best_start, best_len = index, run_end - index
        index = run_end
    text = [f"{group:x}" for group in groups]
    if best_start < 0:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len :])


def _v2_address_block(family: str, source: object, destination: object) -> bytes:
    if family == "UNSPEC":
        if source is not None or destination is not None:
            raise ValueError("encode_v2: UNSPEC carries no addresses; pass None for both")
        return b""
    if family.startswith("UNIX"):
        return _unix_field(source, "source") + _unix_field(destination, "destination")
    src_host, src_port = _endpoint(source, "source")
    dst_host, dst_port = _endpoint(destination, "destination")
    af = socket.AF_INET if family in ("TCP4", "UDP4") else socket.AF_INET6
    src = _packed_ip(af, src_host, "source")
    dst = _packed_ip(af, dst_host, "destination")
    return src + dst + struct.pack("!HH", src_port, dst_port)


def _unix_field(path: object, role: str) -> bytes:
    if not isinstance(path, bytes | bytearray):
        raise ValueError(f"{role} must be a bytes path for a UNIX family, got {path!r}")
    if len(path) > _UNIX_PATH_SIZE:
        raise ValueError(f"{role} path is {len(path)} bytes, at most {_UNIX_PATH_SIZE}")
    if path.endswith(b"\x00"):
        raise ValueError(f"{role} path ends with NUL, which is padding and would be lost")
    if path[:1] != b"\x00" and b"\x00" in path:
        raise ValueError(f"{role} path contains NUL (only abstract names, starting with NUL)")
    return bytes(path).ljust(_UNIX_PATH_SIZE, b"\x00")


def _checked_tlv(tlv_type: object, value: object) -> Tlv:
    if not isinstance(tlv_type, int) or isinstance(tlv_type, bool) or not 0 <= tlv_type <= 0xFF:
        raise ValueError(f"encode_v2: TLV type must be an int in 0-255, got {tlv_type!r}")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"encode_v2: TLV 0x{tlv_type:02X} value must be bytes, got {value!r}")
    data = bytes(value)
    if len(data) > 0xFFFF:
        raise ValueError(f"encode_v2: TLV 0x{tlv_type:02X} is {len(data)} bytes, at most 65535")
    problem = _tlv_problem(tlv_type, data)
    if problem is not None:
        raise ValueError(f"encode_v2: {problem}")
    return tlv_type, data

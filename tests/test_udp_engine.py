"""The C part of the UDP relay (mmproxy._splice.UdpEngine): its reading of a datagram's
header agrees with the Python codec's on every vector, and it sends a datagram on only
when Python accepted its exact header (or bound its balancer port): truncated and malformed
headers always go back to Python. The relay itself: tests/test_udp.py (both paths)."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from mmproxy import _splice
from mmproxy.proxy_protocol import V2_SIGNATURE, ProxyProtocolError, parse
from mmproxy.spp import HEADER_SIZE as SPP_SIZE
from mmproxy.spp import SppError
from mmproxy.spp import parse as parse_spp
from mmproxy.udp import HEADERLESS, header_size
from tests.test_proxy_protocol import EARLY_INVALID, GARBAGE, VALID
from tests.test_spp import V4_VECTOR, V6_VECTOR

V2_VALID = {name: data for name, data in VALID.items() if name.startswith("v2-")}
SPP_VALID = {"v4": V4_VECTOR, "v6": V6_VECTOR}
PAYLOADS = [b"", b"x", b"\r\n\r\n\x00\r\nQUIT\n" + b"y" * 40, bytes(300)]
LB4 = ("198.51.100.1", 5300)
LB6 = ("2001:db8::1", 5300, 0, 0)
SLOW = -1


def v2_damaged() -> list[bytes]:
    """Every truncation of each valid v2 header (with and without payload), lengths that
    claim one byte more or less, and the codec's invalid and garbage vectors."""
    out = [data for _, data, *_ in EARLY_INVALID] + [data for _, data, *_ in GARBAGE]
    for header in V2_VALID.values():
        for payload in (b"", b"payload"):
            whole = header + payload
            out += [whole[:size] for size in range(len(whole))]
        claimed = header[14] << 8 | header[15]
        for other in (claimed - 1, claimed + 1):
            if 0 <= other <= 0xFFFF:
                out.append(header[:14] + other.to_bytes(2, "big") + header[16:] + b"x")
    return out


def spp_damaged() -> list[bytes]:
    out = []
    for header in SPP_VALID.values():
        out += [header[:size] for size in range(len(header))]
        out += [bytes([header[0] ^ 1]) + header[1:] + b"x", header[:-1] + b"\xff" + b"x"]
    return [*out, V2_SIGNATURE + bytes(30)]


def agrees(data: bytes, spp: bool) -> None:
    """C's size is the Python path's, or C leaves the datagram to Python where the Python
    path would check the whole header (too short to say, a header alone, truncated)."""
    size = _splice.udp_classify(data, spp)
    python = header_size(data, spp)
    if size == SLOW:
        assert python == 0 or python >= len(data), (data, python)
    elif size == 0:
        assert python == HEADERLESS and not spp, data
    else:
        # SPP: a header alone is forwarded (an empty payload), as the Python path does
        assert size == python and size + (not spp) <= len(data), (data, size, python)


@pytest.mark.parametrize("header", V2_VALID.values(), ids=V2_VALID.keys())
@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_v2_header_size_is_the_codecs(header: bytes, payload: bytes) -> None:
    size = _splice.udp_classify(header + payload, False)
    assert size == (parse(header).length if payload else SLOW)  # a header alone: Python
    agrees(header + payload, False)


@pytest.mark.parametrize("header", SPP_VALID.values(), ids=SPP_VALID.keys())
@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_spp_header_size_is_the_codecs(header: bytes, payload: bytes) -> None:
    assert parse_spp(header + payload) is not None
    assert _splice.udp_classify(header + payload, True) == SPP_SIZE
    agrees(header + payload, True)


def test_damaged_headers_are_read_alike() -> None:
    for data in v2_damaged():
        agrees(data, False)
    for data in spp_damaged():
        agrees(data, True)


def test_datagrams_without_the_signature_are_headerless_in_v2() -> None:
    for data in (b"", b"x", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V2_SIGNATURE[:11]):
        assert _splice.udp_classify(data, False) == 0
        agrees(data, False)


class Engine:
    """A UdpEngine with one flow per valid header, each on a real socket of its own."""

    def __init__(self, spp: bool, headers: dict[str, bytes]) -> None:
        self.epoll = select.epoll()
        self.engine = _splice.UdpEngine(self.epoll.fileno(), spp)
        self.listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.lfd = self.listener.fileno()
        self.engine.add_listener(self.lfd, False)
        self.sockets = []
        self.flows: dict[tuple[bytes, tuple[object, ...]], int] = {}
        for header in headers.values():
            for peer in (LB4, LB6):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sockets.append(sock)
                self.engine.add_flow(sock.fileno(), self.lfd, peer, [])
                self.engine.learn(sock.fileno(), header)
                self.flows[header, peer] = sock.fileno()

    def close(self) -> None:
        for sock in self.sockets:
            self.engine.remove(sock.fileno())
            sock.close()
        self.listener.close()
        self.epoll.close()


@pytest.fixture(params=[False, True], ids=["v2", "spp"])
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, bool]]:
    spp = request.param
    made = Engine(spp, SPP_VALID if spp else V2_VALID)
    yield made, spp
    made.close()


def test_accepted_headers_lead_to_their_flow_and_nothing_else_does(
    engine: tuple[Engine, bool],
) -> None:
    made, spp = engine
    headers = SPP_VALID if spp else V2_VALID
    for header in headers.values():
        for peer in (LB4, LB6):
            flow = made.flows[header, peer]
            assert made.engine.match(made.lfd, peer, header + b"data") == (flow, len(header))
            assert made.engine.match(made.lfd, peer, header) == (
                (flow, len(header)) if spp else None  # v2: a header alone goes to Python
            )
            assert made.engine.match(made.lfd + 1, peer, header + b"data") is None
            assert made.engine.match(made.lfd, ("198.51.100.1", 5301), header + b"x") is None
    for data in spp_damaged() if spp else v2_damaged():
        for peer in (LB4, LB6):
            found = made.engine.match(made.lfd, peer, data)
            if found is not None:  # only an accepted header followed by payload
                fd, offset = found
                assert (data[:offset], peer) in made.flows and made.flows[data[:offset], peer] == fd
                assert _is_valid(data[:offset], spp)


def _is_valid(header: bytes, spp: bool) -> bool:
    try:
        return (parse_spp(header) if spp else parse(header)) is not None
    except (ProxyProtocolError, SppError):
        return False


def test_a_relearned_or_forgotten_header_leads_nowhere(engine: tuple[Engine, bool]) -> None:
    made, spp = engine
    header = next(iter((SPP_VALID if spp else V2_VALID).values()))
    flow = made.flows[header, LB4]
    other = next(h for h in (SPP_VALID if spp else V2_VALID).values() if h != header)
    made.engine.learn(flow, other)
    assert made.engine.match(made.lfd, LB4, header + b"x") is None
    assert made.engine.match(made.lfd, LB4, other + b"x") is not None
    made.engine.forget_known()
    assert made.engine.match(made.lfd, LB4, other + b"x") is None


def test_a_bound_port_takes_headerless_datagrams_in_v2_only() -> None:
    made = Engine(False, {})
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        made.sockets.append(sock)
        made.engine.add_flow(sock.fileno(), made.lfd, LB4, [])
        assert made.engine.match(made.lfd, LB4, b"payload") is None
        made.engine.bind_port(sock.fileno(), True)
        assert made.engine.match(made.lfd, LB4, b"payload") == (sock.fileno(), 0)
        assert made.engine.match(made.lfd, LB4, b"PROXY TCP4 x") == (sock.fileno(), 0)
        assert made.engine.match(made.lfd, ("198.51.100.1", 5301), b"payload") is None
        assert made.engine.match(made.lfd, LB4, V2_SIGNATURE + b"\x21") is None  # truncated
        made.engine.bind_port(sock.fileno(), False)
        assert made.engine.match(made.lfd, LB4, b"payload") is None
    finally:
        made.close()


def test_bad_arguments_raise_and_leave_the_engine_working() -> None:
    made = Engine(False, V2_VALID)
    try:
        with pytest.raises(KeyError):
            made.engine.remove(10**6)
        with pytest.raises(ValueError):
            made.engine.add_flow(made.sockets[0].fileno(), made.lfd, LB4, [])
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(ValueError):
            made.engine.add_flow(sock.fileno(), made.lfd, ("not an address", 1), [])
        with pytest.raises(TypeError):
            made.engine.add_flow(sock.fileno(), made.lfd, "198.51.100.1", [])  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            made.engine.add_flow(sock.fileno(), made.lfd, LB4, [(0, 8, bytes(100))])
        sock.close()
        assert len(made.engine) == len(made.sockets)
        header = next(iter(V2_VALID.values()))
        assert made.engine.match(made.lfd, LB4, header + b"x") is not None
    finally:
        made.close()

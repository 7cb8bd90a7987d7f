"""Coverage-guided fuzzing of the C part's reading of UDP datagrams (atheris driving
mmproxy._splice.udp_classify and UdpEngine.match, the lookup run() does per datagram).

The first byte picks the framing (bit 0: SPP), the balancer (bit 1: IPv6) and how the
datagram is made (bits 2-3): the rest as it is, or after one of the accepted headers
(bits 4-5), or after that header with one byte changed (the next two bytes: where, to
what); so the lookup meets near misses, not only random bytes. The datagram's header size
must be the Python path's (mmproxy.udp.header_size), and it may lead to a flow only
through a header that was accepted for exactly that balancer, or, without a header in
v2, through the balancer port bound to a flow.
    python tests/fuzz/fuzz_udp_engine.py -runs=1000000 tests/fuzz/corpus/udp_engine
"""

import select
import socket
import sys

import atheris

with atheris.instrument_imports():
    from mmproxy import _splice
    from mmproxy.proxy_protocol import PP2_TYPE_UNIQUE_ID, encode_v2
    from mmproxy.spp import build
    from mmproxy.udp import HEADERLESS, header_size

LB4 = ("198.51.100.1", 5300)
LB6 = ("2001:db8::1", 5300, 0, 0)
V2 = [
    encode_v2("PROXY", "UDP4", ("203.0.113.7", 4000), ("198.51.100.1", 53)),
    encode_v2(
        "PROXY", "UDP6", ("2001:db8::7", 4000), ("2001:db8::1", 443), [(PP2_TYPE_UNIQUE_ID, b"id")]
    ),
    encode_v2("LOCAL", "UNSPEC"),
]
SPP = [build(("203.0.113.7", 4000), ("198.51.100.1", 53)),
       build(("2001:db8::7", 4000), ("2001:db8::1", 443))]  # fmt: skip
SLOW = -1


class Engine:
    def __init__(self, spp: bool, headers: list[bytes]) -> None:
        self.epoll = select.epoll()
        self.engine = _splice.UdpEngine(self.epoll.fileno(), spp)
        self.listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.lfd = self.listener.fileno()
        self.engine.add_listener(self.lfd, False)
        self.sockets = []
        self.known: dict[int, tuple[bytes, tuple[object, ...]]] = {}
        self.port: dict[int, tuple[object, ...]] = {}
        for i, header in enumerate(headers):
            for peer in (LB4, LB6):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sockets.append(sock)
                fd = sock.fileno()
                self.engine.add_flow(fd, self.lfd, peer, [])
                self.engine.learn(fd, header)
                self.known[fd] = (header, peer)
                if not spp and i == 0:
                    self.engine.bind_port(fd, True)
                    self.port[fd] = peer


ENGINES = {False: Engine(False, V2), True: Engine(True, SPP)}


def make(data: bytes) -> tuple[bool, tuple[object, ...], bytes]:
    first = data[0]
    spp, peer = bool(first & 1), (LB6 if first & 2 else LB4)
    headers = SPP if spp else V2
    header = headers[(first >> 4 & 3) % len(headers)]
    mode = first >> 2 & 3
    if mode == 1:
        return spp, peer, header + data[1:]
    if mode == 2 and len(data) >= 3:
        where = data[1] % len(header)
        changed = header[:where] + data[2:3] + header[where + 1 :]
        return spp, peer, changed + data[3:]
    return spp, peer, data[1:]


def test_one(data: bytes) -> None:
    if not data:
        return
    spp, peer, datagram = make(data)
    size = _splice.udp_classify(datagram, spp)
    python = header_size(datagram, spp)
    if size == SLOW:
        assert python == 0 or python >= len(datagram)
    elif size == 0:
        assert python == HEADERLESS and not spp
    else:
        assert size == python and size + (not spp) <= len(datagram)
    made = ENGINES[spp]
    found = made.engine.match(made.lfd, peer, datagram)
    if found is None:
        return
    fd, offset = found
    assert offset == max(size, 0)
    if offset == 0:
        assert made.port[fd] == peer
    else:
        assert made.known[fd] == (datagram[:offset], peer)


if __name__ == "__main__":
    atheris.Setup(sys.argv, atheris.instrument_func(test_one))  # its branches: C's outcomes
    atheris.Fuzz()

"""The UDP forwarder in-process, on loopback, with the balancer's own (LOCAL) datagrams,
which are relayed without spoofing and so need no privileges; and its pure helpers."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from mmproxy.config import Address, Config
from mmproxy.networks import parse_network
from mmproxy.proxy_protocol import PP2_TYPE_UNIQUE_ID, encode_v2
from mmproxy.udp import IP_PKTINFO, IPV6_PKTINFO, UdpForwarder, UdpStats, _reply_ancillary

LOCAL_HEADER = encode_v2("LOCAL", "UNSPEC")


@pytest.fixture
def echo() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            sock.sendto(b"echo " + data, peer)

    threading.Thread(target=serve, daemon=True).start()
    yield sock
    sock.close()


def forwarder(echo: socket.socket, **keys: object) -> tuple[UdpForwarder, socket.socket]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    settings: dict[str, object] = {
        "ipv4": Address(*echo.getsockname()),
        "allowed_networks": (parse_network("127.0.0.0/8"),),
        **keys,
    }
    udp = UdpForwarder(Config(**settings), [listener])  # type: ignore[arg-type]
    udp.start()
    return udp, listener


def settled(udp: UdpForwarder, packets_out: int) -> None:
    """The counters move just after a reply leaves: wait for the loop to get there."""
    deadline = time.monotonic() + 5
    while udp.stats.packets_out < packets_out and time.monotonic() < deadline:
        time.sleep(0.01)


def balancer(listener: socket.socket) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect(listener.getsockname())
    return sock


def test_local_datagrams_are_relayed_and_answered(echo: socket.socket) -> None:
    udp, listener = forwarder(echo)
    try:
        with balancer(listener) as lb:
            for payload in (b"one", b"", b"x" * 60000):
                lb.send(LOCAL_HEADER + payload)
                assert lb.recv(65535) == b"echo " + payload
        settled(udp, 3)
        assert (udp.stats.flows, udp.stats.total, udp.stats.packets_in) == (1, 1, 3)
        assert udp.stats.bytes_in == 60003 and udp.stats.bytes_out == 60003 + 3 * 5
    finally:
        udp.stop()
        listener.close()
    assert udp.stats.flows == 0


def test_a_changed_header_is_checked_again_and_keeps_its_flow(echo: socket.socket) -> None:
    udp, listener = forwarder(echo)
    try:
        with balancer(listener) as lb:
            for unique_id in (b"a", b"b", b"a"):
                lb.send(encode_v2("LOCAL", "UNSPEC", tlvs=[(PP2_TYPE_UNIQUE_ID, unique_id)]) + b"x")
                assert lb.recv(100) == b"echo x"
            lb.send(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x09" + b"x")  # claims more than sent
            deadline = time.monotonic() + 5
            while not udp.stats.dropped and time.monotonic() < deadline:
                time.sleep(0.01)
        assert (udp.stats.total, udp.stats.packets_in) == (1, 3)
        assert udp.stats.dropped == {"invalid-header": 1}
    finally:
        udp.stop()
        listener.close()


def test_each_balancer_port_is_its_own_flow(echo: socket.socket) -> None:
    udp, listener = forwarder(echo)
    try:
        with balancer(listener) as a, balancer(listener) as b:
            a.send(LOCAL_HEADER + b"a")
            b.send(LOCAL_HEADER + b"b")
            assert (a.recv(100), b.recv(100)) == (b"echo a", b"echo b")
        assert udp.stats.total == 2
    finally:
        udp.stop()
        listener.close()


def test_idle_flow_is_closed(echo: socket.socket) -> None:
    udp, listener = forwarder(echo, udp_idle_timeout=1.0)
    try:
        with balancer(listener) as lb:
            lb.send(LOCAL_HEADER + b"x")
            lb.recv(100)
        deadline = time.monotonic() + 5
        while udp.stats.flows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert udp.stats.flows == 0
    finally:
        udp.stop()
        listener.close()


def test_untrusted_and_invalid_are_counted(echo: socket.socket) -> None:
    udp, listener = forwarder(echo, allowed_networks=(parse_network("192.0.2.0/24"),))
    try:
        with balancer(listener) as lb:
            lb.send(LOCAL_HEADER + b"x")
            deadline = time.monotonic() + 5
            while not udp.stats.dropped and time.monotonic() < deadline:
                time.sleep(0.01)
        assert udp.stats.dropped == {"untrusted-balancer": 1}
        assert udp.stats.total == 0
    finally:
        udp.stop()
        listener.close()


def test_summary() -> None:
    stats = UdpStats(flows=2, total=5, packets_in=7, packets_out=6, bytes_in=70, bytes_out=60)
    stats.drop("invalid-header")
    stats.drop("invalid-header")
    stats.drop("flow-limit")
    assert stats.summary() == (
        "udp: 2 flows, 5 total, dropped: flow-limit 1, invalid-header 2, "
        "7 packets (70 bytes) in, 6 packets (60 bytes) out"
    )


def test_reply_leaves_from_the_datagrams_destination() -> None:
    received_v4 = [
        (socket.SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 3, bytes(4), bytes([198, 51, 100, 1])))
    ]
    assert _reply_ancillary(received_v4) == [
        (socket.SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, bytes([198, 51, 100, 1]), bytes(4)))
    ]
    global_v6 = socket.inet_pton(socket.AF_INET6, "2001:db8:1::1")
    link_local = socket.inet_pton(socket.AF_INET6, "fe80::1")
    for address, ifindex in ((global_v6, 0), (link_local, 4)):
        received = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", address, 4))]
        reply = _reply_ancillary(received)
        assert reply == [
            (socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", address, ifindex))
        ]
    assert _reply_ancillary([]) == []

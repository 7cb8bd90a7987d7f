"""The UDP forwarder in-process, on loopback, with the balancer's own (LOCAL) datagrams,
which are relayed without spoofing and so need no privileges; and its pure helpers.
Spoofed clients, SPP and real balancers: tests/integration/test_udp.py."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from mmproxy import udp as udp_module
from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.networks import parse_network
from mmproxy.proxy_protocol import PP2_TYPE_UNIQUE_ID, encode_v2
from mmproxy.udp import IP_PKTINFO, IPV6_PKTINFO, UdpForwarder, _reply_ancillary

LOCAL_HEADER = encode_v2("LOCAL", "UNSPEC")


@pytest.fixture(autouse=True, params=["c", "python"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both paths: the C relay of established flows, and the pure-Python
    one that runs without the C part (a pip install without a compiler)."""
    if request.param == "python":
        monkeypatch.setattr(udp_module, "_Engine", None)
    return str(request.param)


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
    while udp.stats.snapshot().packets_out < packets_out and time.monotonic() < deadline:
        time.sleep(0.01)


def balancer(listener: socket.socket, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind((host, 0))
    sock.connect(listener.getsockname())
    return sock


def nothing_arrives(sock: socket.socket) -> None:
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(65535)
    sock.settimeout(5)


def test_local_datagrams_are_relayed_and_answered(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as lb:
            for payload in (b"one", b"two", b"x" * 60000):
                lb.send(LOCAL_HEADER + payload)
                assert lb.recv(65535) == b"echo " + payload
        settled(udp, 3)
        assert (udp.stats.flows, udp.stats.total, udp.stats.snapshot().packets_in) == (1, 1, 3)
        assert (
            udp.stats.snapshot().bytes_in == 60006
            and udp.stats.snapshot().bytes_out == 60006 + 3 * 5
        )
    finally:
        udp.stop()
        listener.close()
    assert udp.stats.flows == 0


def test_a_changed_header_is_checked_again_and_keeps_its_flow(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as lb:
            for unique_id in (b"a", b"b", b"a"):
                lb.send(encode_v2("LOCAL", "UNSPEC", tlvs=[(PP2_TYPE_UNIQUE_ID, unique_id)]) + b"x")
                assert lb.recv(100) == b"echo x"
            lb.send(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x09" + b"x")  # claims more than sent
            deadline = time.monotonic() + 5
            while not udp.stats.dropped and time.monotonic() < deadline:
                time.sleep(0.01)
        assert (udp.stats.total, udp.stats.snapshot().packets_in) == (1, 3)
        assert udp.stats.dropped == {"invalid-header": 1}
    finally:
        udp.stop()
        listener.close()


def test_each_balancer_port_is_its_own_flow(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as a, balancer(listener) as b:
            a.send(LOCAL_HEADER + b"a")
            b.send(LOCAL_HEADER + b"b")
            assert (a.recv(100), b.recv(100)) == (b"echo a", b"echo b")
        assert udp.stats.total == 2
    finally:
        udp.stop()
        listener.close()


def test_idle_flow_is_closed(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo, udp_idle_timeout=1.0)
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


def test_untrusted_and_invalid_are_counted(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo, allowed_networks=(parse_network("192.0.2.0/24"),))
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


def test_a_header_alone_opens_the_flow_and_later_datagrams_need_none(
    udp_echo: socket.socket,
) -> None:
    """Spectrum's v2 framing: the header on the first datagram only, often alone."""
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as lb:
            lb.send(LOCAL_HEADER)
            nothing_arrives(lb)  # a header alone is never forwarded (not even empty)
            for payload in (b"one", b"", b"\r\n\r\n not a header"):
                lb.send(payload)
                assert lb.recv(100) == b"echo " + payload
            lb.send(LOCAL_HEADER + b"header and payload")  # refreshes the same flow
            assert lb.recv(100) == b"echo header and payload"
        settled(udp, 4)
        assert (
            udp.stats.total,
            udp.stats.snapshot().packets_in,
            udp.stats.snapshot().packets_out,
        ) == (1, 4, 4)
        assert not udp.stats.dropped
    finally:
        udp.stop()
        listener.close()


def test_a_datagram_without_header_or_flow_is_dropped(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as lb, balancer(listener) as other:
            lb.send(LOCAL_HEADER)
            other.send(b"no header, no flow on this port")
            nothing_arrives(other)
            lb.send(b"this port has one")
            assert lb.recv(100) == b"echo this port has one"
        assert udp.stats.dropped == {"no-flow": 1}
        assert udp.stats.total == 1
    finally:
        udp.stop()
        listener.close()


def test_the_least_recently_used_flow_makes_room(udp_echo: socket.socket) -> None:
    """Issue 11: a full table used to refuse every new flow (`flow-limit`), so whoever
    filled it first kept it; now the flow quiet for longest is closed instead."""
    udp, listener = forwarder(udp_echo, udp_max_flows=2)
    try:
        with balancer(listener) as a, balancer(listener) as b, balancer(listener) as c:
            for lb in (a, b, a, c):
                lb.send(LOCAL_HEADER + b"x")
                assert lb.recv(100) == b"echo x"
            assert (udp.stats.flows, udp.stats.total, udp.stats.evicted) == (2, 3, 1)
            a.send(b"a kept its flow")  # b was the least recently used, not a
            assert a.recv(100) == b"echo a kept its flow"
            b.send(b"b lost its flow")
            nothing_arrives(b)
        assert udp.stats.dropped == {"no-flow": 1}
        assert "1 flows evicted" in udp.stats.summary()
    finally:
        udp.stop()
        listener.close()


def test_a_balancer_address_evicts_within_its_share(udp_echo: socket.socket) -> None:
    """Issue 11: one (spoofed) balancer address must not evict the others' flows while
    it holds its share of the table."""
    udp, listener = forwarder(udp_echo, udp_max_flows=4, udp_max_flows_per_balancer=2)
    try:
        with balancer(listener, "127.0.0.2") as other:
            other.send(LOCAL_HEADER + b"first")
            assert other.recv(100) == b"echo first"
            flooders = [balancer(listener) for _ in range(5)]
            for lb in flooders:
                lb.send(LOCAL_HEADER + b"x")
                assert lb.recv(100) == b"echo x"
            for lb in flooders:
                lb.close()
            # 127.0.0.1 got 5 flows one after the other, and kept 2; the other's is open.
            assert (udp.stats.flows, udp.stats.total, udp.stats.evicted) == (3, 6, 3)
            other.send(b"still mine")
            assert other.recv(100) == b"echo still mine"
        assert udp.stats.total == 6 and not udp.stats.dropped
    finally:
        udp.stop()
        listener.close()


def calls_to_python(udp: UdpForwarder, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The datagrams that reach the Python path of the forwarder, from now on."""
    seen: list[bytes] = []
    checked = udp._datagram

    def counted(listener: object, data: bytes, *rest: object) -> None:
        seen.append(data)
        checked(listener, data, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(udp, "_datagram", counted)
    return seen


def test_a_flows_datagrams_after_the_first_skip_python_with_the_c_part(
    udp_echo: socket.socket, relay_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    udp, listener = forwarder(udp_echo)
    seen = calls_to_python(udp, monkeypatch)
    try:
        with balancer(listener) as every, balancer(listener) as first:
            for n in range(5):
                every.send(LOCAL_HEADER + b"every %d" % n)
                assert every.recv(100) == b"echo every %d" % n
            first.send(LOCAL_HEADER)  # Spectrum: a header alone, then none
            nothing_arrives(first)  # (and the next is not read in the same batch)
            for n in range(5):
                first.send(b"first %d" % n)
                assert first.recv(100) == b"echo first %d" % n
        settled(udp, 10)
        assert (
            udp.stats.snapshot().packets_in,
            udp.stats.snapshot().packets_out,
            udp.stats.total,
        ) == (10, 10, 2)
        # C: the first datagram with that header, and the header alone (which gives the
        # flow its port: the headerless datagrams after it are relayed in C)
        expected = 2 if relay_path == "c" else 5 + 1 + 5
        assert len(seen) == expected, seen
    finally:
        udp.stop()
        listener.close()


def test_datagrams_relayed_in_c_count_in_the_lru_order(udp_echo: socket.socket) -> None:
    """a opens first but stays busy (its datagrams are relayed without Python): the new
    flow's room is made by closing b, the one quiet longest."""
    udp, listener = forwarder(udp_echo, udp_max_flows=2)
    try:
        with balancer(listener) as a, balancer(listener) as b, balancer(listener) as c:
            for lb in (a, b):
                lb.send(LOCAL_HEADER + b"x")
                assert lb.recv(100) == b"echo x"
            time.sleep(0.3)  # longer than the LRU order's resolution
            a.send(LOCAL_HEADER + b"x")
            assert a.recv(100) == b"echo x"
            c.send(LOCAL_HEADER + b"x")
            assert c.recv(100) == b"echo x"
            assert udp.stats.evicted == 1
            a.send(LOCAL_HEADER + b"still open")
            assert a.recv(100) == b"echo still open"
            assert udp.stats.total == 3  # not reopened
    finally:
        udp.stop()
        listener.close()


def test_a_reload_stops_the_c_relay_of_a_balancer_no_longer_trusted(
    udp_echo: socket.socket,
) -> None:
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as lb:
            lb.send(LOCAL_HEADER + b"x")
            assert lb.recv(100) == b"echo x"
            untrusting = {"allowed_networks": (parse_network("192.0.2.0/24"),)}
            udp.reconfigure(Config(**{**vars(udp.config), **untrusting}))
            lb.send(LOCAL_HEADER + b"y")  # at once: before the loop has gone round
            nothing_arrives(lb)
        assert udp.stats.dropped == {"untrusted-balancer": 1}
    finally:
        udp.stop()
        listener.close()


def test_idle_flows_close_in_order_of_last_use(udp_echo: socket.socket) -> None:
    udp, listener = forwarder(udp_echo, udp_idle_timeout=1.0)
    try:
        with balancer(listener) as a, balancer(listener) as b:
            a.send(LOCAL_HEADER + b"x")
            b.send(LOCAL_HEADER + b"x")
            a.recv(100), b.recv(100)
            deadline = time.monotonic() + 2.5  # a stays busy, b goes quiet
            while time.monotonic() < deadline:
                a.send(b"busy")
                assert a.recv(100) == b"echo busy"
                time.sleep(0.1)
            assert (udp.stats.flows, udp.stats.total) == (1, 2)
    finally:
        udp.stop()
        listener.close()


def test_a_reload_that_changes_the_framing_closes_every_flow(udp_echo: socket.socket) -> None:
    """A flow's replies are framed for the balancer that opened it (SPP puts a header on
    each): after `udp_header` changes, no flow may carry on with the old framing."""
    udp, listener = forwarder(udp_echo)
    try:
        with balancer(listener) as lb:
            lb.send(LOCAL_HEADER + b"x")
            assert lb.recv(100) == b"echo x"
            udp.reconfigure(Config(**{**vars(udp.config), "udp_header": "spp"}))
            lb.send(b"the old flow's payload")
            nothing_arrives(lb)
        until_dropped = time.monotonic() + 5
        while not udp.stats.dropped and time.monotonic() < until_dropped:
            time.sleep(0.01)
        assert udp.stats.flows == 0
        assert udp.stats.dropped == {"invalid-header": 1}  # not SPP: bad magic
    finally:
        udp.stop()
        listener.close()


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

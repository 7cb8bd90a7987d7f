"""UDP end to end: datagrams from a balancer in one namespace (PROXY v2 on every datagram,
or framed as Cloudflare Spectrum does: v2 on the first datagram only, or SPP), a real
mmproxy and real UDP servers (a small echo, dnsmasq) in the other."""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import yaml

from mmproxy.netns import NetNS
from mmproxy.proxy_protocol import encode_v1, encode_v2
from tests.support import UdpEcho, prefixed

from .conftest import CLIENT4, CLIENT6, GW4, GW6, PEER4, Mmproxy, Net, StartMmproxy

PORT = 5300  # mmproxy's UDP listener in the gateway namespace


@pytest.fixture
def echoes() -> Iterator[Callable[[NetNS, str], UdpEcho]]:
    made: list[UdpEcho] = []

    def make(ns: NetNS, host: str) -> UdpEcho:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = ns.open_socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        made.append(UdpEcho(sock))
        return made[-1]

    yield make
    for echo in made:
        echo.sock.close()


def final_status(proc: Mmproxy) -> str:
    """The counters mmproxy logs when it stops (its STATUS= line while running)."""
    proc.stop()
    return proc.wait_for(r"stopping: ")


@dataclass
class UdpWorld:
    """The loopback variant with a UDP echo per family, and how to start mmproxy there."""

    net: Net
    echo4: UdpEcho
    echo6: UdpEcho
    run: StartMmproxy

    def start(self, **keys: object) -> Mmproxy:
        return start_udp(self.run, self.net, self.echo4, self.echo6, **keys)


@pytest.fixture
def world(
    lo_net: Net, run_mmproxy: StartMmproxy, echoes: Callable[[NetNS, str], UdpEcho]
) -> UdpWorld:
    return UdpWorld(lo_net, echoes(lo_net.gw, "127.0.0.1"), echoes(lo_net.gw, "::1"), run_mmproxy)


def targets(net: Net) -> tuple[str, str]:
    return ("127.0.0.1", "::1") if net.variant == "lo" else (GW4, GW6)


def datagram(source: tuple[str, int], payload: bytes, family: str | None = None) -> bytes:
    family = family or ("UDP6" if ":" in source[0] else "UDP4")
    destination = (GW6, PORT) if family.endswith("6") else (GW4, PORT)
    return encode_v2("PROXY", family, source, destination) + payload


def balancer(net: Net, v6: bool = False, timeout: float = 5.0) -> socket.socket:
    """The balancer's socket in the peer namespace, aimed at mmproxy's listener."""
    sock = net.peer.open_socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.connect((GW6, PORT) if v6 else (GW4, PORT))
    return sock


def start_udp(
    run_mmproxy: StartMmproxy, net: Net, echo4: UdpEcho, echo6: UdpEcho, **keys: object
) -> Mmproxy:
    config: dict[str, object] = {
        "listen": [f"udp://0.0.0.0:{PORT}", f"udp://[::]:{PORT}"],
        "ipv4": echo4.address,
        "ipv6": echo6.address,
        "allowed_networks": ["198.51.100.0/24", "2001:db8:1::/64"],
    }
    config.update(keys)
    return run_mmproxy(net, **config)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_application_sees_the_client_and_replies_come_back(
    net: Net, run_mmproxy: StartMmproxy, echoes: Callable[[NetNS, str], UdpEcho], v6: bool
) -> None:
    echo4, echo6 = (echoes(net.gw, host) for host in targets(net))
    start_udp(run_mmproxy, net, echo4, echo6)
    client = (CLIENT6, 40006) if v6 else (CLIENT4, 40004)
    with balancer(net, v6) as lb:
        for n in range(3):
            lb.send(datagram(client, b"ping %d" % n))
            assert lb.recv(65535) == f"{client[0]} {client[1]} ping {n}".encode()
        # The reply comes from the address the balancer sent to, though mmproxy listens
        # on the wildcard address (else a balancer would not match it to its request).
        assert lb.getpeername()[:2] == ((GW6, PORT) if v6 else (GW4, PORT))


def test_ipv4_balancer_on_a_dual_stack_listener(world: UdpWorld) -> None:
    lo_net = world.net
    world.start(listen=f"udp://[::]:{PORT}")
    with balancer(lo_net) as lb:
        lb.send(datagram((CLIENT4, 41000), b"mapped"))
        assert lb.recv(65535) == f"{CLIENT4} 41000 mapped".encode()


def test_many_concurrent_flows_keep_their_replies_apart(world: UdpWorld) -> None:
    lo_net, echo4 = world.net, world.echo4
    proc = world.start()
    clients = [(f"203.0.113.{1 + i % 200}", 20000 + i) for i in range(400)]
    replies: dict[tuple[str, int], list[bytes]] = {}
    with balancer(lo_net) as lb:
        order = [c for c in clients for _ in range(3)]
        random.Random(7).shuffle(order)
        for i, client in enumerate(order):
            lb.send(datagram(client, f"{client[0]}:{client[1]} #{i}".encode()))
            reply = lb.recv(65535)
            seen_host, seen_port, payload = reply.split(b" ", 2)
            replies.setdefault((seen_host.decode(), int(seen_port)), []).append(payload)
    assert len(replies) == len(clients)
    for (host, port), payloads in replies.items():
        assert len(payloads) == 3
        assert all(p.startswith(f"{host}:{port} #".encode()) for p in payloads)
    # One upstream socket per flow, reused: the application saw 400 distinct sources.
    assert len(set(echo4.peers)) == 400
    assert len(echo4.peers) == 1200
    assert "udp: 400 flows, 400 total, dropped: none, 1200 packets" in final_status(proc)


def test_idle_flows_are_closed_with_a_record(world: UdpWorld) -> None:
    lo_net = world.net
    proc = world.start(udp_idle_timeout="1s")
    with balancer(lo_net) as lb:
        lb.send(datagram((CLIENT4, 42000), b"12345"))
        lb.recv(65535)
        record = proc.wait_for(rf"{CLIENT4}:42000 via .* \(udp\): idle after", timeout=5)
    assert "1 packets (5 bytes) in, 1 packets (23 bytes) out" in record
    # A new datagram from the same client opens a new flow.
    with balancer(lo_net) as lb:
        lb.send(datagram((CLIENT4, 42000), b"again"))
        assert lb.recv(65535) == f"{CLIENT4} 42000 again".encode()
    assert "udp: 1 flows, 2 total" in final_status(proc)
    proc.wait_for(rf"{CLIENT4}:42000 via .* \(udp\): stopping after")


def _assert_nothing_arrives(lb: socket.socket) -> None:
    lb.settimeout(0.3)
    with pytest.raises(TimeoutError):
        lb.recv(65535)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"no header at all", "no-flow"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00", "invalid-header"),  # truncated v2
        (encode_v1("TCP4", (CLIENT4, 1), (GW4, PORT)) + b"x", "invalid-header"),
        (datagram((CLIENT4, 1), b"x", family="TCP4"), "unsupported-family"),
        (datagram(("127.0.0.1", 1), b"x"), "forged-local-source"),
        (datagram(("0.0.0.0", 1), b"x"), "forged-local-source"),
        (datagram((GW4, 1), b"x"), "forged-local-source"),
    ],
    ids=["garbage", "truncated", "v1", "tcp-family", "loopback", "unspecified", "own-address"],
)
def test_bad_datagrams_are_dropped_and_counted(
    world: UdpWorld, payload: bytes, reason: str
) -> None:
    lo_net, echo4 = world.net, world.echo4
    proc = world.start()
    with balancer(lo_net) as lb:
        for _ in range(3):
            lb.send(payload)
        _assert_nothing_arrives(lb)
    proc.wait_for(rf"dropped a datagram from {PEER4}:\d+: ")
    assert f"dropped: {reason} 3," in final_status(proc)
    assert echo4.peers == [] and world.echo6.peers == []


def test_untrusted_balancer_is_dropped(world: UdpWorld) -> None:
    lo_net, echo4 = world.net, world.echo4
    proc = world.start(allowed_networks=["192.0.2.0/24"])
    with balancer(lo_net) as lb:
        lb.send(datagram((CLIENT4, 43000), b"forged"))
        _assert_nothing_arrives(lb)
    assert "dropped: untrusted-balancer 1," in final_status(proc)
    assert echo4.peers == []


def test_a_full_table_closes_the_least_recently_used_flow(world: UdpWorld) -> None:
    lo_net = world.net
    proc = world.start(udp_max_flows=2)
    with balancer(lo_net) as lb:
        for port in (1001, 1002, 1001, 1003):  # 1002 is the least recently used at 1003
            lb.send(datagram((CLIENT4, port), b"in"))
            assert lb.recv(65535) == f"{CLIENT4} {port} in".encode()
        proc.wait_for(rf"closed the least recently used UDP flow \({CLIENT4}:1002 via ")
        proc.wait_for(rf"{CLIENT4}:1002 via .* \(udp\): evicted after")
        lb.send(datagram((CLIENT4, 1001), b"still served"))
        assert lb.recv(65535) == f"{CLIENT4} 1001 still served".encode()
    status = final_status(proc)
    assert "udp: 2 flows, 3 total, dropped: none" in status and "1 flows evicted" in status


def test_tcp_and_udp_on_one_port(world: UdpWorld) -> None:
    """One instance, one port number, both transports: the DNS layout."""
    lo_net = world.net
    tcp = lo_net.gw.listen(("127.0.0.1", world.echo4.sock.getsockname()[1]))
    try:
        world.start(
            listen=[f"0.0.0.0:{PORT}", f"udp://0.0.0.0:{PORT}"], ipv6=None,
        )  # fmt: skip
        with balancer(lo_net) as lb:
            lb.send(datagram((CLIENT4, 44000), b"udp"))
            assert lb.recv(65535) == f"{CLIENT4} 44000 udp".encode()
        with lo_net.peer.connect((GW4, PORT)) as conn:
            conn.sendall(encode_v2("PROXY", "TCP4", (CLIENT4, 44001), (GW4, PORT)) + b"tcp")
            app, peer = tcp.accept()
            while peer[0] != CLIENT4:  # the self-checks' plain and spoofed connections
                app.close()
                app, peer = tcp.accept()
            with app:
                assert peer == (CLIENT4, 44001)
                assert app.recv(3) == b"tcp"
    finally:
        tcp.close()


# --- a real DNS server -----------------------------------------------------------------


def dns_query(name: str, query_id: int) -> bytes:
    """A standard query for the A record of `name` (RFC 1035 section 4.1)."""
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return (
        struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    )


def dns_answer_address(reply: bytes, query_id: int) -> str:
    rid, flags, _qd, ancount, _ns, _ar = struct.unpack_from("!HHHHHH", reply)
    assert rid == query_id and flags & 0x8000 and flags & 0xF == 0, reply
    assert ancount == 1
    return socket.inet_ntoa(reply[-4:])  # the one A record's RDATA ends the message


@pytest.fixture
def dnsmasq(lo_net: Net, tmp_path: os.PathLike[str]) -> Iterator[tuple[int, list[str]]]:
    """dnsmasq on 127.0.0.1, answering example.test, logging each query with its client."""
    binary = shutil.which("dnsmasq")
    assert binary, "dnsmasq is missing: `make deps` installs dnsmasq-base"
    port = 5353
    cmd = lo_net.gw.exec_args(
        binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
        "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}",
        "--address=/example.test/192.0.2.53", "--log-queries", "--log-facility=-",
        "--user=root", "--pid-file=",
    )  # fmt: skip
    # `make sanitize` preloads ASan for mmproxy's C part: not for dnsmasq, which it breaks.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 5
    while not any("started" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, lines
    proc.terminate()
    proc.wait(5)


def test_dnsmasq_answers_and_logs_the_client(
    lo_net: Net, run_mmproxy: StartMmproxy, dnsmasq: tuple[int, list[str]]
) -> None:
    port, lines = dnsmasq
    run_mmproxy(
        lo_net,
        listen=f"udp://0.0.0.0:{PORT}",
        ipv4=f"127.0.0.1:{port}",
        allowed_networks=["198.51.100.0/24"],
    )
    with balancer(lo_net) as lb:
        for query_id, client_port in ((0x1234, 53001), (0x4321, 53002)):
            lb.send(datagram((CLIENT4, client_port), dns_query("www.example.test", query_id)))
            assert dns_answer_address(lb.recv(65535), query_id) == "192.0.2.53"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum(CLIENT4 in line for line in lines) < 2:
        time.sleep(0.05)
    queries = [line for line in lines if "query[A] www.example.test" in line]
    assert len(queries) == 2 and all(f"from {CLIENT4}" in q for q in queries), lines


def test_ipv6_client_through_ipv4_balancer_socket(world: UdpWorld) -> None:
    """The header's family, not the balancer's, picks the target."""
    world.start()
    with balancer(world.net) as lb:
        lb.send(datagram((CLIENT6, 45000), b"six"))
        assert lb.recv(65535) == f"{CLIENT6} 45000 six".encode()


def test_reload_applies_to_new_datagrams_and_a_bad_one_keeps_the_config(world: UdpWorld) -> None:
    lo_net = world.net
    proc = world.start()
    config_path = proc.config_path
    with balancer(lo_net) as lb:
        lb.send(datagram((CLIENT4, 46000), b"before"))
        assert lb.recv(65535) == f"{CLIENT4} 46000 before".encode()
        config = yaml.safe_load(config_path.read_text())
        config_path.write_text(yaml.safe_dump({**config, "udp_max_flows": "many"}))
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for(r"reload failed, keeping the running configuration: .*udp_max_flows")
        lb.send(datagram((CLIENT4, 46000), b"kept"))
        assert lb.recv(65535) == f"{CLIENT4} 46000 kept".encode()
        # The balancer is no longer trusted: even its open flow gets nothing more.
        config_path.write_text(yaml.safe_dump({**config, "allowed_networks": ["192.0.2.0/24"]}))
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("configuration reloaded")
        lb.send(datagram((CLIENT4, 46000), b"after"))
        _assert_nothing_arrives(lb)
    assert "dropped: untrusted-balancer 1," in final_status(proc)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_target_down_is_counted_and_flows_leak_nothing(world: UdpWorld) -> None:
    lo_net, echo4 = world.net, world.echo4
    proc = world.start(udp_idle_timeout="1s")
    pid = proc.proc.pid
    baseline = _open_fds(pid)
    with balancer(lo_net) as lb:
        for i in range(2000):
            lb.send(datagram((f"203.0.113.{1 + i % 250}", 30000 + i), b"x"))
            lb.recv(65535)
        assert _open_fds(pid) >= baseline + 2000  # one socket per flow while they live
        echo4.sock.close()  # the application goes away
        for i in range(3):
            lb.send(datagram((CLIENT4, 47000), b"into the void %d" % i))
            _assert_nothing_arrives(lb)
    deadline = time.monotonic() + 10
    while _open_fds(pid) != baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(pid) == baseline
    status = final_status(proc)
    assert "udp: 0 flows, 2001 total" in status, status
    assert "target-refused" in status, status


def test_an_application_on_every_address_must_answer_from_the_address_asked(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    """Bound to 0.0.0.0, a server that replies from the address it was asked on (as
    dnsmasq, unbound and BIND do, with IP_PKTINFO) is reached; the self-check says so."""
    sock = lo_net.gw.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    UdpEcho(sock, prefixed(b"from the address asked: "), pktinfo=True)
    port = sock.getsockname()[1]
    try:
        proc = run_mmproxy(
            lo_net,
            listen=f"udp://0.0.0.0:{PORT}",
            ipv4=f"127.0.0.1:{port}",
            ipv6=None,
            allowed_networks=["198.51.100.0/24"],
        )
        proc.wait_for(
            rf"VERIFIED  a UDP socket is bound to port {port} on every address "
            r"\(the application; it must reply from 127\.0\.0\.1"
        )
        with balancer(lo_net) as lb:
            lb.send(datagram((CLIENT4, 48000), b"hello"))
            assert lb.recv(65535) == b"from the address asked: hello"
    finally:
        sock.close()


# --- Cloudflare Spectrum's framings ----------------------------------------------------

SPECTRUM4, SPECTRUM6 = ("192.0.2.1", 53), ("2001:db8:53::1", 53)  # what the clients asked
SPP_SIZE = 38


def spp_header(client: tuple[str, int], proxy: tuple[str, int]) -> bytes:
    """SPP as Cloudflare documents it, written out here rather than by mmproxy's codec:
    magic, client and proxy addresses (16 bytes each, IPv4 mapped), the two ports."""

    def packed(host: str) -> bytes:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host)
        return bytes(10) + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host)

    ports = struct.pack("!HH", client[1], proxy[1])
    return b"\x56\xec" + packed(client[0]) + packed(proxy[0]) + ports


class SpectrumFlow:
    """One client's flow as Spectrum sends it, from a balancer address and port of its
    own. v2: the header alone in the first datagram, then payloads without one. spp: the
    38-byte header on every datagram; every reply must come back with it."""

    def __init__(self, net: Net, framing: str, client: tuple[str, int], v6: bool = False):
        self.sock = balancer(net, v6)
        self.framing = framing
        proxy = SPECTRUM6 if ":" in client[0] else SPECTRUM4
        if framing == "spp":
            self.header = spp_header(client, proxy)
        else:
            self.header = datagram(client, b"")
        self.started = False

    def send(self, payload: bytes) -> None:
        if self.framing == "spp":
            self.sock.send(self.header + payload)
            return
        if not self.started:
            self.sock.send(self.header)
            self.started = True
        self.sock.send(payload)

    def recv(self) -> bytes:
        data = self.sock.recv(65535)
        if self.framing == "spp":
            assert data[:SPP_SIZE] == self.header, data
            return data[SPP_SIZE:]
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("framing", ["v2", "spp"])
def test_spectrum_framings_reach_the_application_as_the_client(
    net: Net, run_mmproxy: StartMmproxy, echoes: Callable[[NetNS, str], UdpEcho], framing: str
) -> None:
    echo4, echo6 = (echoes(net.gw, host) for host in targets(net))
    proc = start_udp(run_mmproxy, net, echo4, echo6, udp_header=framing)
    cases = [((CLIENT4, 40004), False), ((CLIENT6, 40006), True), ((CLIENT6, 40066), False)]
    flows = [SpectrumFlow(net, framing, client, v6) for client, v6 in cases]
    try:
        for n in range(3):
            for flow, (client, _) in zip(flows, cases, strict=True):
                flow.send(b"ping %d" % n)
                assert flow.recv() == f"{client[0]} {client[1]} ping {n}".encode()
    finally:
        for flow in flows:
            flow.close()
    assert echo4.peers == [(CLIENT4, 40004)] * 3  # IPv4-mapped in SPP: seen as IPv4
    assert sorted(set(echo6.peers)) == [(CLIENT6, 40006), (CLIENT6, 40066)]
    status = final_status(proc)
    assert "udp: 3 flows, 3 total, dropped: none, 9 packets" in status, status
    proc.wait_for(rf"{CLIENT4}:40004 via {PEER4}:\d+ -> .* \(udp\): stopping after .* 3 packets")


@pytest.mark.parametrize("framing", ["v2", "spp"])
def test_many_spectrum_flows_keep_their_replies_apart(world: UdpWorld, framing: str) -> None:
    """200 clients, each from a balancer port of its own, their datagrams interleaved."""
    proc = world.start(udp_header=framing)
    clients = [(f"203.0.113.{1 + i % 100}", 21000 + i) for i in range(200)]
    flows = {client: SpectrumFlow(world.net, framing, client) for client in clients}
    order = [c for c in clients for _ in range(3)]
    random.Random(11).shuffle(order)
    try:
        for i, client in enumerate(order):
            flows[client].send(b"#%d" % i)
            assert flows[client].recv() == f"{client[0]} {client[1]} #{i}".encode()
    finally:
        for flow in flows.values():
            flow.close()
    assert len(world.echo4.peers) == 600 and set(world.echo4.peers) == set(clients)
    assert "udp: 200 flows, 200 total, dropped: none, 600 packets" in final_status(proc)


def test_a_new_header_on_the_same_port_replaces_the_client(world: UdpWorld) -> None:
    """Spectrum reuses a balancer port for another client once the first one's flow has
    timed out on its side: the new header's client takes the port."""
    proc = world.start()
    with balancer(world.net) as lb:
        for client in ((CLIENT4, 41001), (CLIENT4, 41002)):
            lb.send(datagram(client, b""))
            lb.send(b"who am I")
            assert lb.recv(65535) == f"{client[0]} {client[1]} who am I".encode()
        proc.wait_for(rf"{CLIENT4}:41001 via {PEER4}:\d+ -> .* \(udp\): replaced after")
    assert "udp: 1 flows, 2 total, dropped: none" in final_status(proc)


def test_reload_checks_the_balancer_of_a_first_datagram_flow(world: UdpWorld) -> None:
    """Its datagrams carry no header to check again: a balancer that lost its trust
    loses its flows' later datagrams too."""
    proc = world.start()
    config_path = proc.config_path
    flow = SpectrumFlow(world.net, "v2", (CLIENT4, 42001))
    try:
        flow.send(b"before")
        assert flow.recv() == f"{CLIENT4} 42001 before".encode()
        config = yaml.safe_load(config_path.read_text())
        config_path.write_text(yaml.safe_dump({**config, "udp_idle_timeout": "30s"}))
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("configuration reloaded")
        flow.send(b"still trusted")
        assert flow.recv() == f"{CLIENT4} 42001 still trusted".encode()
        config_path.write_text(yaml.safe_dump({**config, "allowed_networks": ["192.0.2.0/24"]}))
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("configuration reloaded", timeout=10)
        time.sleep(0.2)
        flow.send(b"after")
        _assert_nothing_arrives(flow.sock)
    finally:
        flow.close()
    assert "dropped: untrusted-balancer 1," in final_status(proc)


@pytest.mark.parametrize(
    ("payload", "reason", "why"),
    [
        (spp_header((CLIENT4, 1), SPECTRUM4)[:37], "invalid-header", "37 bytes, shorter"),
        (b"\x56\xed" + spp_header((CLIENT4, 1), SPECTRUM4)[2:], "invalid-header", "magic"),
        (datagram((CLIENT4, 1), b"x" * 40), "invalid-header", "bad SPP magic 0x0d0a"),
        (spp_header(("127.0.0.1", 1), SPECTRUM4) + b"x", "forged-local-source", "127.0.0.1"),
        (spp_header((GW4, 1), SPECTRUM4) + b"x", "forged-local-source", GW4),
        (spp_header(("::1", 1), SPECTRUM6) + b"x", "forged-local-source", "::1"),
    ],
    ids=["short", "magic", "proxy-v2", "loopback", "own-address", "loopback6"],
)
def test_bad_spp_datagrams_are_dropped_and_counted(
    world: UdpWorld, payload: bytes, reason: str, why: str
) -> None:
    proc = world.start(udp_header="spp")
    with balancer(world.net) as lb:
        for _ in range(3):
            lb.send(payload)
        _assert_nothing_arrives(lb)
    line = proc.wait_for(rf"dropped a datagram from {PEER4}:\d+: ")
    assert why in line, line
    assert f"dropped: {reason} 3," in final_status(proc)
    assert world.echo4.peers == [] and world.echo6.peers == []


def test_spp_from_an_untrusted_balancer_is_dropped(world: UdpWorld) -> None:
    proc = world.start(udp_header="spp", allowed_networks=["192.0.2.0/24"])
    flow = SpectrumFlow(world.net, "spp", (CLIENT4, 43001))
    try:
        flow.send(b"forged")
        _assert_nothing_arrives(flow.sock)
    finally:
        flow.close()
    assert "dropped: untrusted-balancer 1," in final_status(proc)
    assert world.echo4.peers == []


class SpectrumRelay:
    """A Spectrum-like balancer in the peer namespace: clients send plain datagrams to its
    front address; it gives each client a flow towards mmproxy from a port of its own,
    framed as configured, and passes the replies back to the client (without SPP)."""

    def __init__(self, net: Net, framing: str, front: tuple[str, int] = SPECTRUM4) -> None:
        self.net, self.framing = net, framing
        net.peer.ip("addr", "add", f"{front[0]}/32", "dev", "lo")
        self.front = net.peer.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(front)
        self.flows: dict[tuple[str, int], SpectrumFlow] = {}
        self.errors: list[BaseException] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.front, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            for key, _ in self.selector.select(0.1):
                try:
                    self._ready(key.data)
                except Exception as exc:  # the test asserts none happened
                    self.errors.append(exc)

    def _ready(self, client: tuple[str, int] | None) -> None:
        if client is None:  # a client's datagram at the front
            data, peer = self.front.recvfrom(65535)
            flow = self.flows.get(peer)
            if flow is None:
                flow = self.flows[peer] = SpectrumFlow(self.net, self.framing, peer)
                self.selector.register(flow.sock, selectors.EVENT_READ, peer)
            flow.send(data)
        else:  # mmproxy's reply for that client (SpectrumFlow checks and strips SPP)
            self.front.sendto(self.flows[client].recv(), client)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.front.close()
        for flow in self.flows.values():
            flow.close()


@pytest.mark.parametrize("framing", ["v2", "spp"])
def test_dig_through_spectrum_to_dnsmasq_which_logs_the_client(
    lo_net: Net, run_mmproxy: StartMmproxy, dnsmasq: tuple[int, list[str]], framing: str
) -> None:
    """Debian's dig asks a Spectrum-like relay, which frames the query to mmproxy;
    dnsmasq answers it and logs the client's own address."""
    dig = shutil.which("dig")
    assert dig, "dig is missing: `make deps` installs bind9-dnsutils"
    port, lines = dnsmasq
    proc = run_mmproxy(
        lo_net,
        listen=f"udp://0.0.0.0:{PORT}",
        ipv4=f"127.0.0.1:{port}",
        allowed_networks=["198.51.100.0/24"],
        udp_header=framing,
    )
    clients = (CLIENT4, "192.0.2.99")
    for client in clients:
        lo_net.peer.ip("addr", "add", f"{client}/32", "dev", "lo")
    relay = SpectrumRelay(lo_net, framing)
    try:
        for client in clients:
            for name in ("www.example.test", "mail.example.test"):
                answer = lo_net.peer.sh(
                    dig, f"@{SPECTRUM4[0]}", "-b", f"{client}#53000", "+short", "+tries=1",
                    "+time=5", name, "A",
                )  # fmt: skip
                assert answer.stdout.split() == ["192.0.2.53"], answer
    finally:
        relay.close()
    assert relay.errors == []
    deadline = time.monotonic() + 5
    queries: list[str] = []
    while time.monotonic() < deadline and len(queries) < 4:
        queries = [line for line in lines if "query[A]" in line and "example.test" in line]
        time.sleep(0.05)
    assert len(queries) == 4, lines
    for client in clients:
        assert sum(q.endswith(f"from {client}") for q in queries) == 2, queries
    # Both queries of a client come from one port (-b): one flow, and with v2 the second
    # query reached mmproxy with no header at all.
    assert "udp: 2 flows, 2 total, dropped: none, 4 packets" in final_status(proc)


def test_reverse_path_filtering_keeps_flows_working(
    net: Net, run_mmproxy: StartMmproxy, echoes: Callable[[NetNS, str], UdpEcho]
) -> None:
    """docs/security.md advises strict reverse-path filtering against forged balancer
    addresses: it must not break either routing variant (the replies the policy routing
    brings back arrive on lo, which the kernel does not filter)."""
    assert net.gw.veth is not None
    for interface in ("all", "default", net.gw.veth):
        net.gw.sysctl(f"net.ipv4.conf.{interface}.rp_filter", "1")
    echo4, echo6 = (echoes(net.gw, host) for host in targets(net))
    forged = "192.0.2.5"  # allowed, but routed elsewhere (lo variant: nowhere)
    allowed = ["198.51.100.0/24", "2001:db8:1::/64", f"{forged}/32"]
    proc = start_udp(run_mmproxy, net, echo4, echo6, allowed_networks=allowed)
    flow = SpectrumFlow(net, "v2", (CLIENT4, 44004))
    try:
        for n in range(2):
            flow.send(b"filtered %d" % n)
            assert flow.recv() == f"{CLIENT4} 44004 filtered {n}".encode()
    finally:
        flow.close()
    if net.variant != "lo":
        return  # the fwmark variant's default route leads back out of the veth
    # A datagram forged from the allowed address arrives on an interface that address is
    # not routed through: the kernel drops it before mmproxy sees it.
    assert net.peer.veth is not None
    net.peer.ip("addr", "add", f"{forged}/32", "dev", net.peer.veth)
    sock = net.peer.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((forged, 0))
        sock.sendto(datagram((CLIENT4, 44005), b"forged"), (GW4, PORT))
        time.sleep(0.3)
    assert echo4.peers == [(CLIENT4, 44004)] * 2
    assert "udp: 1 flows, 1 total, dropped: none, 2 packets" in final_status(proc)

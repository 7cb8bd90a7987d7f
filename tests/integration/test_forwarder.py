"""The forwarder end to end: a real mmproxy process between a client socket and an
application, in network namespaces, with both routing variants."""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import signal
import socket
import struct
import threading
import time

import pytest

from mmproxy.proxy_protocol import encode_v1, encode_v2
from tests.support import Seen

from .conftest import (
    CLIENT4,
    CLIENT6,
    GW4,
    GW6,
    PEER4,
    Net,
    StartMmproxy,
    recv_all,
    start_backend,
)


def header(version: int, family: str, source: tuple[str, int]) -> bytes:
    destination = (GW4, 2222) if family == "TCP4" else (GW6, 2222)
    if version == 1:
        return encode_v1(family, source, destination)
    return encode_v2("PROXY", family, source, destination)


def targets(net: Net) -> tuple[str, str]:
    """The application's addresses: loopback for the lo variant, the veth's for fwmark."""
    return ("127.0.0.1", "::1") if net.variant == "lo" else (GW4, GW6)


def connect(net: Net, via_v6: bool = False) -> socket.socket:
    return net.gw.connect(("::1", 2222) if via_v6 else ("127.0.0.1", 2222))


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("family", ["TCP4", "TCP6"])
def test_application_sees_the_client_address(
    net: Net, run_mmproxy: StartMmproxy, version: int, family: str
) -> None:
    t4, t6 = targets(net)
    app4, app6 = start_backend(net.gw, t4), start_backend(net.gw, t6)
    run_mmproxy(net, ipv4=app4.address, ipv6=app6.address)
    client = (CLIENT4, 40001) if family == "TCP4" else (CLIENT6, 40002)
    with connect(net, via_v6=family == "TCP6") as sock:
        sock.sendall(header(version, family, client) + b"ping")
        assert read_line(sock) == f"{client[0]} {client[1]}\n"
        assert sock.recv(4) == b"ping"
    assert len((app4 if family == "TCP4" else app6).seen) == 1


def test_header_one_byte_at_a_time(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in encode_v2("PROXY", "TCP4", (CLIENT4, 40003), (GW4, 2222)):
            sock.send(bytes([byte]))
            time.sleep(0.002)
        assert read_line(sock) == f"{CLIENT4} 40003\n"


def test_data_in_the_header_segment_arrives_intact(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address)
    payload = b"SSH-2.0-client\r\n" + bytes(range(256))
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", (CLIENT4, 40004)) + payload)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock)
    assert reply == f"{CLIENT4} 40004\n".encode() + payload
    assert app.seen[0].received == payload


def test_untrusted_balancer_is_closed_before_any_byte(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, allowed_networks=["192.0.2.0/24"])
    with connect(lo_net) as sock:
        try:
            sock.sendall(header(1, "TCP4", (CLIENT4, 40005)) + b"data")
        except OSError:
            pass  # already closed: just as good
        assert recv_all(sock) == b""
    proc.wait_for(r"rejected 127\.0\.0\.1:\d+: peer is not in allowed_networks")
    assert app.seen == []


@pytest.mark.parametrize(
    ("family", "source", "why"),
    [
        ("TCP4", "127.0.0.1", "loopback"),
        ("TCP4", "0.0.0.0", "unspecified"),
        ("TCP4", "224.0.0.1", "multicast"),
        ("TCP4", GW4, "an address of this host"),
        ("TCP6", "::1", "loopback"),
        ("TCP6", GW6, "an address of this host"),
    ],
)
def test_forged_local_source_is_refused(
    lo_net: Net, run_mmproxy: StartMmproxy, family: str, source: str, why: str
) -> None:
    app4, app6 = start_backend(lo_net.gw, "127.0.0.1"), start_backend(lo_net.gw, "::1")
    proc = run_mmproxy(lo_net, ipv4=app4.address, ipv6=app6.address)
    with connect(lo_net) as sock:
        sock.sendall(header(2, family, (source, 40006)))
        assert recv_all(sock) == b""
    proc.wait_for(f"which is {why}")
    assert app4.seen == [] and app6.seen == []


def test_local_source_allowed_when_configured(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address, allow_local_sources=True)
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", ("127.0.0.9", 40007)))
        assert read_line(sock) == "127.0.0.9 40007\n"


@pytest.mark.parametrize(
    "health_check",
    [
        encode_v2("LOCAL", "UNSPEC", None, None),
        encode_v1("UNKNOWN", None, None),
    ],
    ids=["v2-LOCAL", "v1-UNKNOWN"],
)
def test_health_checks_reach_the_target_as_the_balancer(
    net: Net, run_mmproxy: StartMmproxy, health_check: bytes
) -> None:
    """A remote balancer's LOCAL / UNKNOWN: the application sees the balancer's own address
    (the spec's real endpoints), never this host's, so no allowed balancer gets local
    identity (security issue 11)."""
    app = start_backend(net.gw, targets(net)[0])
    run_mmproxy(
        net,
        ipv4=app.address,
        listen=[f"{GW4}:2222"],
        allowed_networks=[f"{PEER4}/32"],
    )
    with net.peer.connect((GW4, 2222)) as sock:
        port = sock.getsockname()[1]
        sock.sendall(health_check)
        assert read_line(sock) == f"{PEER4} {port}\n"


@pytest.mark.parametrize(
    "health_check",
    [encode_v2("LOCAL", "UNSPEC", None, None), encode_v1("UNKNOWN", None, None)],
    ids=["v2-LOCAL", "v1-UNKNOWN"],
)
def test_health_checks_from_this_host_are_plain(
    lo_net: Net, run_mmproxy: StartMmproxy, health_check: bytes
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.sendall(health_check)
        host, _ = read_line(sock).split()
    assert host == "127.0.0.1"


def test_one_mib_each_way_arrives_byte_exact(net: Net, run_mmproxy: StartMmproxy) -> None:
    upload, download = os.urandom(1 << 20), os.urandom(1 << 20)

    def send_download(conn: socket.socket) -> None:
        try:
            conn.sendall(download)
        except OSError:
            pass  # the self-check's connections hang up at once

    def application(conn: socket.socket, seen: Seen) -> None:
        sender = threading.Thread(target=send_download, args=(conn,))
        sender.start()
        while data := conn.recv(65536):
            seen.received += data
        sender.join()

    app = start_backend(net.gw, targets(net)[0], application)
    run_mmproxy(net, ipv4=app.address)
    with connect(net) as sock:
        sock.sendall(header(2, "TCP4", (CLIENT4, 40008)))

        def send() -> None:
            sock.sendall(upload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = recv_all(sock)
        sender.join()
    assert hashlib.sha256(received).digest() == hashlib.sha256(download).digest()
    assert hashlib.sha256(app.seen[0].received).digest() == hashlib.sha256(upload).digest()


def test_client_half_close_is_passed_on(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    def application(conn: socket.socket, seen: Seen) -> None:
        while data := conn.recv(65536):  # until the client's half-close arrives
            seen.received += data
        conn.sendall(b"reply after your EOF: " + seen.received)

    app = start_backend(lo_net.gw, "127.0.0.1", application)
    run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", (CLIENT4, 40009)) + b"question")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"reply after your EOF: question"


def test_application_half_close_is_passed_on(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    def application(conn: socket.socket, seen: Seen) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        while data := conn.recv(65536):
            seen.received += data

    app = start_backend(lo_net.gw, "127.0.0.1", application)
    run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", (CLIENT4, 40010)))
        assert recv_all(sock) == b"banner"  # EOF from the application reached us
        sock.sendall(b"still talking")
        sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 5
    while app.seen[0].received != b"still talking" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.seen[0].received == b"still talking"


def test_target_down_closes_the_client_promptly(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    # nothing listens there; the self-check says so, and only warns
    proc = run_mmproxy(lo_net, ipv4="127.0.0.1:9", check_failure="warn")
    started = time.monotonic()
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", (CLIENT4, 40011)))
        assert recv_all(sock) == b""
    assert time.monotonic() - started < 2
    proc.wait_for(r"target 127\.0\.0\.1:9 refused the connection")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", "HTTP"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), "TLS"),
        (b"PROXY TCP4 203.0.113.7 198.51.100.1 040 2222\r\n", "leading zero"),
        (b"PROXY TCP5 203.0.113.7 198.51.100.1 40 2222\r\n", "TCP5"),
        (b"PROXY TCP4 " + b"1" * 200 + b"\r\n", "no CRLF within the first 107 bytes"),
        (bytes(range(256)), "not a PROXY protocol header"),
    ],
    ids=["http", "tls-client-hello", "leading-zero-port", "bad-protocol", "oversized", "garbage"],
)
def test_bad_header_is_closed_with_a_reason(
    lo_net: Net, run_mmproxy: StartMmproxy, data: bytes, reason: str
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.sendall(data)
        assert recv_all(sock) == b""
    line = proc.wait_for("invalid PROXY header")
    assert reason in line
    assert app.seen == []


def test_stalled_header_is_closed_at_the_timeout(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, header_timeout=3)
    with connect(lo_net) as sock:
        sock.sendall(b"PROXY TCP4 203.0.")
        started = time.monotonic()
        assert recv_all(sock) == b""
        waited = time.monotonic() - started
    assert 2.5 < waited < 6
    proc.wait_for("no complete PROXY header within 3 s")
    assert app.seen == []


def test_a_stalled_client_does_not_delay_others(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address)
    stalled = [connect(lo_net) for _ in range(20)]
    for sock in stalled:
        sock.sendall(b"PROXY TCP4 ")
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", (CLIENT4, 40012)))
        sock.settimeout(1.0)
        assert read_line(sock) == f"{CLIENT4} 40012\n"
    for sock in stalled:
        sock.close()


def test_connection_record_is_logged(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.sendall(header(1, "TCP4", (CLIENT4, 40013)) + b"12345")
        read_line(sock)
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)
    line = proc.wait_for(r"203\.0\.113\.7:40013 via 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+")
    assert "client closed first" in line
    assert "5 bytes in" in line


def test_client_port_in_use_falls_back_to_an_ephemeral_port(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address)
    first, second = connect(lo_net), connect(lo_net)
    with first, second:
        first.sendall(header(1, "TCP4", (CLIENT4, 40014)))
        assert read_line(first) == f"{CLIENT4} 40014\n"
        second.sendall(header(1, "TCP4", (CLIENT4, 40014)))  # same client address and port
        host, port = read_line(second).split()
    assert host == CLIENT4 and port != "40014"


# --- TCP urgent data (security issue 11, item 5) ----------------------------------------

SIOCATMARK = 0x8905  # <linux/sockios.h>: the next byte to read is the urgent one


def at_mark(sock: socket.socket) -> bool:
    (marked,) = struct.unpack("i", fcntl.ioctl(sock, SIOCATMARK, b"\0" * 4))
    return bool(marked)


def read_marked(sock: socket.socket, length: int) -> list[tuple[bytes, bool]]:
    """`length` bytes from an SO_OOBINLINE socket as (bytes, urgent) pieces: a read
    stops at the urgent mark, and SIOCATMARK says the byte there is the urgent one.
    Nothing at all when the peer closes at once (mmproxy's self-checks do)."""
    pieces: list[tuple[bytes, bool]] = []
    got = 0
    while got < length:
        readable, _, _ = select.select([sock], [], [], 10)
        assert readable, f"stalled after {got} of {length} bytes: {pieces}"
        urgent = at_mark(sock)
        data = sock.recv(1 if urgent else length - got)
        if not data and not got:
            return []
        assert data, f"EOF after {got} of {length} bytes"
        pieces.append((data, urgent))
        got += len(data)
    return merge(pieces)


def merge(pieces: list[tuple[bytes, bool]]) -> list[tuple[bytes, bool]]:
    """Adjacent plain pieces joined (how the stream was cut into reads is no matter)."""
    merged: list[tuple[bytes, bool]] = []
    for data, urgent in pieces:
        if merged and not urgent and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + data, False)
        else:
            merged.append((data, urgent))
    return merged


def send_marked(sock: socket.socket, pieces: list[tuple[bytes, bool]]) -> None:
    for data, urgent in pieces:
        if urgent:
            assert sock.send(data, socket.MSG_OOB) == 1
        else:
            sock.sendall(data)
        time.sleep(0.01)  # each urgent byte its own segment, and its own mark


URGENT_STREAM = [
    (b"login: ", False),
    (b"\xff", True),  # telnet's IAC, as an interrupt sends it
    (b"\xf2" + bytes(range(256)) * 100, False),
    (b"!", True),
    (b"after", False),
    (b"#", True),
    (b"end", False),
]


def urgent_echo(conn: socket.socket, seen: Seen) -> None:
    """Read the stream, noting which bytes came urgent, and send it back the same way."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    length = sum(len(data) for data, _ in URGENT_STREAM)
    pieces = read_marked(conn, length)
    if not pieces:
        return
    seen.received = repr(pieces).encode()
    send_marked(conn, pieces)


def test_urgent_data_passes_both_ways_in_order_and_urgent(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    """splice() stops at TCP's urgent mark: every byte after it used to be stuck (telnet's
    interrupt, FTP's ABOR). Every byte now arrives, in order, and urgent stays urgent."""
    app = start_backend(lo_net.gw, "127.0.0.1", urgent_echo)
    run_mmproxy(lo_net, ipv4=app.address)
    with connect(lo_net) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        sock.sendall(header(2, "TCP4", (CLIENT4, 40011)))
        time.sleep(0.01)
        send_marked(sock, URGENT_STREAM)
        back = read_marked(sock, sum(len(data) for data, _ in URGENT_STREAM))
    assert app.seen[0].received == repr(URGENT_STREAM).encode()  # client -> application
    assert back == URGENT_STREAM  # and application -> client


@pytest.mark.parametrize("mode", ["all", "rejected"])
def test_log_connections_in_the_daemon(lo_net: Net, run_mmproxy: StartMmproxy, mode: str) -> None:
    """A flood of short connections must not flood the journal: with `rejected`, only
    the rejections leave a line (security issue 11, item 11)."""
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, log_connections=mode, workers=1)
    for port in range(40030, 40040):
        with connect(lo_net) as sock:
            sock.sendall(header(1, "TCP4", (CLIENT4, port)))
            assert read_line(sock) == f"{CLIENT4} {port}\n"
    with connect(lo_net) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert recv_all(sock) == b""
    proc.wait_for("rejected 127.0.0.1:.*invalid PROXY header")
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for("stopping: .*10 total|stopping: .*11 total")
    assert proc.proc.wait(10) == 0  # and every line is written before the exit
    records = [line for line in proc.lines if f"{CLIENT4}:400" in line and "bytes in" in line]
    assert len(records) == (10 if mode == "all" else 0), "\n".join(proc.lines)


def test_repeat_clients_take_the_c_hand_shake_with_the_same_result(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    """The first connection fills what the C hand-shake may repeat (balancer let through,
    claim let through); the later ones of the same client go through it: the application
    sees the same, and each record says the same as the first one's."""
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, workers=1)
    for port in (40021, 40022, 40023):
        for version in (1, 2):
            with connect(lo_net) as sock:
                sock.sendall(header(version, "TCP4", (CLIENT4, port + 100 * version)) + b"12345")
                assert read_line(sock) == f"{CLIENT4} {port + 100 * version}\n"
                sock.shutdown(socket.SHUT_WR)
                recv_all(sock)
            line = proc.wait_for(rf"{CLIENT4}:{port + 100 * version} via 127\.0\.0\.1:\d+ -> ")
            assert "client closed first" in line and "5 bytes in" in line, line
    proc.proc.send_signal(signal.SIGTERM)
    line = proc.wait_for("stopping: ")
    assert "0 active, 6 total, rejected: none, 30 bytes in" in line, line

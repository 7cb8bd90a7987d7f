"""Interop with real third-party senders (issue 13): HAProxy (v2 with CRC32C and unique-id,
and its health checks), nginx's stream module (v1), curl --haproxy-protocol (v1, IPv4 and
IPv6) and an AWS-NLB-style health check, each in front of mmproxy, with a real nginx as the
application logging the peer address it saw.

Three namespaces: the client's, the balancer's and the gateway's (mmproxy and the
application), so that the balancer is never on mmproxy's host:

    client 192.0.2.7 --- 192.0.2.1 balancer 198.51.100.7 --- 198.51.100.1 mmproxy -> nginx
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmproxy.netns import NetNS, link
from mmproxy.proxy_protocol import (
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V2_SIGNATURE,
    crc32c,
    encode_v1,
    encode_v2,
)
from tests.support import Backend, tell_peer

from .conftest import CLIENT4, CLIENT6, GW4, GW6, PEER4, PEER6, Mmproxy, Net, StartMmproxy

CLIENT_NET4 = "192.0.2.7", "192.0.2.1"  # the client, the balancer's address facing it
APP_PORT = 8080
LOG_FORMAT = '$remote_addr $remote_port "$request" $status'


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed (make deps installs it)")
    return path


def wait_connect(ns: NetNS, address: tuple[str, int], proc: subprocess.Popen[bytes]) -> None:
    """Until something listens there (the sender or the application has started)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            ns.connect(address, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


@dataclass
class Nginx:
    """A real nginx (master_process off: one process, no user switch) in a namespace."""

    proc: subprocess.Popen[bytes]
    access_log: Path

    def lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def wait_line(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if needle in line:
                    print(f"application logged: {line}")  # shown with -s
                    return line
            time.sleep(0.05)
        raise AssertionError(f"nginx logged no line with {needle!r}: {self.lines()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_nginx(ns: NetNS, folder: Path, body: str) -> Nginx:
    folder.mkdir()
    log = folder / "access.log"
    config = folder / "nginx.conf"
    config.write_text(
        f"load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log info;\nevents {{ worker_connections 64; }}\n" + body
    )
    nginx = _tool("nginx")
    proc = subprocess.Popen(
        ns.exec_args(nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(config)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return Nginx(proc, log)


def app_config(folder: Path) -> str:
    """The application: HTTP on 127.0.0.1 and ::1, logging the peer it saw."""
    temp = " ".join(
        f"{kind}_temp_path {folder}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
http {{
    log_format peer '{LOG_FORMAT}';
    access_log {folder}/access.log peer;
    {temp}
    server {{
        listen 127.0.0.1:{APP_PORT};
        listen [::1]:{APP_PORT};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass
class Bed:
    net: Net
    client: NetNS
    app: Nginx
    mmproxy: Mmproxy


@pytest.fixture
def bed(lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path) -> Iterator[Bed]:
    client = NetNS("mmp-client")
    link(client, lo_net.peer, [f"{CLIENT_NET4[0]}/24"], [f"{CLIENT_NET4[1]}/24"])
    app = start_nginx(lo_net.gw, tmp_path / "app", app_config(tmp_path / "app"))
    try:
        wait_connect(lo_net.gw, ("127.0.0.1", APP_PORT), app.proc)
        proxy = run_mmproxy(
            lo_net,
            listen=[f"{GW4}:2222", f"[{GW6}]:2222"],
            allowed_networks=["198.51.100.0/24", "2001:db8:1::/64"],
            ipv4=f"127.0.0.1:{APP_PORT}",
            ipv6=f"[::1]:{APP_PORT}",
        )
        yield Bed(lo_net, client, app, proxy)
    finally:
        app.stop()
        client.delete()


def http_get(ns: NetNS, address: tuple[str, int], path: str, header: bytes = b"") -> bytes:
    with ns.connect(address, timeout=10) as sock:
        sock.sendall(header + f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def peer_of(line: str) -> str:
    return line.split()[0]


# --- HAProxy -------------------------------------------------------------------------------

HAPROXY_CONFIG = """\
global
    maxconn 256
    stats socket {folder}/stats.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend public
    bind {bind}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    default_backend gateway
backend gateway
    option httpchk GET /haproxy-health
    server mmproxy {gateway}:2222 {server_options}
"""
SERVER_OPTIONS = " ".join(
    [
        "send-proxy-v2 proxy-v2-options crc32c,unique-id",
        "check check-send-proxy inter 200ms fall 2 rise 2",
    ]
)


def haproxy_server_state(stats: Path) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        text = b""
        while data := sock.recv(65536):
            text += data
    rows = csv.DictReader(io.StringIO(text.decode().lstrip("# ")))
    for row in rows:
        if row["pxname"] == "gateway" and row["svname"] == "mmproxy":
            return row
    raise AssertionError(f"no gateway/mmproxy row in HAProxy's stats: {text!r}")


def test_haproxy_send_proxy_v2_crc32c_unique_id_and_health_check(bed: Bed, tmp_path: Path) -> None:
    folder = tmp_path / "haproxy"
    folder.mkdir()
    config = folder / "haproxy.cfg"
    bind = f"{CLIENT_NET4[1]}:8080"
    config.write_text(
        HAPROXY_CONFIG.format(folder=folder, bind=bind, gateway=GW4, server_options=SERVER_OPTIONS)
    )
    proc = subprocess.Popen(
        bed.net.peer.exec_args(_tool("haproxy"), "-f", str(config), "-db"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_connect(bed.client, (CLIENT_NET4[1], 8080), proc)
        # A client's request through HAProxy: the application sees the client.
        reply = http_get(bed.client, (CLIENT_NET4[1], 8080), "/via-haproxy")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert peer_of(bed.app.wait_line("/via-haproxy")) == CLIENT_NET4[0]
        # HAProxy's own checks (LOCAL through mmproxy) pass: the server is UP with L7OK.
        deadline = time.monotonic() + 15
        state = haproxy_server_state(folder / "stats.sock")
        while state["check_status"] != "L7OK" and time.monotonic() < deadline:
            time.sleep(0.1)
            state = haproxy_server_state(folder / "stats.sock")
        assert (state["status"], state["check_status"]) == ("UP", "L7OK"), state
        assert state["check_code"] == "200"
        health = bed.app.wait_line("/haproxy-health")
        # A LOCAL check from a balancer on another host is connected from the balancer's
        # own address, never from this host (issue 11, item 1).
        assert peer_of(health) == PEER4, health
    finally:
        proc.terminate()
        proc.wait(10)


# --- nginx stream module (v1) --------------------------------------------------------------


def test_nginx_stream_proxy_protocol_v1(bed: Bed, tmp_path: Path) -> None:
    folder = tmp_path / "sender"
    body = f"""
stream {{
    server {{
        listen {CLIENT_NET4[1]}:9090;
        proxy_pass {GW4}:2222;
        proxy_protocol on;
    }}
}}
"""
    sender = start_nginx(bed.net.peer, folder, body)
    try:
        wait_connect(bed.client, (CLIENT_NET4[1], 9090), sender.proc)
        reply = http_get(bed.client, (CLIENT_NET4[1], 9090), "/via-nginx-stream")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert peer_of(bed.app.wait_line("/via-nginx-stream")) == CLIENT_NET4[0]
    finally:
        sender.stop()


# --- curl --haproxy-protocol (v1) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "client"),
    [(f"http://{GW4}:2222/via-curl4", PEER4), (f"http://[{GW6}]:2222/via-curl6", PEER6)],
    ids=["IPv4", "IPv6"],
)
def test_curl_haproxy_protocol(bed: Bed, url: str, client: str) -> None:
    # curl speaks the v1 line for its own connection: the client is curl's address.
    proc = subprocess.run(
        bed.net.peer.exec_args(_tool("curl"), "-sS", "-g", "--haproxy-protocol", url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
    assert peer_of(bed.app.wait_line(url.rsplit("/", 1)[1])) == client


def test_curl_sends_v1(tmp_path: Path) -> None:
    # What curl writes first, read on a plain socket: a v1 TCP4 / TCP6 line.
    with NetNS("mmp-curl") as ns:
        for host in ("127.0.0.1", "::1"):
            listener = ns.listen((host, 0))
            port = listener.getsockname()[1]
            url = f"http://{host}:{port}/" if ":" not in host else f"http://[{host}]:{port}/"
            curl = subprocess.Popen(
                ns.exec_args(_tool("curl"), "-s", "-g", "-m", "5", "--haproxy-protocol", url),
                stdout=subprocess.DEVNULL,
            )
            conn, _ = listener.accept()
            with conn, listener:
                line = conn.makefile("rb").readline()
            curl.wait(10)
            family = "TCP6" if ":" in host else "TCP4"
            assert line.startswith(f"PROXY {family} {host} {host} ".encode()), line
            print(f"curl sent: {line!r}")  # shown with -s


# --- an AWS-NLB-style health check ---------------------------------------------------------


def nlb_health_check_header() -> bytes:
    """LOCAL, family TCP4 with no address block, a CRC32C TLV and NOOP padding: the
    shape the issue reports (old mmproxy refused it, so the target was marked down)."""
    tlvs = bytes((PP2_TYPE_CRC32C, 0, 4)) + bytes(4) + bytes((PP2_TYPE_NOOP, 0, 1, 0))
    header = bytearray(V2_SIGNATURE + bytes((0x20, 0x11)) + len(tlvs).to_bytes(2, "big") + tlvs)
    header[19:23] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


def test_aws_nlb_style_health_check(bed: Bed) -> None:
    header = nlb_health_check_header()
    reply = http_get(bed.net.peer, (GW4, 2222), "/nlb-health", header)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    line = bed.app.wait_line("/nlb-health")
    # From the balancer's own address, as for HAProxy's check above.
    assert peer_of(line) == PEER4, line


# --- port ranges: a game server's span of ports through HAProxy ------------------------------

RANGE = range(27015, 27018)
RANGE_HAPROXY_CONFIG = """\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend game
    bind {bind}:{first}-{last}
    default_backend gateway
backend gateway
    # No port: each connection goes to the port the client connected to.
    server mmproxy {gateway} send-proxy-v2
"""


@pytest.mark.parametrize("follow", [True, False], ids=["follow_destination_port", "one-target"])
def test_listen_port_range_through_haproxy(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path, follow: bool
) -> None:
    client = NetNS("mmp-client")
    link(client, lo_net.peer, [f"{CLIENT_NET4[0]}/24"], [f"{CLIENT_NET4[1]}/24"])
    apps = {port: lo_net.gw.listen(("127.0.0.1", port)) for port in RANGE}
    backends = {port: Backend(sock, tell_peer) for port, sock in apps.items()}
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        RANGE_HAPROXY_CONFIG.format(
            bind=CLIENT_NET4[1], first=RANGE[0], last=RANGE[-1], gateway=GW4
        )
    )
    proc = subprocess.Popen(
        lo_net.peer.exec_args(_tool("haproxy"), "-f", str(config), "-db"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        run_mmproxy(
            lo_net,
            listen=[f"{GW4}:{RANGE[0]}-{RANGE[-1]}"],
            allowed_networks=["198.51.100.0/24"],
            ipv4=f"127.0.0.1:{RANGE[0]}",
            follow_destination_port=follow,
            **({"allowed_destination_ports": [f"{RANGE[0]}-{RANGE[-1]}"]} if follow else {}),
        )
        for backend in backends.values():
            backend.seen.clear()  # mmproxy's start-up self-checks
        for port in RANGE:
            wait_connect(client, (CLIENT_NET4[1], port), proc)
            with client.connect((CLIENT_NET4[1], port), timeout=10) as sock:
                line = sock.makefile("rb").readline().decode()
            assert line.split()[0] == CLIENT_NET4[0], line
        served = {port: len(b.seen) for port, b in backends.items()}
        if follow:
            # Each port of the range reaches the same port on the target.
            assert all(count >= 1 for count in served.values()), served
        else:
            assert served[RANGE[0]] >= len(RANGE) and served[RANGE[-1]] == 0, served
    finally:
        proc.terminate()
        proc.wait(10)
        for backend in backends.values():
            backend.close()
        client.delete()


def test_wider_span_redirected_to_one_listener(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    # The set-up the docs give past the 1,024-port cap: the firewall steers the whole
    # span to one listener; the header still names the port the client asked for.
    rules = (
        "add table inet mmprange\n"
        "add chain inet mmprange pre { type nat hook prerouting priority dstnat; }\n"
        f"add rule inet mmprange pre ip daddr {GW4} tcp dport 20000-40000 redirect to :2222\n"
    )
    subprocess.run(lo_net.gw.exec_args("nft", "-f", "-"), input=rules, text=True, check=True)
    port = 31337
    backend = Backend(lo_net.gw.listen(("127.0.0.1", port)), tell_peer)
    try:
        run_mmproxy(
            lo_net,
            listen=[f"{GW4}:2222"],
            allowed_networks=["198.51.100.0/24"],
            ipv4="127.0.0.1:22",
            follow_destination_port=True,
            allowed_destination_ports=["20000-40000"],
            check_failure="warn",  # nothing listens on the configured port 22
        )
        header = encode_v1("TCP4", (CLIENT4, 40000), (GW4, port))
        with lo_net.peer.connect((GW4, port), timeout=10) as sock:
            sock.sendall(header)
            line = sock.makefile("rb").readline().decode()
        assert line.split()[0] == CLIENT4, line
        assert len(backend.seen) == 1
    finally:
        backend.close()


def test_a_full_1024_port_range_serves_its_last_port(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    backend = Backend(lo_net.gw.listen(("127.0.0.1", 0)), tell_peer)
    try:
        proc = run_mmproxy(
            lo_net,
            listen=[f"{GW4}:10000-11023"],
            allowed_networks=["198.51.100.0/24"],
            ipv4=backend.address,
        )
        proc.wait_for(rf"listening on {GW4}:11023\b")
        assert sum("listening on" in line for line in proc.lines) == 1024
        backend.seen.clear()  # mmproxy's start-up self-checks
        for port in (10000, 11023):
            with lo_net.peer.connect((GW4, port), timeout=10) as sock:
                sock.sendall(encode_v1("TCP4", (CLIENT4, 40000), (GW4, port)))
                line = sock.makefile("rb").readline().decode()
            assert line.split()[0] == CLIENT4, line
        assert len(backend.seen) == 2
    finally:
        backend.close()


def test_udp_range_follows_the_destination_port(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    apps = []
    for port in (7000, 7001, 7002):
        sock = lo_net.gw.open_socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::1", port))
        apps.append(sock)
    try:
        run_mmproxy(
            lo_net,
            listen=[f"udp://[{GW6}]:7000-7002"],
            allowed_networks=["2001:db8:1::/64"],
            ipv6="[::1]:7000",
            follow_destination_port=True,
            allowed_destination_ports=["7000-7002"],
            check_failure="warn",  # the UDP self-check wants a reply from the application
        )
        lb = lo_net.peer.open_socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with lb:
            lb.sendto(
                encode_v2("PROXY", "UDP6", (CLIENT6, 40000), (GW6, 7002)) + b"ping",
                (GW6, 7002),
            )
            apps[2].settimeout(10)
            payload, peer = apps[2].recvfrom(100)
        assert (payload, peer[0]) == (b"ping", CLIENT6)
    finally:
        for sock in apps:
            sock.close()

"""UDP under a real systemd: a `udp://` listen address becomes ListenDatagram=, the first
datagram starts the service, and the flow's record reaches the journal."""

from __future__ import annotations

import json
import re
import socket
import time

from mmproxy.proxy_protocol import encode_v2

from .test_service import CLIENT4, GW4, PEER4, World, install_tree, world  # noqa: F401

UDP_BACKEND = """\
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, peer = sock.recvfrom(65535)
    sock.sendto(f"{peer[0]} {peer[1]} ".encode() + data, peer)
"""
UDP_BACKEND_UNIT = """\
[Unit]
Description=test UDP application on port %i
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/udp_backend.py %i
"""
INSTANCE = """\
listen: "udp://0.0.0.0:5300"
ipv4: "127.0.0.1:9053"
allowed_networks: ["198.51.100.0/24"]
udp_idle_timeout: 2s
"""


def test_udp_instance_is_socket_activated_and_logs_its_flows(world: World) -> None:  # noqa: F811
    box = world.box
    box.write("/usr/local/lib/udp_backend.py", UDP_BACKEND)
    box.write("/etc/systemd/system/udp-backend@.service", UDP_BACKEND_UNIT)
    box.systemctl("start", "udp-backend@9053.service")
    box.write("/etc/mmproxy/dns.yaml", INSTANCE)
    world.enable("dns")
    listens = box.sh("systemctl", "show", "-p", "Listen", "mmproxy@dns.socket").stdout
    assert "0.0.0.0:5300 (Datagram)" in listens, listens
    assert box.sh("systemctl", "is-active", "mmproxy@dns.service", check=False).stdout.strip() \
        == "inactive"  # fmt: skip

    lb = world.peer.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
    with lb:
        lb.settimeout(20)  # the first datagram waits in the socket while the service starts
        lb.connect((GW4, 5300))
        header = encode_v2("PROXY", "UDP4", (CLIENT4, 50001), (GW4, 5300))
        lb.send(header + b"first")
        assert lb.recv(65535) == f"{CLIENT4} 50001 first".encode()
        lb.send(header + b"second")
        assert lb.recv(65535) == f"{CLIENT4} 50001 second".encode()

    deadline = time.monotonic() + 10  # STATUS= is refreshed every 2 s
    while True:
        status = box.systemctl("status", "--no-pager", "mmproxy@dns.service").stdout
        if re.search(r"Status: \"udp: [01] flows, 1 total, dropped: none", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    records: list[dict[str, object]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not records:
        out = box.sh(
            "journalctl", "-u", "mmproxy@dns", "PROTOCOL=udp", f"CLIENT_ADDR={CLIENT4}",
            "-o", "json", "--no-pager", check=False,
        ).stdout  # fmt: skip
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        time.sleep(0.5)
    assert records, box.journal("mmproxy@dns")
    record = records[-1]
    assert record["CLIENT_PORT"] == "50001"
    assert record["LB_ADDR"] == PEER4
    assert record["PACKETS_IN"] == "2" and record["PACKETS_OUT"] == "2"
    assert record["BYTES_IN"] == str(len(b"firstsecond"))
    assert record["CLOSE_REASON"] == "idle"

"""`mmproxy doctor`: each diagnosis against the failure itself, set up in namespaces with a
real mmproxy (and a real HAProxy, a fake docker-proxy) and fed the traffic that shows it.
doctor reads mmproxy's stderr lines from a file (--log): namespaces have no journald."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mmproxy.netns import NetNS
from mmproxy.proxy_protocol import encode_v1
from tests.support import UdpEcho, prefixed

from .conftest import (
    CLIENT4,
    GW4,
    MARK,
    PEER4,
    TABLE,
    Mmproxy,
    Net,
    StartMmproxy,
    recv_all,
    start_backend,
)
from .test_haproxy import HAPROXY_CONFIG
from .test_privileges import Unprivileged, world_readable  # noqa: F401 (a fixture)
from .test_routing import bare  # noqa: F401 (a fixture)
from .test_udp import PORT, balancer, datagram


def doctor(
    net: Net, config: Path, log: Path | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    args = ["doctor", "-c", str(config), "--log", str(log or os.devnull), *extra]
    return subprocess.run(
        net.gw.exec_args(sys.executable, "-m", "mmproxy", *args),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def save_log(proc: Mmproxy, path: Path) -> Path:
    path.write_text("\n".join(proc.lines) + "\n")
    return path


def write_config(tmp_path: Path, net: Net, **keys: object) -> Path:
    config: dict[str, object] = {
        **net.config_keys(),
        "listen": ["127.0.0.1:2222"],
        "allowed_networks": ["127.0.0.0/8"],
        "connect_timeout": 1,
        "mark": MARK,
        "table": TABLE,
    }
    config.update(keys)
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def diagnoses(out: str) -> list[str]:
    return [line.split()[2].rstrip(":") for line in out.splitlines() if "DIAGNOSIS" in line]


def closed_at_once(sock: socket.socket) -> None:
    """mmproxy closes a refused connection before reading a byte."""
    with sock:
        assert recv_all(sock) == b""


# --- rejections ------------------------------------------------------------------------


def test_many_refused_peers_mean_clients_reach_the_port_directly(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(
        lo_net, listen=["0.0.0.0:2222"], ipv4=app.address,
        allowed_networks=["127.0.0.0/8", f"{PEER4}/32"],
    )  # fmt: skip
    assert lo_net.peer.veth is not None
    clients = [f"198.51.100.{n}" for n in range(20, 25)]
    for host in clients:
        lo_net.peer.ip("addr", "add", f"{host}/24", "dev", lo_net.peer.veth)
        closed_at_once(lo_net.peer.connect((GW4, 2222), source=host))
    for host in clients:
        proc.wait_for(rf"rejected {host}:\d+: peer is not in allowed_networks")
    out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    assert out.returncode == 1, out.stdout
    assert diagnoses(out.stdout) == ["direct-clients"], out.stdout
    assert "5 connections from 5 different addresses" in out.stdout
    assert "nft add rule inet filter input tcp dport { 2222 } ip saddr != " in out.stdout
    assert f"{PEER4}/32" in out.stdout


def test_one_refused_peer_is_named_as_a_balancer_to_allow(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, listen=["0.0.0.0:2222"], ipv4=app.address)
    closed_at_once(lo_net.peer.connect((GW4, 2222)))
    proc.wait_for(rf"rejected {PEER4}:\d+")
    out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    assert diagnoses(out.stdout) == ["unknown-balancer"], out.stdout
    assert f"- {PEER4}/32" in out.stdout


def test_a_balancer_without_send_proxy_is_told_to_send_the_header(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    """A real HAProxy whose `server` line lacks send-proxy, and a client speaking HTTP."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, header_timeout=3)
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(bind=f"{GW4}:8080", send_proxy=""))
    lb = subprocess.Popen(
        lo_net.gw.exec_args(haproxy, "-f", str(config), "-db"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        sock = connect_retrying(lo_net.peer, (GW4, 8080), lb)
        with sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            recv_all(sock)
        with connect_retrying(lo_net.peer, (GW4, 8080), lb):  # a client that waits (SSH)
            proc.wait_for(r"no complete PROXY header within 3 s")
    finally:
        lb.terminate()
        lb.wait(10)
    proc.wait_for(r"rejected 127\.0\.0\.1:\d+: invalid PROXY header: .*looks like HTTP")
    out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    assert diagnoses(out.stdout) == ["no-proxy-header"], out.stdout
    assert "2 connections from the allowed balancer(s) 127.0.0.1" in out.stdout
    assert "looks like HTTP" in out.stdout and "no complete PROXY header" in out.stdout
    assert "HAProxy `send-proxy-v2`" in out.stdout


def connect_retrying(
    ns: NetNS, address: tuple[str, int], proc: subprocess.Popen[bytes]
) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return ns.connect(address, timeout=5)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


def test_ipv4_balancer_on_a_dual_stack_listener_is_named_mapped(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    """[::]:2222 alone receives the IPv4 balancer as ::ffff:198.51.100.7; allowed_networks
    lists only the IPv6 network."""
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(
        lo_net, listen=["[::]:2222"], ipv4=app.address, allowed_networks=["2001:db8:1::/64"]
    )
    closed_at_once(lo_net.peer.connect((GW4, 2222)))
    proc.wait_for(rf"rejected {PEER4}:\d+")
    out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    assert diagnoses(out.stdout) == ["ipv4-mapped-balancer"], out.stdout
    assert "dual-stack listener [::]:2222" in out.stdout
    assert f"- {PEER4}/32" in out.stdout


# --- the host ----------------------------------------------------------------------------


def test_missing_routing_is_named_with_the_commands(bare: Net, tmp_path: Path) -> None:  # noqa: F811
    app = start_backend(bare.gw, "127.0.0.1")
    config = write_config(tmp_path, bare, routing="lo", ipv4=app.address)
    out = doctor(bare, config)
    assert out.returncode == 1
    assert diagnoses(out.stdout) == ["routing-missing"], out.stdout
    assert "ip -4 rule add from 127.0.0.1/8 iif lo table 100" in out.stdout
    assert f"mmproxy routing up --instance doctor -c {config}   (or by hand: " in out.stdout


def test_a_rule_with_a_lower_priority_shadows_mmproxys(lo_net: Net, tmp_path: Path) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    config = write_config(tmp_path, lo_net, ipv4=app.address)
    lo_net.gw.ip("route", "add", "default", "via", PEER4)  # as a host has
    lo_net.gw.ip("rule", "add", "from", "127.0.0.1/8", "lookup", "main", "pref", "100")
    out = doctor(lo_net, config)
    assert diagnoses(out.stdout) == ["routing-shadowed"], out.stdout
    assert "rule `pref 100 from 127.0.0.1/8 lookup main` comes before mmproxy's" in out.stdout
    assert "FAILED    target 127.0.0.1" in out.stdout  # the spoofed connection fails
    # The fix it prints works.
    fix = "ip -4 rule add from 127.0.0.1/8 iif lo lookup 100 pref 99"
    assert f"`{fix}` then `ip -4 rule del pref 32765`" in out.stdout
    lo_net.gw.ip(*fix.split()[1:])
    lo_net.gw.ip("-4", "rule", "del", "pref", "32765")
    after = doctor(lo_net, config)
    assert after.returncode == 0, after.stdout
    assert "answers a spoofed connection from 192.0.2.1" in after.stdout


def test_route_localnet_off_blocks_the_fwmark_variant(mark_net: Net, tmp_path: Path) -> None:
    app = start_backend(mark_net.gw, "127.0.0.1")
    config = write_config(tmp_path, mark_net, ipv4=app.address)
    veth = mark_net.gw.veth
    mark_net.gw.sysctl(f"net.ipv4.conf.{veth}.route_localnet", "0")
    out = doctor(mark_net, config)
    assert diagnoses(out.stdout) == ["fwmark-route-localnet"], out.stdout
    assert "[!] FAILED    target 127.0.0.1:" in out.stdout  # the spoofed connection
    fix = f"sysctl -w net.ipv4.conf.{veth}.route_localnet=1"
    assert fix in out.stdout
    mark_net.gw.sh(*fix.split())
    after = doctor(mark_net, config)
    assert after.returncode == 0, after.stdout


def test_strict_rp_filter_is_not_blamed_and_does_not_block(mark_net: Net, tmp_path: Path) -> None:
    """Replies come back over lo with their route already chosen: reverse-path filtering
    never sees them, so doctor must not send the admin after it."""
    app = start_backend(mark_net.gw, "127.0.0.1")
    config = write_config(tmp_path, mark_net, ipv4=app.address)
    for dev in ("all", "default", "lo", mark_net.gw.veth):
        mark_net.gw.sysctl(f"net.ipv4.conf.{dev}.rp_filter", "1")
    out = doctor(mark_net, config)
    assert out.returncode == 0, out.stdout
    assert "[+] VERIFIED  target 127.0.0.1" in out.stdout


def test_a_target_behind_docker_proxy_is_named(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    """A stand-in docker-proxy (named so, as Docker's is) in front of the application
    relays from its own address: the application never sees the client."""
    app = start_backend(lo_net.gw, "127.0.0.1")
    fake = tmp_path / "docker-proxy"
    fake.symlink_to(sys.executable)
    relay = textwrap.dedent(f"""
        import socket, threading
        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        srv = socket.create_server(("127.0.0.1", 0))
        print(srv.getsockname()[1], flush=True)
        while True:
            c, _ = srv.accept()
            u = socket.create_connection(("127.0.0.1", {app.address.split(":")[1]}))
            threading.Thread(target=pipe, args=(c, u), daemon=True).start()
            threading.Thread(target=pipe, args=(u, c), daemon=True).start()
    """)
    docker = subprocess.Popen(
        lo_net.gw.exec_args(str(fake), "-c", relay), stdout=subprocess.PIPE, text=True
    )
    try:
        assert docker.stdout is not None
        port = int(docker.stdout.readline())
        proc = run_mmproxy(lo_net, ipv4=f"127.0.0.1:{port}")
        with lo_net.gw.connect(("127.0.0.1", 2222)) as sock:
            sock.sendall(encode_v1("TCP4", (CLIENT4, 40000), (GW4, 2222)))
            seen = sock.makefile("rb").readline().decode()
        assert not seen.startswith(CLIENT4)  # the failure: the client's address is lost
        out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    finally:
        docker.kill()
        docker.wait()
    assert diagnoses(out.stdout) == ["docker-proxy"], out.stdout
    assert f"target 127.0.0.1:{port} is served by docker-proxy (pid {docker.pid}" in out.stdout
    assert "--network host" in out.stdout


def test_a_udp_application_bound_to_every_address_loses_its_replies(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    sock = lo_net.gw.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    echo = UdpEcho(sock)
    try:
        port = sock.getsockname()[1]
        proc = run_mmproxy(
            lo_net, listen=[f"udp://0.0.0.0:{PORT}"], ipv4=f"127.0.0.1:{port}",
            allowed_networks=["198.51.100.0/24"],
        )  # fmt: skip
        with balancer(lo_net, timeout=1) as lb:
            lb.send(datagram((CLIENT4, 40004), b"ping"))
            with pytest.raises(TimeoutError):
                lb.recv(65535)  # the failure: the reply never comes back
        assert echo.peers  # the application did get the datagram
        out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    finally:
        sock.close()
    assert diagnoses(out.stdout) == ["udp-reply-source"], out.stdout
    assert f"the UDP application on port {port} (pid {os.getpid()} " in out.stdout
    assert "bind the application to 127.0.0.1:" in out.stdout


def test_a_udp_application_that_answers_from_the_address_asked_is_not_blamed(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    """Bound to 0.0.0.0 but asking for each datagram's destination (IP_PKTINFO), as
    dnsmasq and unbound do: its replies come back, and doctor sees the option set."""
    sock = lo_net.gw.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    UdpEcho(sock, prefixed(b"re: "), pktinfo=True)
    try:
        port = sock.getsockname()[1]
        proc = run_mmproxy(
            lo_net, listen=[f"udp://0.0.0.0:{PORT}"], ipv4=f"127.0.0.1:{port}",
            allowed_networks=["198.51.100.0/24"],
        )  # fmt: skip
        with balancer(lo_net) as lb:
            lb.send(datagram((CLIENT4, 40004), b"ping"))
            assert lb.recv(65535) == b"re: ping"
        out = doctor(lo_net, proc.config_path, save_log(proc, tmp_path / "log"))
    finally:
        sock.close()
    assert out.returncode == 0, out.stdout
    assert diagnoses(out.stdout) == []


def test_a_daemon_without_cap_net_admin_is_named(
    lo_net: Net,
    world_readable: Path,  # noqa: F811
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    config = world_readable / "caps.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "routing": "lo", "listen": "127.0.0.1:2222", "ipv4": app.address,
                "allowed_networks": ["127.0.0.0/8"], "check_failure": "warn",
            }
        )
    )  # fmt: skip
    config.chmod(0o644)
    proc = Unprivileged(lo_net, config, [])
    try:
        proc.wait_for("listening on")
        with lo_net.gw.connect(("127.0.0.1", 2222)) as sock:
            sock.sendall(encode_v1("TCP4", (CLIENT4, 40000), (GW4, 2222)))
            assert recv_all(sock) == b""
        proc.wait_for("rejected client .* the process needs CAP_NET_ADMIN")
        log = world_readable / "log"
        log.write_text("\n".join(proc.lines) + "\n")
        out = doctor(lo_net, config, log)
    finally:
        proc.stop()
    assert diagnoses(out.stdout) == ["capabilities"], out.stdout
    assert f"the running mmproxy (pid {proc.proc.pid}) lacks CAP_NET_ADMIN" in out.stdout, (
        out.stdout
    )
    assert "1 connection failed with 'the process needs CAP_NET_ADMIN'" in out.stdout
    assert "AmbientCapabilities=CAP_NET_ADMIN" in out.stdout

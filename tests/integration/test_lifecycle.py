"""The daemon's lifecycle without systemd: refusing to start, reload, drain on stop."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from mmproxy.proxy_protocol import encode_v1

from .conftest import CLIENT4, Mmproxy, Net, StartMmproxy, recv_all, start_backend


def hello(net: Net, port: int = 40100) -> socket.socket:
    sock = net.gw.connect(("127.0.0.1", 2222))
    sock.sendall(encode_v1("TCP4", (CLIENT4, port), ("198.51.100.1", 2222)))
    return sock


def test_a_failed_self_check_refuses_to_start_and_prints_the_fix(
    lo_net: Net, tmp_path: Path
) -> None:
    lo_net.gw.sh("ip", "-4", "rule", "del", "from", "127.0.0.1/8", "iif", "lo", "table", "100")
    app = start_backend(lo_net.gw, "127.0.0.1")
    path = tmp_path / "ssh.yaml"
    path.write_text(
        yaml.safe_dump(
            {"listen": "127.0.0.1:2222", "ipv4": app.address, "allowed_networks": "127.0.0.0/8"}
        )
    )
    proc = Mmproxy(lo_net.gw, path)
    assert proc.proc.wait(30) == 1
    proc.wait_for(r"FAILED    ip -4 rule add from 127\.0\.0\.1/8 iif lo table 100")
    proc.wait_for(r"fix: ip -4 rule add from 127\.0\.0\.1/8 iif lo table 100")
    proc.wait_for("self-checks failed; not starting")
    assert not any("listening on" in line for line in proc.lines)


def test_sighup_reloads_and_a_bad_reload_keeps_the_running_config(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, allowed_networks=["192.0.2.0/24"])
    with hello(lo_net) as sock:
        assert recv_all(sock) == b""  # 127.0.0.1 is not an allowed balancer yet
    config_path = proc.config_path
    config = yaml.safe_load(config_path.read_text())
    config["allowed_networks"] = ["127.0.0.0/8"]
    config_path.write_text(yaml.safe_dump(config))
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for("configuration reloaded")
    with hello(lo_net, 40101) as sock:
        assert sock.makefile("rb").readline() == f"{CLIENT4} 40101\n".encode()

    config_path.write_text(config_path.read_text() + "mark: lots\n")
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for(r"reload failed, keeping the running configuration: .*mark")
    with hello(lo_net, 40102) as sock:
        assert sock.makefile("rb").readline() == f"{CLIENT4} 40102\n".encode()


def test_sigterm_lets_open_connections_finish(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, drain_timeout=20)
    sock = hello(lo_net)
    reader = sock.makefile("rb")
    assert reader.readline() == f"{CLIENT4} 40100\n".encode()
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for("stopping")
    time.sleep(0.3)
    sock.sendall(b"still here")  # the connection keeps working during the drain
    assert reader.read(10) == b"still here"
    sock.shutdown(socket.SHUT_WR)
    assert reader.read() == b""
    sock.close()
    assert proc.proc.wait(10) == 0  # it ended as soon as the connection did, not at 20 s


def test_sigterm_closes_what_is_left_after_the_drain_time(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address, drain_timeout=1)
    with hello(lo_net) as sock:
        sock.makefile("rb").readline()
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert recv_all(sock) == b""
        assert time.monotonic() - started < 5
    assert proc.proc.wait(10) == 0
    proc.wait_for("closing 1 connections still open after the 1 s drain time")
    proc.wait_for("mmproxy is stopping")


def test_every_kind_of_bad_reload_keeps_the_running_config(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    """One running instance, reloaded with one broken file after another: each reload is
    refused naming the file, line and key, and the running configuration goes on."""
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address)
    config_path = proc.config_path
    good = config_path.read_text()
    lines = len(good.splitlines())
    broken = {
        "unknown key": ("colour: blue\n", rf"{lines + 1}: colour: unknown key"),
        "wrong type": ("max_connections: many\n", rf"{lines + 1}: max_connections: "),
        "out of range": ("drain_timeout: 2h\n", rf"{lines + 1}: drain_timeout: .*too long"),
        "bad CIDR": ("", r":\d+: allowed_networks: 10\.0\.0\.1/8 has host bits set"),
        "missing networks file": (
            "allowed_networks_file: /nonexistent/nets.txt\n",
            rf"{lines + 1}: allowed_networks_file: .*No such file",
        ),
        "YAML syntax": ("mark: [1\n", rf":{lines + 2}:"),
    }
    for port, (what, (extra, message)) in enumerate(broken.items(), start=40200):
        if what == "bad CIDR":  # replaces the key rather than adding it twice
            config = yaml.safe_load(good)
            config["allowed_networks"] = ["10.0.0.1/8"]
            text = yaml.safe_dump(config)
        else:
            text = good + extra
        config_path.write_text(text)
        proc.proc.send_signal(signal.SIGHUP)
        line = proc.wait_for(rf"reload failed, keeping the running configuration: .*{message}")
        assert str(config_path) in line, (what, line)
        print(f"\n{what}: {line}")
        proc.lines.clear()  # the next wait_for sees only the next reload
        with hello(lo_net, port) as sock:  # still served with the old configuration
            assert sock.makefile("rb").readline() == f"{CLIENT4} {port}\n".encode(), what
    assert proc.proc.poll() is None


def test_beyond_max_connections_new_clients_wait_and_the_accepted_are_unhurt(
    lo_net: Net, run_mmproxy: StartMmproxy
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address, max_connections=3)
    held = [hello(lo_net, 40500 + i) for i in range(3)]
    for i, sock in enumerate(held):
        assert sock.makefile("rb").readline() == f"{CLIENT4} {40500 + i}\n".encode()
    waiting = hello(lo_net, 40510)  # connected by the kernel, left in the backlog
    waiting.settimeout(1.5)
    with pytest.raises(TimeoutError):
        waiting.recv(1)
    for sock in held:  # the accepted ones go on undisturbed
        sock.sendall(b"still fine")
        assert recv_exactly(sock, 10) == b"still fine"
    held.pop().close()  # one ends: the waiting client is served
    waiting.settimeout(10)
    assert waiting.makefile("rb").readline() == f"{CLIENT4} 40510\n".encode()
    for sock in [*held, waiting]:
        sock.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, data
        data += chunk
    return data

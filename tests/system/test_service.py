"""mmproxy under a real systemd: socket activation from the YAML alone, readiness,
status, journal fields, self-check failure, reload and restart under load, hardening.

The project is installed into a clean Debian 12 container with `make install`; a client
in a second network namespace reaches the container over a veth."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmproxy.netns import NetNS, link
from mmproxy.proxy_protocol import encode_v1, encode_v2

from .harness import Container

REPO = Path(__file__).resolve().parents[2]
GW4, PEER4 = "198.51.100.1", "198.51.100.7"
CLIENT4 = "203.0.113.7"

# The application: tells each peer the address it sees, then echoes.
BACKEND = """\
import socket, sys, threading
def serve(conn, peer):
    with conn:
        conn.sendall(f"{peer[0]} {peer[1]}\\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""
BACKEND_UNIT = """\
[Unit]
Description=test application on port %i
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/backend.py %i
[Install]
WantedBy=multi-user.target
"""


def instance_yaml(port: int, target: int, **extra: object) -> str:
    lines = [
        f'listen: "0.0.0.0:{port}"',
        f'ipv4: "127.0.0.1:{target}"',
        'allowed_networks: ["198.51.100.0/24"]',
        "drain_timeout: 5s",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class World:
    box: Container
    gw: NetNS
    peer: NetNS

    def ask(self, port: int = 2222, client_port: int = 40000, timeout: float = 10) -> str:
        """One client through the balancer's path: header, then the application's line."""
        header = encode_v2("PROXY", "TCP4", (CLIENT4, client_port), (GW4, port))
        with self.peer.connect((GW4, port), timeout=timeout) as sock:
            sock.sendall(header)
            return sock.makefile("rb").readline().decode().strip()

    def enable(self, instance: str) -> None:
        self.box.systemctl("enable", "--now", f"mmproxy@{instance}.socket")


@pytest.fixture(scope="module")
def install_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("install")
    subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={dest}"], check=True)
    return dest


@pytest.fixture
def world(container: Container, install_tree: Path) -> Iterator[World]:
    container.copy_in(install_tree, "/")
    container.write("/usr/local/lib/backend.py", BACKEND)
    container.write("/etc/systemd/system/backend@.service", BACKEND_UNIT)
    gw, peer = NetNS("mmp-sys-gw"), NetNS("mmp-sys-peer")
    link(gw, peer, [f"{GW4}/24"], [f"{PEER4}/24"])
    try:
        container.boot(netns=gw)
        container.systemctl("enable", "--now", "backend@9000.service")
        yield World(container, gw, peer)
    finally:
        container.cleanup()
        gw.delete()
        peer.delete()


def test_socket_activation_from_the_yaml_alone(world: World) -> None:
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.enable("ssh")
    assert world.box.sh("systemctl", "is-active", "mmproxy@ssh.service", check=False).stdout \
        .strip() == "inactive"  # fmt: skip
    assert world.ask(client_port=40001) == f"{CLIENT4} 40001"
    assert world.box.sh("systemctl", "is-active", "mmproxy@ssh.service").stdout.strip() == "active"
    status = world.box.systemctl("status", "--no-pager", "mmproxy@ssh.service").stdout
    print(status)  # shown with `pytest -s`: what an admin sees
    assert re.search(r"Status: \"\d+ active, \d+ total", status), status
    # The routing was applied by the unit, in the container's network namespace.
    assert "iif lo lookup 100" in world.box.sh("ip", "-4", "rule", "show").stdout


def test_journal_records_carry_structured_fields(world: World) -> None:
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.enable("ssh")
    world.ask(client_port=40002)
    deadline = time.monotonic() + 10
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline and not records:
        out = world.box.sh(
            "journalctl", "-u", "mmproxy@ssh", f"CLIENT_ADDR={CLIENT4}", "-o", "json",
            "--no-pager", check=False,
        ).stdout  # fmt: skip
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        time.sleep(0.2)
    assert records, world.box.journal("mmproxy@ssh")
    record = records[-1]
    assert record["CLIENT_PORT"] == "40002"
    assert record["LB_ADDR"] == PEER4
    assert record["TARGET_ADDR"] == "127.0.0.1:9000"
    assert record["SYSLOG_IDENTIFIER"] == "mmproxy"
    for key in ("BYTES_IN", "BYTES_OUT", "DURATION", "CLOSE_REASON"):
        assert key in record


def test_a_failed_self_check_fails_the_instance_with_the_fix(world: World) -> None:
    world.box.write("/etc/mmproxy/down.yaml", instance_yaml(2224, 9999))  # nothing there
    world.enable("down")
    with pytest.raises(OSError):
        world.ask(port=2224, timeout=3)  # accepted by systemd, closed when the start fails
    deadline = time.monotonic() + 20
    state = ""
    while time.monotonic() < deadline:
        state = world.box.sh("systemctl", "is-failed", "mmproxy@down.service", check=False)\
            .stdout.strip()  # fmt: skip
        if state == "failed":
            break
        time.sleep(0.2)
    journal = world.box.journal("mmproxy@down")
    assert "FAILED    target 127.0.0.1:9999 answers a plain connection" in journal, journal
    assert "fix: start the application on 127.0.0.1:9999" in journal


def test_a_wrong_host_fails_the_socket_with_the_fix(world: World) -> None:
    """The routing is applied, and the host checks run, as root when the socket starts
    (issue 15: the first connection then waits for the daemon alone). A host it cannot
    be applied on fails that start: nothing listens, and `systemctl status` says why."""
    world.box.sh("ip", "route", "add", "192.0.2.0/24", "dev", "lo", "table", "100")
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    enabled = world.box.systemctl("enable", "--now", "mmproxy@ssh.socket", check=False)
    assert enabled.returncode != 0
    status = world.box.systemctl("status", "mmproxy@ssh.socket", check=False).stdout
    print(status)  # shown with `pytest -s`: what an admin sees
    assert "failed" in status
    assert "routing table 100 already holds IPv4 routes that mmproxy did not add" in status
    assert "share_table: true" in status
    with pytest.raises(OSError):
        world.ask(timeout=3)
    assert "iif lo lookup 100" not in world.box.sh("ip", "-4", "rule", "show").stdout


@dataclass
class Load:
    """Clients in a loop until stopped; counts the ones that failed."""

    world: World
    port: int = 2222
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(4)]
        for t in self._threads:
            t.start()
        return self

    def _loop(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            port = 41000 + n * 5000 + i % 5000
            try:
                line = self.world.ask(self.port, client_port=port, timeout=20)
                if line == f"{CLIENT4} {port}":
                    self.ok += 1
                else:
                    self.failed.append(f"wrong answer {line!r}")
            except OSError as exc:
                self.failed.append(repr(exc))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.mark.parametrize("action", ["reload", "restart"])
def test_reload_and_restart_under_load_lose_no_connection(world: World, action: str) -> None:
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.enable("ssh")
    world.ask()
    with Load(world) as load:
        time.sleep(1)
        before = load.ok
        for _ in range(3):
            world.box.systemctl(action, "mmproxy@ssh.service")
            time.sleep(1)
    assert load.failed == []
    assert load.ok > before > 0
    print(f"\n{action} x3 under load: {load.ok} connections, {len(load.failed)} failed")


@dataclass
class Transfer:
    """One long, paced echo transfer through the gateway, checked by SHA-256."""

    world: World
    size: int = 4 * 1024 * 1024
    seconds: float = 3.0  # less than the instance's drain_timeout (5 s)
    sent: str = ""
    received: str = ""
    nbytes: int = 0
    error: str = ""
    ended_at: float = 0.0

    def run(self, started: threading.Event) -> None:
        data = random.Random(5).randbytes(self.size)
        header = encode_v2("PROXY", "TCP4", (CLIENT4, 40040), (GW4, 2222))
        try:
            with self.world.peer.connect((GW4, 2222), timeout=30) as sock:
                sock.sendall(header)
                reader = threading.Thread(target=self._read, args=(sock,))
                reader.start()
                chunk = 64 * 1024
                pause = self.seconds / (self.size // chunk)
                for offset in range(0, self.size, chunk):
                    sock.sendall(data[offset : offset + chunk])
                    if offset == chunk * 8:
                        started.set()  # well under way
                    time.sleep(pause)
                sock.shutdown(socket.SHUT_WR)
                reader.join()
        except OSError as exc:
            self.error = repr(exc)
        finally:
            started.set()
        self.sent = hashlib.sha256(data).hexdigest()

    def _read(self, sock: socket.socket) -> None:
        digest = hashlib.sha256()
        stream = sock.makefile("rb")
        try:
            if stream.readline().decode().strip() != f"{CLIENT4} 40040":
                self.error = "the application saw another client address"
            while chunk := stream.read1(65536):
                digest.update(chunk)
                self.nbytes += len(chunk)
        except OSError as exc:
            self.error = repr(exc)
        self.received = digest.hexdigest()
        self.ended_at = time.monotonic()


@pytest.mark.parametrize("action", ["stop", "restart", "reload"])
def test_in_flight_transfers_finish_within_the_drain_time(world: World, action: str) -> None:
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.enable("ssh")
    world.ask()
    transfer = Transfer(world)
    under_way = threading.Event()
    thread = threading.Thread(target=transfer.run, args=(under_way,))
    with Load(world) as load:
        thread.start()
        assert under_way.wait(30)
        asked = time.monotonic()
        world.box.systemctl(action, "mmproxy@ssh.service")  # returns once stopped/restarted
        done = time.monotonic()
        thread.join(60)
        time.sleep(1)  # new connections after the action (a stopped service is socket-
        # activated again by the next one)
    journal = world.box.journal("mmproxy@ssh")
    print(
        f"\n{action} during a {transfer.size >> 20} MiB transfer: systemctl took "
        f"{done - asked:.1f} s, the transfer ended {transfer.ended_at - asked:.1f} s after it "
        f"was asked; {load.ok} other connections meanwhile, {len(load.failed)} failed"
    )
    assert transfer.error == ""
    assert (transfer.nbytes, transfer.received) == (transfer.size, transfer.sent)
    assert load.failed == []
    assert load.ok > 0
    if action != "reload":
        # It waited for the transfer (drained), which ended well within the 5 s drain time.
        assert "waiting up to 5 s for open connections" in journal, journal
        assert "still open after the" not in journal, journal
        assert transfer.ended_at - asked < 5
        assert done >= transfer.ended_at - 0.5


def test_two_instances_side_by_side(world: World) -> None:
    world.box.systemctl("start", "backend@9001.service")
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.box.write("/etc/mmproxy/web.yaml", instance_yaml(2223, 9001))
    world.enable("ssh")
    world.enable("web")
    assert world.ask(2222, 40010) == f"{CLIENT4} 40010"
    assert world.ask(2223, 40011) == f"{CLIENT4} 40011"
    world.box.systemctl("stop", "mmproxy@web.service", "mmproxy@web.socket")
    # The rules the other instance shares stay in place.
    assert world.ask(2222, 40012) == f"{CLIENT4} 40012"


def test_follow_destination_port_serves_several_ports(world: World) -> None:
    world.box.systemctl("start", "backend@9001.service")
    world.box.write(
        "/etc/mmproxy/multi.yaml",
        'listen: ["0.0.0.0:2230", "0.0.0.0:2231"]\n'
        'ipv4: "127.0.0.1:9000"\n'
        'allowed_networks: ["198.51.100.0/24"]\n'
        "follow_destination_port: true\n"
        "allowed_destination_ports: [9000, 9001]\n",
    )
    world.enable("multi")
    for port, target in ((2230, 9000), (2231, 9001)):
        header = encode_v1("TCP4", (CLIENT4, 40020), (GW4, target))
        with world.peer.connect((GW4, port)) as sock:
            sock.sendall(header)
            assert sock.makefile("rb").readline().decode().strip() == f"{CLIENT4} 40020"
    # Records are written by mmproxy's logging thread: a moment after the connection.
    world.box.wait_journal("mmproxy@multi", "-> 127.0.0.1:9001")


def test_hardening_score_and_verify(world: World) -> None:
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.box.systemctl("daemon-reload")  # the generator writes the socket's addresses
    security = world.box.sh(
        "systemd-analyze", "security", "--no-pager", "mmproxy@ssh.service", check=False
    ).stdout
    match = re.search(r"Overall exposure level for mmproxy@ssh.service: ([\d.]+)", security)
    assert match, security
    assert float(match.group(1)) <= 1.6  # Debian 12; 1.5 without CAP_NET_BIND_SERVICE
    print(f"\nsystemd-analyze security: {match.group(1)}")
    verify = world.box.sh(
        "systemd-analyze",
        "verify",
        "--generators=yes",
        "mmproxy@ssh.service",
        "mmproxy@ssh.socket",
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


def test_watchdog_pings_while_idle_and_restarts_a_wedged_instance(world: World) -> None:
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000))
    world.box.write(
        "/etc/systemd/system/mmproxy@ssh.service.d/watchdog.conf", "[Service]\nWatchdogSec=2s\n"
    )
    world.enable("ssh")
    world.ask(client_port=40030)

    def main_pid() -> str:
        return world.box.sh(
            "systemctl", "show", "-P", "MainPID", "mmproxy@ssh.service"
        ).stdout.strip()

    pid = main_pid()
    time.sleep(5)  # idle for more than twice the watchdog interval
    assert main_pid() == pid, "restarted although it was only idle"
    world.box.sh("kill", "-STOP", pid)  # wedged: no more pings
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and main_pid() in (pid, "0"):
        time.sleep(0.2)
    assert main_pid() not in (pid, "0")
    assert "Watchdog timeout" in world.box.journal("mmproxy@ssh")
    assert world.ask(client_port=40031) == f"{CLIENT4} 40031"


def test_mmproxy_status_and_metrics_under_the_unit(world: World) -> None:
    """`mmproxy status ssh` reads the sandboxed service (DynamicUser, its RuntimeDirectory)
    as root, not as another user; /metrics answers from inside the sandbox too."""
    metrics = '"127.0.0.1:9877"'
    world.box.write("/etc/mmproxy/ssh.yaml", instance_yaml(2222, 9000, metrics_listen=metrics))
    world.enable("ssh")
    header = encode_v2("PROXY", "TCP4", (CLIENT4, 40040), (GW4, 2222))
    with world.peer.connect((GW4, 2222), timeout=10) as sock:
        sock.sendall(header + b"hello")
        reader = sock.makefile("rb")
        assert reader.readline().decode().strip() == f"{CLIENT4} 40040"
        assert reader.read(5) == b"hello"
        shown = world.box.sh("mmproxy", "status", "ssh").stdout
        print(shown)  # shown with `pytest -s`: what an admin sees
        row = next(line.split() for line in shown.splitlines() if f"{CLIENT4}:40040" in line)
        out = str(len(f"{CLIENT4} 40040\n") + 5)  # the line, then the echo
        assert row[1].startswith(PEER4) and row[2:5] == ["127.0.0.1:9000", "5", out]
        denied = world.box.sh(
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            "mmproxy", "status", "ssh", check=False,
        )  # fmt: skip
        assert denied.returncode == 1 and "root only" in denied.stderr, denied
        page = world.box.sh(
            "python3", "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9877/metrics').read().decode())",
        ).stdout  # fmt: skip
        assert "mmproxy_connections_active 1" in page, page
    world.box.systemctl("stop", "mmproxy@ssh.service", "mmproxy@ssh.socket")
    assert world.box.sh("test", "-e", "/run/mmproxy/ssh", check=False).returncode != 0

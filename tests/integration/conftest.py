"""Integration harness: real sockets, a real mmproxy process, inside network namespaces
made for each test (../shared/notes/testbed.md has the recipes)."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmproxy.netns import NetNS, apply, link
from mmproxy.routing import lo_commands, mark_commands
from tests.support import Backend, Handler, needs_root, tell_peer

MARK, TABLE = 123, 100
# The gateway namespace's end of the veth, and the balancer/client namespace's end.
GW4, PEER4 = "198.51.100.1", "198.51.100.7"
GW6, PEER6 = "2001:db8:1::1", "2001:db8:1::7"
# Fake clients named in headers: documentation ranges not routed anywhere here.
CLIENT4, CLIENT6 = "203.0.113.7", "2001:db8:99::7"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    needs_root("integration tests need root (network namespaces)")


@dataclass
class Net:
    """A gateway namespace (mmproxy, the application) joined to a peer namespace (the
    balancer's or client's side), with the routing variant applied in the gateway."""

    gw: NetNS
    peer: NetNS
    variant: str

    def config_keys(self) -> dict[str, object]:
        """What mmproxy's config must say for its self-checks to find this routing."""
        if self.variant == "lo":
            return {"routing": "lo"}
        return {"routing": "fwmark", "firewall": "iptables"}


def make_net(variant: str) -> Net:
    gw, peer = NetNS("mmp-gw"), NetNS("mmp-peer")
    link(gw, peer, [f"{GW4}/24", f"{GW6}/64"], [f"{PEER4}/24", f"{PEER6}/64"])
    if variant == "lo":
        apply(gw, lo_commands(TABLE))
    else:
        # The fwmark variant needs a default route: replies are dropped before the mangle
        # rules see them otherwise (the original README says so too).
        gw.ip("route", "add", "default", "via", PEER4)
        gw.ip("-6", "route", "add", "default", "via", PEER6)
        assert gw.veth is not None
        gw.sysctl(f"net.ipv4.conf.{gw.veth}.route_localnet", "1")
        apply(gw, mark_commands(MARK, TABLE))
    return Net(gw, peer, variant)


@contextlib.contextmanager
def made_net(variant: str) -> Iterator[Net]:
    """make_net(variant), its namespaces deleted afterwards."""
    n = make_net(variant)
    try:
        yield n
    finally:
        n.gw.delete()
        n.peer.delete()


@pytest.fixture(params=["lo", "mark"])
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    with made_net(request.param) as n:
        yield n


@pytest.fixture
def lo_net() -> Iterator[Net]:
    with made_net("lo") as n:
        yield n


@pytest.fixture
def mark_net() -> Iterator[Net]:
    with made_net("mark") as n:
        yield n


BACKENDS: list[Backend] = []


@pytest.fixture(autouse=True)
def _forget_backends() -> Iterator[None]:
    yield
    for backend in BACKENDS:
        backend.close()
    BACKENDS.clear()


def start_backend(ns: NetNS, host: str, handler: Handler = tell_peer) -> Backend:
    backend = Backend(ns.listen((host, 0)), handler)
    BACKENDS.append(backend)
    return backend


class Mmproxy:
    """The real `python -m mmproxy` process in the gateway namespace."""

    def __init__(self, ns: NetNS, config_path: Path, *extra: str) -> None:
        cmd = ns.exec_args(sys.executable, "-m", "mmproxy", "-c", str(config_path), *extra)
        self._spawn(ns, config_path, cmd)

    def _spawn(self, ns: NetNS, config_path: Path, cmd: list[str], **popen: Any) -> None:
        """Run `cmd` (mmproxy, however started) and collect its log lines."""
        self.ns = ns
        self.config_path = config_path
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **popen)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


StartMmproxy = Callable[..., Mmproxy]  # the run_mmproxy fixture


@pytest.fixture
def run_mmproxy(tmp_path: Path) -> Iterator[StartMmproxy]:
    """start(net, **config keys) -> a running mmproxy in net.gw, on 127.0.0.1:2222 and
    [::1]:2222 by default."""
    started: list[Mmproxy] = []

    def start(net: Net, *extra: str, **keys: object) -> Mmproxy:
        config: dict[str, object] = {
            **net.config_keys(),
            "listen": ["127.0.0.1:2222", "[::1]:2222"],
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "header_timeout": 3,
            "connect_timeout": 2,
            "mark": MARK,
            "table": TABLE,
        }
        config.update(keys)
        path = tmp_path / f"mmproxy-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = Mmproxy(net.gw, path, "-v", *extra)
        started.append(proc)
        proc.wait_for("listening on")
        return proc

    yield start
    for proc in started:
        proc.stop()


def process_tree(pid: int) -> list[int]:
    """mmproxy's process and its worker processes (and theirs)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += process_tree(int(child))
    return found


def recv_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until EOF (or a reset, which ends it the same way for these tests)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)

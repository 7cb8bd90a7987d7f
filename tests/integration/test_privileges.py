"""Least privilege: the systemd unit grants CAP_NET_ADMIN, and CAP_NET_BIND_SERVICE for
clients that send from a port below 1024, nothing else. Run as nobody (uid 65534) with
exactly those (effective, permitted, inheritable, ambient and bounding set alike),
mmproxy serves spoofed TCP and UDP connections over both address families and both
routing variants, low client ports kept; with CAP_NET_ADMIN alone it serves too, low
ports replaced; without it, it refuses to start and its self-check names CAP_NET_ADMIN.
The routing is applied as root first, as the unit's `ExecStartPre=+mmproxy routing up`
does.

Why CAP_NET_ADMIN: the kernel accepts it for IP_TRANSPARENT, IPV6_TRANSPARENT and
SO_MARK on every version, and the fwmark variant's self-check reads firewall rules, which
only CAP_NET_ADMIN allows. CAP_NET_RAW is also accepted for the socket options (for
SO_MARK only since Linux 5.17), which the last tests pin down: it serves a loopback-routed
instance, yet cannot run a fwmark one, so it is never the capability to grant.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mmproxy.proxy_protocol import encode_v1, encode_v2
from tests.readable import Runnable, copy_for_others
from tests.support import UdpEcho

from .conftest import CLIENT4, CLIENT6, MARK, TABLE, Mmproxy, Net, made_net, start_backend
from .test_udp import PORT, balancer, datagram, targets

NOBODY = 65534
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13  # bits of /proc/PID/status Cap*
UNIT_CAPS = ["net_admin", "net_bind_service"]  # as units/mmproxy@.service grants them
CAPS_FIX = (
    "fix: run mmproxy as root, or give it CAP_NET_ADMIN "
    "(systemd: AmbientCapabilities=CAP_NET_ADMIN)"
)


def setpriv(caps: list[str]) -> list[str]:
    """util-linux setpriv: nobody, no groups, no new privileges, and exactly `caps`."""
    spec = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--no-new-privs", f"--inh-caps={spec}", f"--ambient-caps={spec}",
        f"--bounding-set={spec}",
    ]  # fmt: skip


class Unprivileged(Mmproxy):
    """Mmproxy started through setpriv (same log capture as the root one)."""

    def __init__(
        self, net: Net, config_path: Path, caps: list[str], code: Runnable | None = None
    ) -> None:
        # nobody runs a readable copy of the code (the checkout may be under /root).
        self._copy = contextlib.ExitStack()
        if code is None:
            code = self._copy.enter_context(copy_for_others())
        cmd = net.gw.exec_args(*setpriv(caps), code.python, "-m", "mmproxy", "-c",
                               str(config_path))  # fmt: skip
        self._spawn(net.gw, config_path, cmd, cwd=code.path, env=code.env())

    def refused(self) -> None:
        """It exited without serving, saying why."""
        assert self.proc.wait(30) != 0
        self.wait_for("self-checks failed; not starting")
        assert not [line for line in self.lines if "listening on" in line], self.lines
        self._copy.close()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._copy.close()


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory(prefix="mmproxy-caps-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def write_config(directory: Path, net: Net, app: str, app6: str, udp: bool = False) -> Path:
    listen = ["127.0.0.1:2222"]
    allowed = ["127.0.0.0/8"]
    if udp:  # the balancer sends from the peer namespace
        listen += [f"udp://0.0.0.0:{PORT}", f"udp://[::]:{PORT}"]
        allowed += ["198.51.100.0/24", "2001:db8:1::/64"]
    path = directory / "caps.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **net.config_keys(),
                "listen": listen,
                "ipv4": app,
                "ipv6": app6,
                "allowed_networks": allowed,
                "mark": MARK,
                "table": TABLE,
            }
        )
    )
    path.chmod(0o644)
    return path


def loopback_config(directory: Path, net: Net) -> Path:
    """TCP only, to loopback targets."""
    app = start_backend(net.gw, "127.0.0.1")
    app6 = start_backend(net.gw, "::1")
    return write_config(directory, net, app.address, app6.address)


def capability_masks(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
    masks["uid"] = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return masks


def ask(net: Net, family: str, client: str, port: int) -> bytes:
    """A spoofed TCP connection (v1 header for IPv4, v2 for IPv6): what the application
    answers, "<peer host> <peer port>"."""
    with net.gw.connect(("127.0.0.1", 2222)) as sock:
        if family == "TCP4":
            sock.sendall(encode_v1(family, (client, port), ("198.51.100.1", 2222)))
        else:
            sock.sendall(encode_v2("PROXY", family, (client, port), ("2001:db8::1", 2222)))
        return sock.makefile("rb").readline()


def kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(found) and (int(found.group(1)), int(found.group(2))) >= (major, minor)  # type: ignore[union-attr]


def test_the_units_capabilities_serve_spoofed_tcp_and_udp(net: Net, world_readable: Path) -> None:
    host4, host6 = targets(net)
    app, app6 = start_backend(net.gw, host4), start_backend(net.gw, host6)
    # The UDP application on the same address and port as the TCP one (one target each).
    echoes = []
    for backend in (app, app6):
        host, port = backend.listener.getsockname()[:2]
        sock = net.gw.open_socket(backend.listener.family, socket.SOCK_DGRAM)
        sock.bind((host, port))
        echoes.append(UdpEcho(sock))
    config = write_config(world_readable, net, app.address, app6.address, udp=True)
    proc = Unprivileged(net, config, UNIT_CAPS)
    try:
        proc.wait_for("listening on")
        assert not [line for line in proc.lines if "FAILED" in line], proc.lines
        masks = capability_masks(proc.proc.pid)
        assert masks["uid"] == NOBODY
        # Those two and nothing else, not even in the bounding set (no way to regain more).
        for mask in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            expected = 1 << CAP_NET_ADMIN | 1 << CAP_NET_BIND_SERVICE
            assert masks[mask] == expected, (mask, hex(masks[mask]))
        # The application sees the client's address and port: the connect was spoofed.
        for family, client, port in (("TCP4", CLIENT4, 40300), ("TCP6", CLIENT6, 1000)):
            assert ask(net, family, client, port) == f"{client} {port}\n".encode()
        for v6, client, port in ((False, CLIENT4, 123), (True, CLIENT6, 40303)):
            with balancer(net, v6) as lb:
                lb.send(datagram((client, port), b"ping"))
                assert lb.recv(65535) == f"{client} {port} ping".encode()
    finally:
        proc.stop()
        for echo in echoes:
            echo.sock.close()


def test_cap_net_admin_alone_serves_and_replaces_low_client_ports(
    lo_net: Net, world_readable: Path
) -> None:
    proc = Unprivileged(lo_net, loopback_config(world_readable, lo_net), ["net_admin"])
    try:
        proc.wait_for("listening on")
        assert capability_masks(proc.proc.pid)["CapBnd"] == 1 << CAP_NET_ADMIN
        assert ask(lo_net, "TCP4", CLIENT4, 40320) == f"{CLIENT4} 40320\n".encode()
        host, port = ask(lo_net, "TCP4", CLIENT4, 1000).decode().split()
        assert host == CLIENT4 and int(port) >= 1024  # served, from a port the kernel chose
        proc.wait_for(r"ports below 1024 need CAP_NET_BIND_SERVICE, which this process lacks")
    finally:
        proc.stop()


def test_without_capabilities_it_refuses_and_names_cap_net_admin(
    lo_net: Net, world_readable: Path
) -> None:
    proc = Unprivileged(lo_net, loopback_config(world_readable, lo_net), [])
    proc.refused()
    assert capability_masks(os.getpid())["CapEff"] >> CAP_NET_ADMIN & 1  # root's, not its
    lacks = r"Operation not permitted \(the process lacks CAP_NET_ADMIN\)"
    for option in ("IP_TRANSPARENT", "IPV6_TRANSPARENT", "SO_MARK 123"):
        proc.wait_for(rf"FAILED    can set {option}: {lacks}")
    # The spoofed test connection says what is missing, not "apply the routing".
    proc.wait_for(
        r"FAILED    target 127\.0\.0\.1:\d+ answers a spoofed connection from 192\.0\.2\.1: "
        r"cannot set IP_TRANSPARENT: the process needs CAP_NET_ADMIN"
    )
    text = "\n".join(proc.lines)
    assert "apply the routing above" not in text
    assert "CAP_NET_RAW" not in text
    assert text.count(CAPS_FIX) == 5, text  # three options, two spoofed connections


def test_cap_net_raw_alone_cannot_run_the_fwmark_variant(world_readable: Path) -> None:
    """CAP_NET_RAW, which the unit used to grant as well, is not enough: the fwmark
    variant's self-check cannot read the firewall rules, and says CAP_NET_ADMIN is needed."""
    with made_net("mark") as net:
        proc = Unprivileged(net, loopback_config(world_readable, net), ["net_raw"])
        try:
            proc.refused()
            proc.wait_for(
                r"FAILED    has CAP_NET_ADMIN \(needed to read the firewall rules of the "
                r"fwmark routing\): missing CAP_NET_ADMIN"
            )
            proc.wait_for(re.escape(CAPS_FIX))
        finally:
            proc.stop()


@pytest.mark.skipif(not kernel_at_least(5, 17), reason="SO_MARK needs CAP_NET_ADMIN before 5.17")
def test_cap_net_raw_alone_sets_the_socket_options_since_linux_5_17(
    lo_net: Net, world_readable: Path
) -> None:
    """Kernel behaviour, not what the unit grants: since Linux 5.17 CAP_NET_RAW passes
    the IP_TRANSPARENT, IPV6_TRANSPARENT and SO_MARK checks too, so a loopback-routed
    instance serves with it. It buys nothing over CAP_NET_ADMIN, which the fwmark variant
    needs anyway (above), and would add raw and packet sockets."""
    proc = Unprivileged(lo_net, loopback_config(world_readable, lo_net), ["net_raw"])
    try:
        proc.wait_for("listening on")
        assert capability_masks(proc.proc.pid)["CapBnd"] == 1 << CAP_NET_RAW
        assert ask(lo_net, "TCP4", CLIENT4, 40310) == f"{CLIENT4} 40310\n".encode()
    finally:
        proc.stop()

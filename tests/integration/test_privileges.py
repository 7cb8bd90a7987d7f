"""Least privilege: mmproxy run as nobody (uid 65534) with only the network capabilities
the systemd unit grants (CAP_NET_ADMIN, CAP_NET_RAW: effective, ambient and bounding set
alike) serves spoofed connections; without them it refuses to start, and its self-check
names the capability that is missing. The routing is applied as root first, as the unit's
`ExecStartPre=+mmproxy routing up` does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mmproxy.proxy_protocol import encode_v1, encode_v2

from .conftest import CLIENT4, CLIENT6, MARK, TABLE, Mmproxy, Net, make_net, start_backend

NOBODY = 65534
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13  # bit numbers in /proc/<pid>/status Cap* masks
BITS = {"net_admin": CAP_NET_ADMIN, "net_raw": CAP_NET_RAW}


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

    def __init__(self, net: Net, config_path: Path, caps: list[str]) -> None:
        self.ns = net.gw
        cmd = net.gw.exec_args(*setpriv(caps), sys.executable, "-m", "mmproxy", "-c",
                               str(config_path))  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory(prefix="mmproxy-caps-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def write_config(directory: Path, net: Net, app: str, app6: str) -> Path:
    path = directory / "caps.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **net.config_keys(),
                "listen": ["127.0.0.1:2222"],
                "ipv4": app,
                "ipv6": app6,
                "allowed_networks": ["127.0.0.0/8"],
                "mark": MARK,
                "table": TABLE,
            }
        )
    )
    path.chmod(0o644)
    return path


def capability_masks(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
    masks["uid"] = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return masks


def test_exactly_the_units_capabilities_serve_spoofed_connections(
    net: Net, world_readable: Path
) -> None:
    app = start_backend(net.gw, "127.0.0.1")
    app6 = start_backend(net.gw, "::1")
    config = write_config(world_readable, net, app.address, app6.address)
    proc = Unprivileged(net, config, ["net_admin", "net_raw"])
    try:
        proc.wait_for("listening on")
        assert not [line for line in proc.lines if "FAILED" in line], proc.lines
        masks = capability_masks(proc.proc.pid)
        want = 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW
        assert masks["uid"] == NOBODY
        # Nothing beyond the two, not even in the bounding set (no way to regain more).
        assert masks["CapEff"] == masks["CapPrm"] == masks["CapBnd"] == masks["CapAmb"] == want
        for family, client, port in (("TCP4", CLIENT4, 40300), ("TCP6", CLIENT6, 40301)):
            with net.gw.connect(("127.0.0.1", 2222)) as sock:
                if family == "TCP4":
                    sock.sendall(encode_v1(family, (client, port), ("198.51.100.1", 2222)))
                else:
                    sock.sendall(encode_v2("PROXY", family, (client, port), ("2001:db8::1", 2222)))
                # The application sees the client's address: the connect was spoofed.
                assert sock.makefile("rb").readline() == f"{client} {port}\n".encode()
    finally:
        proc.stop()


def ask(net: Net, port: int) -> bytes:
    with net.gw.connect(("127.0.0.1", 2222)) as sock:
        sock.sendall(encode_v1("TCP4", (CLIENT4, port), ("198.51.100.1", 2222)))
        return sock.makefile("rb").readline()


def test_without_network_capabilities_it_refuses_and_names_them(
    lo_net: Net, world_readable: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    app6 = start_backend(lo_net.gw, "::1")
    config = write_config(world_readable, lo_net, app.address, app6.address)
    proc = Unprivileged(lo_net, config, [])
    assert proc.proc.wait(30) != 0
    lacks = r"\(the process lacks CAP_NET_RAW and CAP_NET_ADMIN\)"
    proc.wait_for(rf"FAILED    can set IP_TRANSPARENT: Operation not permitted {lacks}")
    proc.wait_for(rf"FAILED    can set IPV6_TRANSPARENT: Operation not permitted {lacks}")
    proc.wait_for(rf"FAILED    can set SO_MARK 123: Operation not permitted {lacks}")
    proc.wait_for("self-checks failed; not starting")
    assert not [line for line in proc.lines if "listening on" in line]


# Each capability alone: since Linux 5.17 (Debian 12 has 6.1) the kernel accepts either
# one for IP_TRANSPARENT, IPV6_TRANSPARENT and SO_MARK, so for a loopback target either
# is enough. The fwmark variant's self-check reads the firewall rules, which needs
# CAP_NET_ADMIN: without it the instance refuses and says so.
@pytest.mark.parametrize(
    ("variant", "caps", "serves"),
    [
        ("lo", ["net_raw"], True),
        ("lo", ["net_admin"], True),
        ("mark", ["net_admin"], True),
        ("mark", ["net_raw"], False),
    ],
)
def test_each_capability_alone(
    variant: str, caps: list[str], serves: bool, world_readable: Path
) -> None:
    net = make_net(variant)
    try:
        app = start_backend(net.gw, "127.0.0.1")
        app6 = start_backend(net.gw, "::1")
        config = write_config(world_readable, net, app.address, app6.address)
        proc = Unprivileged(net, config, caps)
        try:
            if serves:
                proc.wait_for("listening on")
                assert capability_masks(proc.proc.pid)["CapBnd"] == 1 << BITS[caps[0]]
                assert ask(net, 40310) == f"{CLIENT4} 40310\n".encode()
            else:
                assert proc.proc.wait(30) != 0
                proc.wait_for(
                    r"FAILED    has CAP_NET_ADMIN \(needed to read the firewall rules of the "
                    r"fwmark routing\): missing CAP_NET_ADMIN"
                )
                assert not [line for line in proc.lines if "listening on" in line]
        finally:
            proc.stop()
    finally:
        net.gw.delete()
        net.peer.delete()

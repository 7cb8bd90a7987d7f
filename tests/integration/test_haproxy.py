"""A real load balancer in front: Debian's HAProxy sends the PROXY header, a client in a
second namespace connects to it, and the application must see the client's address."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import GW4, PEER4, Net, StartMmproxy, start_backend

HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend public
    bind {bind}
    default_backend gateway
backend gateway
    server mmproxy 127.0.0.1:2222 {send_proxy}
"""


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front(
    lo_net: Net, run_mmproxy: StartMmproxy, tmp_path: Path, send_proxy: str
) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    app = start_backend(lo_net.gw, "127.0.0.1")
    run_mmproxy(lo_net, ipv4=app.address)
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(bind=f"{GW4}:8080", send_proxy=send_proxy))
    proc = subprocess.Popen(
        lo_net.gw.exec_args(haproxy, "-f", str(config), "-db"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        sock = None
        deadline = time.monotonic() + 10
        while sock is None:
            try:
                sock = lo_net.peer.connect((GW4, 8080), timeout=2)  # the client, from afar
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        with sock:
            sock.sendall(b"hello")
            line = sock.makefile("rb").readline().decode()
        host, port = line.split()
        assert host == PEER4  # the client's real address, not HAProxy's 127.0.0.1
        assert int(port) > 0
    finally:
        proc.terminate()
        proc.wait(10)

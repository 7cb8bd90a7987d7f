"""`mmproxy status NAME` against a real mmproxy with two worker processes: an open
connection (with its bytes so far) and a recent rejection, read without disturbing
either; only root (or status_group:) may read it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mmproxy.proxy_protocol import encode_v1
from tests.readable import copy_for_others

from .conftest import CLIENT4, Mmproxy, Net, recv_all, start_backend
from .test_metrics import METRICS, scrape

StartMmproxy = Callable[..., Mmproxy]
NAME = "web"


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime directory others may enter (pytest's tmp_path is root's alone): the
    socket's own mode is what keeps a user out."""
    path = Path(tempfile.mkdtemp(prefix="mmproxy-run-"))
    path.chmod(0o755)
    monkeypatch.setenv("MMPROXY_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    if user is None:
        cmd = [sys.executable, "-m", "mmproxy", "status", *args]
        root = Path(__file__).parents[2]  # the checkout, for `-m mmproxy`
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=root)
    # Another user may not reach the checkout (a clone under /root): it runs a readable copy.
    with copy_for_others() as code:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups",
               code.python, "-m", "mmproxy", "status", *args]  # fmt: skip
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, cwd=code.path, env=code.env()
        )


def test_status_shows_an_open_connection_and_a_rejection(
    lo_net: Net, run_mmproxy: StartMmproxy, runtime: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")  # says who it sees, then echoes
    proc = run_mmproxy(lo_net, "--instance", NAME, ipv4=app.address, workers=2)
    proc.wait_for("2 worker processes accept")
    sock = lo_net.gw.connect(("127.0.0.1", 2222), timeout=10)
    balancer = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.sendall(encode_v1("TCP4", (CLIENT4, 42424), ("198.51.100.1", 2222)) + b"hello")
    reader = sock.makefile("rb")
    assert reader.readline() == f"{CLIENT4} 42424\n".encode()
    assert reader.read(5) == b"hello"
    with lo_net.gw.connect(("127.0.0.1", 2222), timeout=10) as bad:
        bad.sendall(b"NOT A HEADER\r\n")
        recv_all(bad)
    proc.wait_for("rejected 127.0.0.1:.*invalid PROXY header")

    shown = status(NAME)
    assert shown.returncode == 0, shown.stderr
    print(shown.stdout)
    text = shown.stdout
    assert f"instance {NAME}: pid {proc.proc.pid}, " in text
    assert "2 worker(s)" in text
    row = next(line.split() for line in text.splitlines() if f"{CLIENT4}:42424" in line)
    # client, balancer, target, bytes in (header excluded), bytes out (the line and echo)
    assert row[:5] == [
        f"{CLIENT4}:42424",
        balancer,
        app.address,
        "5",
        str(len(f"{CLIENT4} 42424\n") + 5),
    ]
    assert "open connections: 1" in text
    assert "invalid-header: invalid PROXY header" in text

    doc = json.loads(status(NAME, "--json").stdout)
    assert doc["counters"]["tcp"]["active"] == 1
    assert doc["counters"]["tcp"]["rejected"] == {"invalid-header": 1}
    assert [c["client"] for c in doc["connections"]] == [f"{CLIENT4}:42424"]

    # The connection carries on, untouched by the look.
    sock.sendall(b"again")
    assert reader.read(5) == b"again"
    sock.close()

    denied = status(NAME, user="nobody")
    assert denied.returncode == 1
    assert "root only (or the group in status_group:)" in denied.stderr
    assert (runtime / NAME / "status.sock").stat().st_mode & 0o777 == 0o600


def test_status_group_lets_its_members_read(
    lo_net: Net, run_mmproxy: StartMmproxy, runtime: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, "--instance", NAME, ipv4=app.address, status_group="nogroup")
    proc.wait_for("listening on")
    socket_path = runtime / NAME / "status.sock"
    assert socket_path.stat().st_mode & 0o777 == 0o660
    shown = status(NAME, user="nobody")  # its group is nogroup here
    assert shown.returncode == 0, shown.stderr
    assert "0 active" in shown.stdout
    proc.stop()
    assert not socket_path.exists()  # removed at the stop
    gone = status(NAME)
    assert gone.returncode == 1 and f"instance {NAME} is not running" in gone.stderr


def test_one_process_shows_its_drain(lo_net: Net, run_mmproxy: StartMmproxy, runtime: Path) -> None:
    """workers: 1 (the single-process runner): status and /metrics while it drains."""
    app = start_backend(lo_net.gw, "127.0.0.1")
    metrics = f"{METRICS[0]}:{METRICS[1]}"
    proc = run_mmproxy(
        lo_net, "--instance", NAME, ipv4=app.address, workers=1, drain_timeout=20,
        metrics_listen=metrics,
    )  # fmt: skip
    assert scrape(lo_net)["mmproxy_draining"] == 0
    with lo_net.gw.connect(("127.0.0.1", 2222), timeout=10) as sock:
        sock.sendall(encode_v1("TCP4", (CLIENT4, 42425), ("198.51.100.1", 2222)))
        assert sock.makefile("rb").readline() == f"{CLIENT4} 42425\n".encode()
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for("stopping: ")
        doc = json.loads(status(NAME, "--json").stdout)
        assert (doc["draining"], doc["workers"]) == (True, 1)
        assert [c["client"] for c in doc["connections"]] == [f"{CLIENT4}:42425"]
        page = scrape(lo_net)
        assert (page["mmproxy_draining"], page["mmproxy_connections_active"]) == (1, 1)
    assert proc.proc.wait(10) == 0
    assert not (runtime / NAME).exists()

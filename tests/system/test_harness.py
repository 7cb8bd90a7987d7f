"""The harness itself: a real systemd boots, socket activation, sd_notify and journald work
as ../shared/notes/testbed.md (section 3) describes, with a private network or on a veth."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

from tests.system.conftest import PEER4, PEER6, SERVER4, SERVER6, Net
from tests.system.harness import Container

DEMO_SOCKET = """\
[Unit]
Description=demo socket %i

[Socket]
ListenStream=127.0.0.1:%i

[Install]
WantedBy=sockets.target
"""

# One connection, then exit. The listening socket comes from systemd (python3-systemd),
# READY=1 goes through python3-sdnotify; stdout goes to the journal.
DEMO_SERVICE = """\
[Unit]
Description=demo service %i
Requires=demo@%i.socket
After=demo@%i.socket

[Service]
Type=notify
ExecStart=/usr/bin/python3 -c 'import socket, sdnotify, systemd.daemon as d; \
fds = d.listen_fds(); print("demo %i: fds", fds, flush=True); \
s = socket.socket(fileno=fds[0]); sdnotify.SystemdNotifier().notify("READY=1"); \
c, a = s.accept(); print("demo %i: connection from", a[0], flush=True); \
c.sendall(("demo %i answers " + a[0] + chr(10)).encode()); c.close()'
"""

CLIENT = """\
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(s.makefile().readline(), end="")
"""


def install_demo(c: Container) -> None:
    c.write("/etc/systemd/system/demo@.socket", DEMO_SOCKET)
    c.write("/etc/systemd/system/demo@.service", DEMO_SERVICE)


def ask(c: Container, host: str, port: int) -> str:
    """Connect from inside the container and return the line the service sends."""
    return c.sh("python3", "-c", CLIENT, host, str(port)).stdout


def show(c: Container, unit: str, prop: str) -> str:
    return c.systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def wait_inactive(c: Container, unit: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while show(c, unit, "ActiveState") != "inactive":
        assert time.monotonic() < deadline, c.systemctl("status", unit, check=False).stdout
        time.sleep(0.1)


def test_boot_and_socket_activation(container: Container) -> None:
    install_demo(container)
    container.boot()

    state = container.systemctl("is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert container.boot_state in ("running", "degraded")
    # "/" must be 0755 (an overlay's root takes its mode from the upper dir), or services
    # running as other users (DynamicUser=) cannot reach anything.
    assert container.sh("stat", "-c", "%a", "/").stdout.strip() == "755"
    # A private network: lo only.
    assert container.sh("ls", "/sys/class/net").stdout.split() == ["lo"]

    container.systemctl("enable", "--now", "demo@7000.socket")
    assert show(container, "demo@7000.socket", "ActiveState") == "active"
    assert show(container, "demo@7000.service", "ActiveState") == "inactive"

    assert ask(container, "127.0.0.1", 7000) == "demo 7000 answers 127.0.0.1\n"
    journal = container.wait_journal("demo@7000", "demo 7000: connection from 127.0.0.1")
    assert "demo 7000: fds [3]" in journal  # LISTEN_FDS=1, the socket as fd 3
    assert "Started demo@7000.service" in journal or "Started demo service 7000" in journal
    records = container.journal("demo@7000", json=True)
    assert any(r.get("MESSAGE") == "demo 7000: fds [3]" for r in records)

    # The service ends after one connection; the socket stays and starts it again.
    wait_inactive(container, "demo@7000.service")
    assert show(container, "demo@7000.service", "Result") == "success"
    assert ask(container, "127.0.0.1", 7000) == "demo 7000 answers 127.0.0.1\n"


def test_boot_in_netns(container: Container, net: Net) -> None:
    """A client in the peer namespace reaches a socket-activated service in the container
    over the veth; the socket's address comes from a drop-in."""
    install_demo(container)
    container.write(
        "/etc/systemd/system/demo@7001.socket.d/listen.conf",
        "[Socket]\nListenStream=\nListenStream=7001\n",
    )
    container.boot(netns=net.server)
    assert net.server.veth is not None
    addrs = container.sh("ip", "-o", "addr", "show", "dev", net.server.veth).stdout
    assert SERVER4 in addrs and SERVER6 in addrs

    # Units (not only nsenter, which has the host's capabilities) may change the routing.
    rule = ["ip", "rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", "100"]
    container.sh("systemd-run", "--wait", "-q", *rule)
    assert "iif lo lookup 100" in container.sh("ip", "rule", "show").stdout

    container.systemctl("enable", "--now", "demo@7001.socket")
    with net.peer.connect((SERVER4, 7001)) as sock:
        assert sock.makefile().readline() == f"demo 7001 answers ::ffff:{PEER4}\n"
    wait_inactive(container, "demo@7001.service")
    with net.peer.connect((SERVER6, 7001)) as sock:
        assert sock.makefile().readline() == f"demo 7001 answers {PEER6}\n"
    container.wait_journal("demo@7001", f"connection from {PEER6}")


def test_install_is_private_to_the_container(
    container: Container, base: Path, tmp_path: Path
) -> None:
    """install() adds an archive package and a local .deb; the base root stays as it was."""
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: mmproxy-harness-probe\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: mmproxy tests <root@localhost>\nDescription: harness test package\n"
    )
    (pkg / "usr/share/mmproxy-harness-probe").mkdir(parents=True)
    (pkg / "usr/share/mmproxy-harness-probe/ok").write_text("ok\n")
    deb = tmp_path / "mmproxy-harness-probe_1.0_all.deb"
    build = ["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)]
    subprocess.run(build, check=True, capture_output=True)

    container.install(["hello"], debs=[deb])
    container.write("/etc/mmproxy/probe.yaml", "listen: 127.0.0.1:1\n")

    assert container.run_offline("hello").stdout == "Hello, world!\n"
    assert (container.root / "usr/share/mmproxy-harness-probe/ok").read_text() == "ok\n"
    assert container.host_path("/etc/mmproxy/probe.yaml").is_file()
    for path in ("usr/bin/hello", "usr/share/mmproxy-harness-probe", "etc/mmproxy"):
        assert not (base / path).exists()


def test_copy_in_merges_a_staged_tree(container: Container, tmp_path: Path) -> None:
    """copy_in(DESTDIR, "/") adds files but leaves existing directories' modes alone, and
    follows the container's own symlinks (/lib -> usr/lib), never the host's."""
    stage = tmp_path / "stage"  # mkdtemp-like 0700 directories, as a DESTDIR often is
    (stage / "lib/systemd/system").mkdir(parents=True)
    (stage / "lib/systemd/system/probe.service").write_text("[Service]\nExecStart=/bin/true\n")
    (stage / "etc").mkdir()
    (stage / "etc/probe.conf").symlink_to("/usr/share/probe/conf")
    for d in (stage, stage / "lib", stage / "etc"):
        d.chmod(0o700)

    container.copy_in(stage, "/")

    root = container.root
    assert (root / "lib").is_symlink()
    assert (root / "usr/lib/systemd/system/probe.service").is_file()
    assert os.readlink(root / "etc/probe.conf") == "/usr/share/probe/conf"
    for d in (root, root / "etc", root / "usr/lib"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d

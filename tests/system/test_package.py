"""The Debian package on clean Debian 12 and Debian 13 systems, as a new admin uses it
(issues 4 and 14).

For each release, `make deb` builds the source and binary packages in a clean container
of that release with networking off (build.py), and that release's lintian checks them.
A fresh container of the release gets the package with apt, with openssh-server and
HAProxy from Debian. The admin writes /etc/mmproxy/ssh.yaml and enables the socket; a
client in the peer namespace (PEER4, a documentation address) reaches sshd through
HAProxy (`send-proxy-v2`) and mmproxy, and sshd logs the client's own address. Then an
upgrade while a connection is open (on Debian 12 from the released 0.1.0-1 package, on
Debian 13 to a rebuild with a higher version), which leaves no file dpkg does not own;
then removal and purge (with a second, fwmark instance running too), after which nothing
of the package is left."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mmproxy.netns import NetNS
from tests.system.build import Build, build_on
from tests.system.conftest import PEER4, SERVER4, Net
from tests.system.harness import SUITES, Container, base_rootfs

REPO = Path(__file__).resolve().parents[2]
FRONTEND = 2200  # HAProxy's frontend, on the container's veth address (SERVER4)

# The admin's only mmproxy file. The balancer (HAProxy) runs on this host, so it reaches
# mmproxy from 127.0.0.1.
SSH_YAML = """\
listen: "127.0.0.1:2222"
ipv4: "127.0.0.1:22"
ipv6: "[::1]:22"
allowed_networks: ["127.0.0.1/32"]
"""

# After the admin's story, before removal: a second instance with the fwmark variant, so
# that removal also has fwmark rules and the nftables table to clean up.
FW_YAML = """\
listen: "127.0.0.1:2223"
ipv4: "127.0.0.1:22"
allowed_networks: ["127.0.0.1/32"]
routing: fwmark
check_failure: warn
"""

HAPROXY_CFG = f"""\
global
    log /dev/log local0

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 2m
    timeout server 2m

frontend ssh
    bind {SERVER4}:{FRONTEND}
    default_backend mmproxy

backend mmproxy
    server local 127.0.0.1:2222 send-proxy-v2
"""

# The balancer's environment, not mmproxy's: sshd logs each client's address when the
# connection opens (VERBOSE), while its process lives. journald takes a line's unit from
# the sender's /proc entry, so a process that logs and exits at once ("Connection closed
# by ... [preauth]") may be missing from `journalctl -u ssh`.
SSHD_CONFIG = "LogLevel VERBOSE\n"

DEB_STAGED = "/var/tmp/mmproxy-upgrade.deb"
# What a purge must leave: the admin's own instance files.
ADMIN_FILES = ["/etc/mmproxy", "/etc/mmproxy/fw.yaml", "/etc/mmproxy/ssh.yaml"]


# --------------------------------------------------------------------------- the packages

# The tree the 0.1.0-1 package was built from (main before issue 14): Debian 12 hosts
# have it installed, and upgrade from it.
RELEASED = ("0.1.0-1", "2cf50c07066e5a87f64cb22f17c7d4a18bb46e98")


@dataclass
class Debs:
    build: Build  # this tree, built on the release
    first: Path
    first_version: str
    upgrade: Path
    upgrade_version: str


def build_released(work: Path) -> tuple[Path, str]:
    """The 0.1.0-1 package, built on this (Debian 12) host by that tree's own `make deb`
    (it downloads pytricia: that build needed the network)."""
    version, commit = RELEASED
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", commit], check=False).returncode:
        pytest.fail(f"commit {commit} (the {version} package's tree) is not in this clone")
    tree = work / "released"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    proc = subprocess.run(
        ["make", "-C", str(tree), "deb", f"DEB_DIST={work / 'released-dist'}"],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"make deb of {commit} failed:\n{proc.stdout}{proc.stderr}"
    (deb,) = (work / "released-dist").glob(f"mmproxy_{version}_*.deb")
    return deb, version


class Packages:
    """Each release's packages, built when a test first asks for them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.debs: dict[str, Debs] = {}

    def get(self, suite: str) -> Debs:
        if suite not in self.debs:
            t0 = time.monotonic()
            dist = self.work / suite / "dist"
            if suite == "bookworm":
                build = build_on(suite, REPO, dist)
                first, first_version = build_released(self.work / suite)
                upgrade, upgrade_version = build.deb, build.version
            else:
                build = build_on(suite, REPO, dist, upgrade_dist=self.work / suite / "upgrade")
                assert build.upgrade is not None
                first, first_version = build.deb, build.version
                upgrade, upgrade_version = build.upgrade, build.upgrade_version
            build.seconds["packages in all"] = time.monotonic() - t0
            self.debs[suite] = Debs(build, first, first_version, upgrade, upgrade_version)
        return self.debs[suite]


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return Packages(tmp_path_factory.mktemp("packages"))


@pytest.fixture(params=SUITES)
def release(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def debs(packages: Packages, release: str) -> Debs:
    return packages.get(release)


@pytest.fixture
def container(release: str) -> Iterator[Container]:
    """A fresh container of the release (this module's, not conftest's Debian 12 one)."""
    with Container(base_rootfs(suite=release)) as c:
        yield c


def test_lintian_reports_no_error_and_no_warning(debs: Debs) -> None:
    build = debs.build
    print(f"{build.suite}: {build.lintian or '(lintian printed nothing)'}; {build.seconds}")
    assert build.lintian_status == 0, build.lintian
    assert not re.search(r"^[EW]: ", build.lintian, re.M), build.lintian


def test_the_source_package_carries_pytricia_pinned(debs: Debs) -> None:
    """dpkg-buildpackage made a source package (built offline, so complete): the upstream
    tarball has no debian/, the Debian tarball has pytricia's source with the pinned hash."""
    dist = debs.build.dist
    (dsc,) = dist.glob("mmproxy_*.dsc")
    (orig,) = dist.glob("mmproxy_*.orig.tar.gz")
    (debian,) = dist.glob("mmproxy_*.debian.tar.xz")
    assert orig.name in dsc.read_text() and debian.name in dsc.read_text()
    with tarfile.open(orig) as tar:
        names = tar.getnames()
    assert not [n for n in names if "/debian/" in n or n.endswith("/debian")], names
    assert {n.split("/", 1)[-1] for n in names} >= {"setup.py", "mmproxy/_splice.c"}
    pinned = re.search(r"sha256:([0-9a-f]{64})", (REPO / "debian/pytricia.txt").read_text())
    assert pinned
    with tarfile.open(debian) as tar:
        member = tar.extractfile("debian/pytricia-1.3.0.tar.gz")
        assert member is not None
        assert hashlib.sha256(member.read()).hexdigest() == pinned.group(1)


# --------------------------------------------------------------------------- the client


class SshClient:
    """A client of sshd through HAProxy, from PEER4:port in the peer namespace: the SSH
    version exchange (RFC 4253, 4.2), then the start of sshd's first binary packet.
    Connecting reads sshd's version line."""

    def __init__(self, peer: NetNS, port: int, timeout: float = 30) -> None:
        self.port = port
        self.sock = peer.open_socket()
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((PEER4, port))
        self.sock.connect((SERVER4, FRONTEND))
        self.buf = b""
        self.banner = self._line()
        assert self.banner.startswith("SSH-2.0-OpenSSH"), self.banner

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"port {self.port}: closed by the server after {self.buf!r}")
        self.buf += chunk

    def _line(self) -> str:
        while b"\n" not in self.buf:
            self._recv()
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def exchange(self) -> int:
        """Send our version; return the message number of sshd's first packet
        (20, SSH_MSG_KEXINIT, which sshd sends once it has read our version)."""
        self.sock.sendall(b"SSH-2.0-mmproxy_package_test\r\n")
        while len(self.buf) < 6:  # uint32 length, byte padding length, byte message
            self._recv()
        return self.buf[5]

    def close(self) -> None:
        self.sock.close()


class Background:
    """Run `fn` on a thread; result() joins and returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._value.append(fn())
            except BaseException as exc:
                self._error.append(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "still running"
        if self._error:
            raise self._error[0]
        return self._value[0]


# --------------------------------------------------------------------------- the system


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def show(c: Container, unit: str, prop: str) -> str:
    return c.sh("systemctl", "show", "-P", prop, unit).stdout.strip()


def installed_version(c: Container) -> str:
    return c.sh("dpkg-query", "-W", "-f", "${Version}", "mmproxy").stdout


def apt(c: Container, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    cmd = ("apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args)
    return c.sh(*cmd, env=env, timeout=timeout)


def sshd_saw(c: Container, client: SshClient) -> None:
    """`journalctl -u ssh` has the connection from the client's own address."""
    line = f"Connection from {PEER4} port {client.port} on 127.0.0.1 port 22"
    wait_for(f"sshd to log {line!r}", lambda: line in c.journal("ssh"), timeout=15)


def mmproxy_recorded(c: Container, port: int) -> None:
    """`journalctl -u mmproxy@ssh` has the record of the (ended) connection."""

    def found() -> bool:
        return any(
            r.get("CLIENT_ADDR") == PEER4 and r.get("CLIENT_PORT") == str(port)
            for r in c.journal("mmproxy@ssh", json=True)
        )

    wait_for(f"mmproxy's record of {PEER4}:{port}", found, timeout=15)


def ssh_through_the_balancer(c: Container, peer: NetNS, port: int) -> str:
    """One client: version exchange, both journals; returns sshd's version line."""
    client = SshClient(peer, port)
    try:
        assert client.exchange() == 20
        sshd_saw(c, client)
    finally:
        client.close()
    mmproxy_recorded(c, port)
    return client.banner


def active_units(c: Container) -> str:
    cmd = ("systemctl", "list-units", "--state=active", "--plain", "--no-legend", "mmproxy*")
    return c.sh(*cmd).stdout.strip()


def routing(c: Container) -> str:
    """Everything an instance may have set: rules, table 100, nftables."""
    parts = [
        c.sh("ip", "-4", "rule", "show").stdout,
        c.sh("ip", "-6", "rule", "show").stdout,
        c.sh("ip", "-4", "route", "show", "table", "100", check=False).stdout,
        c.sh("ip", "-6", "route", "show", "table", "100", check=False).stdout,
        c.sh("nft", "list", "ruleset").stdout,
    ]
    return "\n".join(parts)


def leftovers(c: Container) -> list[str]:
    """Paths named after mmproxy or the bundled pytricia (files, units, generator
    drop-ins, enable links, runtime state, caches), and what /etc/mmproxy holds."""
    script = (
        "find /usr /etc /run /var /root /tmp -path /var/log/journal -prune -o"
        " \\( -name '*mmproxy*' -o -name '*pytricia*' \\) -print;"
        " find /etc/mmproxy"
    )
    out = c.sh("sh", "-c", script, check=False).stdout.split()
    return sorted(set(out))


def unowned(c: Container) -> list[str]:
    """Files of the package's directories that dpkg does not own (left by an upgrade), but
    for the byte-code of owned modules. On a merged /usr, /lib/x is /usr/lib/x."""
    owned = {p.removeprefix("/usr") for p in c.sh("dpkg-query", "-L", "mmproxy").stdout.split()}
    script = (
        "find /usr/lib/mmproxy /usr/lib/systemd \\( -type f -o -type l \\)"
        " \\( -path '/usr/lib/mmproxy/*' -o -name '*mmproxy*' \\) -print"
    )
    found = []
    for path in c.sh("sh", "-c", script).stdout.split():
        plain = path.removeprefix("/usr")
        cached = re.match(r"(.*)/__pycache__/([^/.]+)\.cpython-\d+\.pyc$", plain)
        if cached and f"{cached.group(1)}/{cached.group(2)}.py" in owned:
            continue
        if plain not in owned:
            found.append(path)
    return found


def test_install_use_upgrade_remove_purge(container: Container, net: Net, debs: Debs) -> None:
    c = container
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # 1. apt install ./mmproxy_*.deb, openssh-server and the balancer, on a clean system.
    c.install(["openssh-server", "haproxy"], debs=[debs.first])
    c.write("/etc/haproxy/haproxy.cfg", HAPROXY_CFG)
    c.write("/etc/ssh/sshd_config.d/verbose.conf", SSHD_CONFIG)
    c.boot(netns=net.server)
    timings["install and boot"] = time.monotonic() - t0
    ready = ("systemctl", "is-active", "ssh", "haproxy")
    wait_for("sshd and haproxy", lambda: c.sh(*ready, check=False).returncode == 0)
    assert installed_version(c) == debs.first_version
    assert sorted(c.sh("ls", "/etc/mmproxy").stdout.split()) == ["README", "example.yaml"]
    conffiles = c.sh("dpkg-query", "-W", "-f", "${Conffiles}", "mmproxy").stdout.split()
    assert sorted(p for p in conffiles if p.startswith("/")) == [
        "/etc/mmproxy/README",
        "/etc/mmproxy/example.yaml",
    ]
    c.sh("sh", "-c", "ls /usr/lib/mmproxy/mmproxy/__pycache__/cli.cpython-*.pyc")  # postinst
    for section, page in (("8", "mmproxy"), ("5", "mmproxy.yaml")):
        assert c.sh("man", "-w", section, page).stdout.endswith(f"{page}.{section}.gz\n")
    # The package enables and starts nothing by itself.
    enabled = c.sh("systemctl", "is-enabled", "mmproxy@ssh.socket", check=False).stdout
    assert enabled.strip() == "disabled"
    assert active_units(c) == ""
    assert "lookup 100" not in routing(c)

    # 2-3. The admin's only file, then enable the socket.
    c.write("/etc/mmproxy/ssh.yaml", SSH_YAML)
    c.systemctl("enable", "--now", "mmproxy@ssh.socket")

    # 4-5. Through HAProxy and mmproxy to sshd: sshd logs the client's own address.
    t1 = time.monotonic()
    banner = ssh_through_the_balancer(c, net.peer, 40001)
    timings["first connection"] = time.monotonic() - t1
    assert "iif lo lookup 100" in routing(c)
    pid = show(c, "mmproxy@ssh.service", "MainPID")

    # 6. Upgrade while a connection is open.
    t2 = time.monotonic()
    held = SshClient(net.peer, 40002)
    c.copy_in(debs.upgrade, DEB_STAGED)
    upgrade = Background(lambda: apt(c, "install", "--no-install-recommends", DEB_STAGED))
    # postinst restarts the instance: it stops accepting and drains the open connection.
    wait_for(
        "the instance to drain",
        lambda: show(c, "mmproxy@ssh.service", "ActiveState") == "deactivating",
        timeout=120,
    )
    # A new client meanwhile: its connection waits in the socket systemd holds open.
    waiting = Background(lambda: SshClient(net.peer, 40003))
    # The open connection still relays both ways; then it ends cleanly, by the client.
    assert held.exchange() == 20
    held.close()
    upgrade.result(timeout=120)
    c.sh("rm", DEB_STAGED)
    new = waiting.result(timeout=60)
    assert new.banner == banner
    assert new.exchange() == 20
    sshd_saw(c, new)
    new.close()
    timings["upgrade"] = time.monotonic() - t2
    assert installed_version(c) == debs.upgrade_version
    assert unowned(c) == []  # nothing of the old package is left behind
    assert show(c, "mmproxy@ssh.service", "MainPID") not in (pid, "0")
    sshd_saw(c, held)
    for port in (40002, 40003):
        mmproxy_recorded(c, port)
    assert ssh_through_the_balancer(c, net.peer, 40004) == banner
    assert show(c, "mmproxy@ssh.socket", "NRefused") == "0"  # no client was turned away
    journal = c.journal("mmproxy@ssh")
    assert "closing" not in journal, journal  # no connection was cut by the drain time

    c.write("/etc/mmproxy/fw.yaml", FW_YAML)
    c.systemctl("daemon-reload")  # the generator gives mmproxy@fw.socket its address
    c.systemctl("start", "mmproxy@fw.service")
    rules = routing(c)
    assert "fwmark 0x7b lookup 100" in rules and "table inet mmproxy" in rules, rules

    # 7. Remove: every instance and socket stops, the routing goes, the conffiles stay.
    t3 = time.monotonic()
    removed = apt(c, "remove", "mmproxy")
    assert "warning" not in removed.stdout + removed.stderr, removed.stdout + removed.stderr
    assert active_units(c) == ""
    rules = routing(c)
    assert "lookup 100" not in rules and "mmproxy" not in rules, rules
    assert c.sh("ip", "-4", "route", "show", "table", "100", check=False).stdout.strip() == ""
    assert c.sh("test", "-e", "/etc/mmproxy/example.yaml", check=False).returncode == 0
    assert c.sh("test", "-e", "/usr/lib/mmproxy", check=False).returncode != 0

    # ... and purge: nothing of the package is left, the admin's own files are.
    purged = apt(c, "purge", "mmproxy")
    warnings = re.findall(r"^.*warning.*$", purged.stdout + purged.stderr, re.M)
    # dpkg leaves /etc/mmproxy to the admin's own files, and says so.
    expected = "dpkg: warning: while removing mmproxy, directory '/etc/mmproxy' not empty"
    assert [w.strip() for w in warnings if expected not in w] == [], warnings
    timings["remove and purge"] = time.monotonic() - t3
    assert c.sh("dpkg-query", "-W", "mmproxy", check=False).returncode != 0
    assert leftovers(c) == ADMIN_FILES
    units = c.sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "mmproxy*").stdout
    assert units.strip() == "", units
    files = c.sh("systemctl", "list-unit-files", "--no-legend", "mmproxy*", check=False).stdout
    assert files.strip() == "", files
    rules = routing(c)
    assert "lookup 100" not in rules and "mmproxy" not in rules, rules
    for family in ("-4", "-6"):
        table = c.sh("ip", family, "route", "show", "table", "100", check=False).stdout
        assert table.strip() == "", table
    timings.update(debs.build.seconds)
    print(f"{debs.build.suite}: " + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))

"""Cold start: the first connection to an instance that is not running yet.

A booted Debian 12 container (systemd-nspawn, tests/system/harness.py) holds HAProxy
(`send-proxy-v2` to mmproxy's socket), sshd and mmproxy installed from the .deb this tree
builds, with `mmproxy@ssh.socket` enabled. A client in another network namespace connects
to HAProxy and times connect() to the first bytes of sshd's banner ("SSH-2.0-"):

- cold: mmproxy@ssh.service stopped before each sample (its ExecStopPost removes the
  routing), so the connection waits for socket activation, the start and the self-checks;
- warm: the same with the service running.

The container is built once per bench run (its root, with sshd and HAProxy, is cached by
debootstrap's recipe outside the checkout) and powered off when the run ends.

    python -m bench.coldstart [--deb FILE] [--samples N]   # this measurement alone
"""

from __future__ import annotations

import argparse
import atexit
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.machine import load_average
from bench.targets import Target
from bench.workloads import Context
from mmproxy.netns import NetNS, link
from tests.system.harness import BASE_PACKAGES, Container, base_rootfs

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (*BASE_PACKAGES, "openssh-server", "haproxy")
SERVER4, CLIENT4 = "192.0.2.10", "192.0.2.20"  # the container's veth, the client's
FRONTEND = 2200  # HAProxy's frontend
SAMPLES = 10  # cold and warm, each, per round
FLOOR_MS = 150.0  # issue 15: the median cold start
BANNER = b"SSH-2.0-"
UNIT = "mmproxy@ssh.service"
Result = dict[str, Any]

# The admin's file, as in tests/system/test_package.py; a short drain so a stop between
# samples never waits.
SSH_YAML = """\
listen: "127.0.0.1:2222"
ipv4: "127.0.0.1:22"
ipv6: "[::1]:22"
allowed_networks: ["127.0.0.1/32"]
drain_timeout: 2s
"""

# No health check on the server line: it would start the instance by itself.
HAPROXY_CFG = f"""\
global
    log /dev/log local0
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend ssh
    bind {SERVER4}:{FRONTEND}
    default_backend mmproxy
backend mmproxy
    server local 127.0.0.1:2222 send-proxy-v2
"""


def build_deb(workdir: Path) -> Path:
    """`make deb` of this tree on this (Debian 12) host, into `workdir`."""
    dist, build = workdir / "dist", workdir / "deb-build"
    proc = subprocess.run(
        ["make", "-C", str(REPO), "deb", f"DEB_DIST={dist}", f"DEB_BUILD={build}"],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"make deb failed ({proc.returncode}):\n{tail}")
    (deb,) = dist.glob("mmproxy_*.deb")
    return deb


@dataclass
class Box:
    """The booted container and the client's namespace."""

    container: Container
    server: NetNS
    client: NetNS
    described: Result

    @classmethod
    def start(cls, deb: Path) -> Box:
        server, client = NetNS("mmb-cs-srv"), NetNS("mmb-cs-cl")
        container: Container | None = None
        try:
            link(server, client, [f"{SERVER4}/24"], [f"{CLIENT4}/24"])
            container = Container(base_rootfs(PACKAGES))
            container.install(debs=[deb])
            container.write("/etc/haproxy/haproxy.cfg", HAPROXY_CFG)
            container.write("/etc/mmproxy/ssh.yaml", SSH_YAML)
            container.boot(netns=server)
            box = cls(container, server, client, {})
            box._ready()
            return box
        except BaseException:
            if container is not None:
                container.cleanup()
            server.delete()
            client.delete()
            raise

    def _ready(self) -> None:
        c = self.container
        deadline = time.monotonic() + 60
        while c.sh("systemctl", "is-active", "ssh", "haproxy", check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("sshd and HAProxy did not start in the container")
            time.sleep(0.2)
        c.systemctl("enable", "--now", "mmproxy@ssh.socket")
        query = "${Package} ${Version}\n"
        versions = c.sh("dpkg-query", "-W", "-f", query, "mmproxy", "haproxy",
                        "openssh-server", "python3", "systemd").stdout  # fmt: skip
        self.described = {
            "release": c.sh("cat", "/etc/debian_version").stdout.strip(),
            "packages": dict(line.split() for line in versions.splitlines() if line),
        }
        self.banner_ms()  # the first start, with its caches cold, is not a sample

    def close(self) -> None:
        try:
            self.container.cleanup()
        finally:
            self.server.delete()
            self.client.delete()

    def banner_ms(self) -> float:
        """connect() to HAProxy to the first bytes of sshd's banner, in ms."""
        sock = self.client.open_socket()
        try:
            sock.settimeout(30)
            start = time.perf_counter()
            sock.connect((SERVER4, FRONTEND))
            got = b""
            while len(got) < len(BANNER):
                chunk = sock.recv(256)
                if not chunk:
                    raise RuntimeError(f"closed before sshd's banner (after {got!r})")
                got += chunk
            elapsed = (time.perf_counter() - start) * 1000
        finally:
            sock.close()
        if not got.startswith(BANNER):
            raise RuntimeError(f"not an SSH banner: {got!r}")
        return elapsed

    def stop_service(self) -> None:
        """Stop the instance (its routing goes with it) and let the socket wait again."""
        c = self.container
        c.systemctl("stop", UNIT)
        c.systemctl("reset-failed", UNIT, check=False)  # also resets the start limit
        state = c.sh("systemctl", "is-active", UNIT, check=False).stdout.strip()
        socket_state = c.sh("systemctl", "is-active", "mmproxy@ssh.socket", check=False)
        if state not in ("inactive", "failed") or socket_state.stdout.strip() != "active":
            raise RuntimeError(f"{UNIT} is {state}, its socket {socket_state.stdout.strip()}")

    def samples(self, count: int) -> tuple[list[float], list[float]]:
        cold, warm = [], []
        for _ in range(count):
            self.stop_service()
            time.sleep(0.2)  # the stop's own work (journal, cgroup) is over
            cold.append(self.banner_ms())
        time.sleep(0.2)
        for _ in range(count):
            warm.append(self.banner_ms())
            time.sleep(0.05)
        return cold, warm


_BOX: list[Box] = []  # one container per bench run, shared by its rounds
_FAILED: list[str] = []  # why it could not be made: not tried again every round


def _shared_box(workdir: Path) -> Box:
    if _FAILED:
        raise RuntimeError(f"no container for the cold start: {_FAILED[0]}")
    if not _BOX:
        try:
            box = Box.start(build_deb(workdir))
        except Exception as exc:
            _FAILED.append(f"{type(exc).__name__}: {exc}")
            raise
        _BOX.append(box)
        atexit.register(box.close)
    return _BOX[0]


def summary(cold: list[float], warm: list[float]) -> Result:
    return {
        "cold_ms_median": round(statistics.median(cold), 1),
        "cold_ms_max": round(max(cold), 1),
        "warm_ms_median": round(statistics.median(warm), 1),
        "warm_ms_max": round(max(warm), 1),
    }


def workload(ctx: Context, target: Target) -> Result:
    if target.key != "mmproxy":
        return {"skipped": "socket activation is mmproxy's own (one row)", "metrics": {}}
    box = _shared_box(ctx.workdir)
    before = load_average()
    cold, warm = box.samples(SAMPLES)
    return {
        "metrics": summary(cold, warm),
        "cold_ms": [round(v, 2) for v in cold],
        "warm_ms": [round(v, 2) for v in warm],
        "container": box.described,
        "load_average": [before, load_average()],  # the machine is shared: see the spread
    }


def table(results: Result) -> str:
    """The cold-start section: every round's samples pooled; "" when it did not run."""
    runs = [r for r in results.get("runs", []) if r.get("workload") == "coldstart"]
    runs = [r for r in runs if r.get("cold_ms")]  # not the other targets' (n/a)
    cold = [v for r in runs for v in r.get("cold_ms", [])]
    warm = [v for r in runs for v in r.get("warm_ms", [])]
    if not cold or not warm:
        return ""
    s = summary(cold, warm)
    verdict = "PASS" if s["cold_ms_median"] <= FLOOR_MS else "MISS"
    described: Result = next((r["container"] for r in runs if "container" in r), {})
    packages = ", ".join(f"{k} {v}" for k, v in described.get("packages", {}).items())
    rounds = f"{len(runs)} round" + ("s" if len(runs) != 1 else "")
    loads = [float(a.split()[0]) for r in runs for a in r.get("load_average", [])]
    load = f"; 1-minute load average {min(loads):.1f} to {max(loads):.1f}" if loads else ""
    return "\n\n".join([
        f"**5. Cold start** — through HAProxy to sshd's banner, {len(cold)} cold and "
        f"{len(warm)} warm connections ({rounds} of {SAMPLES}), in a booted "
        f"Debian {described.get('release', '12')} container ({packages}); cold: "
        f"`mmproxy@ssh.service` stopped, its socket waiting{load}",
        "| mmproxy@ssh | median ms | max ms |\n|---|---|---|\n"
        f"| cold (socket activation, start, self-checks) | {s['cold_ms_median']:.1f} | "
        f"{s['cold_ms_max']:.1f} |\n"
        f"| warm (running) | {s['warm_ms_median']:.1f} | {s['warm_ms_max']:.1f} |",
        f"Floor of issue 15: cold median ≤ {FLOOR_MS:g} ms: **{verdict}**",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--deb", type=Path, help="the mmproxy .deb (default: make deb of this tree)")
    p.add_argument("--samples", type=int, default=SAMPLES, help=f"cold and warm each ({SAMPLES})")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmbench-cold-") as tmp:
        box = Box.start(args.deb or build_deb(Path(tmp)))
        try:
            cold, warm = box.samples(args.samples)
        finally:
            box.close()
    print("cold ms:", " ".join(f"{v:.1f}" for v in cold))
    print("warm ms:", " ".join(f"{v:.1f}" for v in warm))
    print(summary(cold, warm))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The things measured: direct (no gateway) and the gateways, each started fresh for a
run in the gateway namespace, with the same routing, target and allowed networks."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import comm, cpu_seconds, wait_listening
from bench.testbed import ALLOWED_NETWORKS, BACKEND_PORT, GW4, IPV4, MARK, Family, Testbed

BACKEND = f"127.0.0.1:{BACKEND_PORT}"

HAPROXY_CONFIG = """\
global
    maxconn {maxconn}
    maxpipes 256
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    option splice-request
    option splice-response
frontend gateway
    bind {listen} accept-proxy
    default_backend app
backend app
    server app {backend} source {any} usesrc clientip
"""


@dataclass(frozen=True)
class Target:
    key: str  # used in file names and JSON
    name: str  # shown in tables
    port: int  # where the load generator connects (the backend's own port for direct)

    @property
    def is_gateway(self) -> bool:
        return self.key != "direct"

    @property
    def address(self) -> str:
        return f"{GW4}:{self.port}"

    def address_in(self, family: Family) -> str:
        """Where the load generator connects over this family ([IPv6]:port)."""
        return family.endpoint(family.gateway, self.port)


TARGETS = {
    t.key: t
    for t in (
        Target("direct", "direct", BACKEND_PORT),
        Target("mmproxy", "mmproxy", 8001),
        Target("mmproxy-pinned", "mmproxy (taskset -c 1)", 8002),
        Target("go-mmproxy", "go-mmproxy", 8003),
        Target("haproxy", "HAProxy", 8004),
    )
}
PEERS = ("go-mmproxy", "haproxy")


def gateway_command(
    target: Target, workdir: Path, maxconn: int, family: Family = IPV4, config: str = ""
) -> list[str]:
    """The gateway's own argv (before `ip netns exec`), listening and connecting over
    `family`; `config`: a YAML file's text for mmproxy (e.g. max_connections)."""
    allowed = workdir / "allowed-networks.txt"
    allowed.write_text("".join(net + "\n" for net in ALLOWED_NETWORKS))
    listen = target.address_in(family)
    backend = family.endpoint(family.backend, BACKEND_PORT)
    if target.key in ("mmproxy", "mmproxy-pinned"):
        # As an admin runs it, from the CLI; -q: no per-connection log line (the peers
        # below log nothing per connection either).
        extra: list[str] = []
        if config:
            (workdir / "mmproxy.yaml").write_text(config)
            extra = ["-c", str(workdir / "mmproxy.yaml")]
        return [sys.executable, "-m", "mmproxy", *extra, "-l", listen, family.target_flag,
                backend, "-a", str(allowed), "--mark", str(MARK), "-q"]  # fmt: skip
    if target.key == "go-mmproxy":
        return [_tool("go-mmproxy"), "-l", listen, family.target_flag, backend,
                "-allowed-subnets", str(allowed), "-mark", str(MARK), "-v", "0"]  # fmt: skip
    if target.key == "haproxy":
        path = workdir / "haproxy.cfg"
        path.write_text(HAPROXY_CONFIG.format(
            maxconn=maxconn, listen=listen, backend=backend,
            any="[::]" if family.key == "ipv6" else "0.0.0.0",
        ))  # fmt: skip
        return [_tool("haproxy"), "-f", str(path), "-db"]
    raise ValueError(f"{target.key} is not a gateway")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise RuntimeError(f"{name} is not installed (bench/setup.sh installs it)")
    return path


class Gateway:
    """One running gateway process; `pid` is the gateway itself (ip netns exec and
    taskset exec it), so /proc/PID is its own CPU time and memory."""

    def __init__(
        self,
        bed: Testbed,
        target: Target,
        workdir: Path,
        maxconn: int,
        command: list[str] | None = None,  # another argv than gateway_command's (UDP)
        protocol: str = "tcp",  # what it listens on
        family: Family = IPV4,
        config: str = "",  # mmproxy's YAML (gateway_command)
    ) -> None:
        self.target = target
        command = command or gateway_command(target, workdir, maxconn, family, config)
        argv = bed.gw.exec_args(*command)
        if target.key == "mmproxy-pinned":
            argv = ["taskset", "-c", "1", *argv]
        self.log_path = workdir / f"{target.key}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid
        try:
            wait_listening(self.pid, target.port, self.alive, protocol=protocol)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {self.log_tail(5)}") from exc
        except BaseException:
            self.stop()
            raise
        self.comm = comm(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop it; its exit status if it had exited by itself before, else None."""
        status = self.proc.poll()
        if status is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return status

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def gateway_cpu(gateway: Gateway | None) -> float | None:
    """The gateway's CPU seconds so far (its whole process tree), None if none runs."""
    if gateway is None or not gateway.alive():
        return None
    return cpu_seconds(gateway.pid)

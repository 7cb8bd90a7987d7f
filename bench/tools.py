"""The load generator and the backend (C, in bench/c/), built with gcc, and how the
harness drives them."""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import wait_listening
from bench.testbed import BACKEND_PORT, Testbed
from mmproxy.proxy_protocol import encode_v1, encode_v2

HERE = Path(__file__).resolve().parent
SOURCE_DIR = HERE / "c"
BUILD_DIR = HERE / "build"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]
FAKE_ADDRS, FAKE_PORTS = 508, 64000
NAMES = ("loadgen", "backend", "udpgen", "udpecho")


@dataclass(frozen=True)
class Tools:
    loadgen: Path
    backend: Path
    udpgen: Path
    udpecho: Path


def build() -> Tools:
    """Compile the tools when their sources (or the headers) are newer than the binaries."""
    BUILD_DIR.mkdir(exist_ok=True)
    headers = max(h.stat().st_mtime for h in SOURCE_DIR.glob("*.h"))
    for name in NAMES:
        source, binary = SOURCE_DIR / f"{name}.c", BUILD_DIR / name
        newest = max(source.stat().st_mtime, headers)
        if not binary.exists() or binary.stat().st_mtime < newest:
            subprocess.run(["gcc", *CFLAGS, "-o", str(binary), str(source)], check=True)
    return Tools(*(BUILD_DIR / name for name in NAMES))


def fake_client(tuple_number: int, ipv6: bool = False) -> tuple[str, int]:
    """The client address loadgen claims for a tuple number (same rule as loadgen.c):
    IPv4 from 203.0.113.0/24 and 192.0.2.0/24, IPv6 from 2001:db8:f00::/64."""
    idx = tuple_number % FAKE_ADDRS
    if ipv6:
        host = f"2001:db8:f00::{idx + 1:x}"
    else:
        host = f"203.0.113.{idx + 1}" if idx < 254 else f"192.0.2.{idx - 254 + 1}"
    return host, 1024 + (tuple_number // FAKE_ADDRS) % FAKE_PORTS


def check_headers(tools: Tools, targets: list[tuple[str, int]]) -> None:
    """loadgen's PROXY headers (v1 and v2, TCP4 to an IPv4 target and TCP6 to an IPv6 one)
    must be byte for byte what mmproxy's own encoder makes."""
    cases = (("v1", 0), ("v2", 1), ("v1", 12345678), ("v2", 777), ("v1", 507), ("v2", 508))
    for host, port in targets:
        six = ":" in host
        where = f"[{host}]:{port}" if six else f"{host}:{port}"
        for version, tuple_number in cases:
            made = subprocess.run(
                [str(tools.loadgen), "--mode", "header", "--proxy", version,
                 "--target", where, "--tuple-base", str(tuple_number)],
                capture_output=True, check=True,
            ).stdout  # fmt: skip
            source, family = fake_client(tuple_number, six), "TCP6" if six else "TCP4"
            if version == "v1":
                expected = encode_v1(family, source, (host, port))
            else:
                expected = encode_v2("PROXY", family, source, (host, port))
            if made != expected:
                raise RuntimeError(f"loadgen's {version} header {made!r} != {expected!r}")


class Backend:
    """The application: listens on 0.0.0.0:9000 and [::]:9000 in the gateway namespace
    (reachable as 127.0.0.1:9000 and [::1]:9000 by the gateways, and on the veth's
    addresses by the direct client)."""

    def __init__(self, bed: Testbed, tools: Tools) -> None:
        argv = bed.gw.exec_args(
            str(tools.backend), f"0.0.0.0:{BACKEND_PORT}", f"[::]:{BACKEND_PORT}"
        )
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            wait_listening(self.proc.pid, BACKEND_PORT, lambda: self.proc.poll() is None)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> dict[str, float]:
        """Stop it and return its counters (accepted, verified_ok, verified_bad, ...)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out) if out.strip() else {}

"""Throw-away network namespaces, for the demo and the tests (needs root and iproute2).

Everything that touches the network in a demo or test runs inside namespaces made here,
so the host's routing, firewall and addresses are never changed.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetnsError(Exception):
    """A namespace could not be made or used; the message has the failing command."""


def run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class NetNS:
    """A named network namespace with `lo` up; delete() removes it and all it holds."""

    def __init__(self, prefix: str = "mmproxy") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.veth: str | None = None  # set by link()
        run(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *_: object) -> None:
        self.delete()

    def delete(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)

    def exec_args(self, *cmd: str) -> list[str]:
        """The argv that runs `cmd` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.exec_args(*cmd), check=check)

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str) -> None:
        self.sh("sysctl", "-q", "-w", f"{key}={value}")

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a thread that has entered this namespace (sockets it makes stay
        in the namespace after the thread ends)."""
        result: list[T] = []
        error: list[BaseException] = []

        def inside() -> None:
            try:
                _setns(f"/run/netns/{self.name}")
                result.append(fn())
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def open_socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        return self.call(lambda: socket.socket(family, type))

    def connect(
        self, address: tuple[str, int], timeout: float = 5.0, source: str | None = None
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = self.open_socket(family)
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        return sock

    def listen(self, address: tuple[str, int], backlog: int = 1024) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = self.open_socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        return sock


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def link(a: NetNS, b: NetNS, a_addrs: Sequence[str], b_addrs: Sequence[str]) -> None:
    """Join two namespaces with a veth pair and give each end its addresses."""
    suffix = uuid.uuid4().hex[:6]
    va, vb = f"va{suffix}", f"vb{suffix}"
    run(["ip", "link", "add", va, "netns", a.name, "type", "veth", "peer", "name", vb,
         "netns", b.name])  # fmt: skip
    for ns, dev, addrs in ((a, va, a_addrs), (b, vb, b_addrs)):
        for addr in addrs:
            # nodad: an IPv6 address is usable at once, not after duplicate detection.
            extra = ["nodad"] if ":" in addr else []
            ns.ip("addr", "add", addr, "dev", dev, *extra)
        ns.ip("link", "set", dev, "up")
    a.veth, b.veth = va, vb


def apply(ns: NetNS, commands: Sequence[Sequence[str]]) -> None:
    """Run routing/firewall commands (as printed by mmproxy.routing) inside `ns`."""
    for cmd in commands:
        ns.sh(*cmd)

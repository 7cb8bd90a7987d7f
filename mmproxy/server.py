"""The daemon's lifecycle: bind, start the forwarder, run until a signal, shut down."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Sequence

from mmproxy.config import Address, Config
from mmproxy.forwarder import Forwarder

log = logging.getLogger("mmproxy")

LISTEN_BACKLOG = 4096  # net.core.somaxconn's default on Debian 12; the kernel caps it anyway


class ServerError(Exception):
    """The server cannot start; the message says why and what to do."""


def bind_listeners(addresses: Sequence[Address]) -> list[socket.socket]:
    """Bind and listen on every address, or raise ServerError naming the one that failed."""
    ports_with_v4 = {a.port for a in addresses if a.family == socket.AF_INET}
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(_bind_one(address, v6only=address.port in ports_with_v4))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_one(address: Address, v6only: bool) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            # [::] alone serves IPv4 too; beside an IPv4 listener on the same port it can't.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {address}: {exc.strerror}") from exc
    return sock


class Server:
    """Runs one instance: owns the listening sockets and the forwarder."""

    def __init__(self, config: Config, listeners: Sequence[socket.socket] | None = None) -> None:
        self.config = config
        self.listeners = list(listeners) if listeners is not None else None
        self.forwarder: Forwarder | None = None
        self._stop = threading.Event()

    def start(self) -> Forwarder:
        if self.listeners is None:
            self.listeners = bind_listeners(self.config.listen)
        self.forwarder = Forwarder(self.config, self.listeners)
        self.forwarder.start()
        for sock in self.listeners:
            log.info("listening on %s", _sockname(sock))
        return self.forwarder

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, drain_timeout: float = 0.0) -> None:
        """Start, then block until SIGTERM or SIGINT, then shut down."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        forwarder = self.start()
        while not self._stop.wait(3600):
            pass
        log.info("stopping: %s", forwarder.stats.summary())
        self.shutdown(drain_timeout)

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        if self.forwarder is not None:
            self.forwarder.stop(drain_timeout)
        for sock in self.listeners or ():
            sock.close()


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))

"""Helpers shared by the unit, integration and system tests, written once: whether this is
CI, the one root check, and the echo applications (TCP and UDP). Fixtures built on them live
in tests/conftest.py and the integration and system conftests."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mmproxy.udp import IP_PKTINFO

NOT_RUN = "NOT RUN:"  # every skip for lack of root starts so; the summary counts them


def in_ci() -> bool:
    """CI sets CI=true; "", "0", "false" and "no" mean a developer's machine."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def needs_root(why: str) -> None:
    """Skip loudly for a developer who is not root; under CI (which runs as root) fail."""
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(f"{why}; CI runs as root, so this is an error")
    pytest.skip(f"{NOT_RUN} {why}; run the tests as root")


def host_port(sock: socket.socket) -> str:
    """The socket's address as a config value: host:port, [host]:port for IPv6."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- TCP: an application that accepts, hands each connection to a handler -----------------


@dataclass
class Seen:
    """One connection the application accepted: its peer and what it received."""

    peer: tuple[str, int]
    received: bytes = b""


Handler = Callable[[socket.socket, Seen], None]


def echo(conn: socket.socket, seen: Seen) -> None:
    """Echo until EOF, then close: the default application."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        seen.received += data
        conn.sendall(data)


def tell_peer(conn: socket.socket, seen: Seen) -> None:
    """Say who we think the peer is, then echo."""
    host, port = seen.peer[:2]
    conn.sendall(f"{host} {port}\n".encode())
    echo(conn, seen)


@dataclass
class Backend:
    """The application: accepts on `listener`, records who connected, serves each
    connection with `handler` in a thread of its own."""

    listener: socket.socket
    handler: Handler = echo
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return host_port(self.listener)

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            seen = Seen(peer[:2])
            self.seen.append(seen)
            threading.Thread(target=self._serve, args=(conn, seen), daemon=True).start()

    def _serve(self, conn: socket.socket, seen: Seen) -> None:
        with conn:
            try:
                self.handler(conn, seen)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


# --- UDP: an application that answers each datagram ---------------------------------------

Reply = Callable[[bytes, tuple[str, int]], bytes]


def udp_tell_peer(data: bytes, peer: tuple[str, int]) -> bytes:
    """ "<peer host> <peer port> " + payload."""
    return f"{peer[0]} {peer[1]} ".encode() + data


def prefixed(prefix: bytes) -> Reply:
    """prefix + payload."""
    return lambda data, _peer: prefix + data


@dataclass
class UdpEcho:
    """The application: answers each datagram on `sock` with reply(payload, peer) and
    records the peers. pktinfo: asks for each datagram's destination (IP_PKTINFO) and
    answers from it, as dnsmasq, unbound and BIND do when bound to every address."""

    sock: socket.socket
    reply: Reply = udp_tell_peer
    pktinfo: bool = False
    peers: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pktinfo:
            self.sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return host_port(self.sock)

    def _serve(self) -> None:
        while True:
            try:
                data, ancillary, _flags, peer = self.sock.recvmsg(65535, 64)
                self.peers.append(peer[:2])
                answer = self.reply(data, peer)
                # Without IP_PKTINFO there is no ancillary data: a plain sendto().
                self.sock.sendmsg([answer], ancillary if self.pktinfo else [], 0, peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()

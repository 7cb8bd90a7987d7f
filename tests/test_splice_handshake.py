"""_splice.handshake: the whole hand-shake in C, for clients whose every decision Python
has already made; anything else comes back to Python at the step where it stopped."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from mmproxy import _splice
from mmproxy.proxy_protocol import encode_v1, encode_v2
from mmproxy.relay import Connection
from tests.support import needs_root

CLAIMED = ("127.0.0.2", 40001)  # on lo: a transparent bind needs no routing


@dataclass
class Bed:
    listener: socket.socket
    target: socket.socket
    core: _splice.Core
    balancers: dict[str, bool] = field(default_factory=dict)
    claims: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    def connect(self, data: bytes) -> socket.socket:
        client = socket.create_connection(self.listener.getsockname())
        if data:
            client.sendall(data)
        select.select([self.listener], [], [], 5)
        time.sleep(0.05)  # the bytes follow the hand-shake on lo
        return client

    def handshake(self, limit: int = 8) -> tuple[int, int, list[_splice.HandedBack], int, int]:
        return _splice.handshake(
            self.core, self.listener.fileno(), limit, 4096, self.balancers, self.claims,
            0, True, Connection,
        )  # fmt: skip

    def know(self) -> None:
        self.balancers["127.0.0.1"] = True
        self.claims["TCP4", CLAIMED[0]] = self.target.getsockname()


@pytest.fixture
def bed() -> Iterator[Bed]:
    epoll = select.epoll()
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_server(("127.0.0.1", 0)) as target,
    ):
        listener.setblocking(False)
        core = _splice.Core(epoll.fileno())
        yield Bed(listener, target, core)
        for handle, *_ in core.close_all():
            assert isinstance(handle, Connection)
        core.close()
    epoll.close()


HEADER = encode_v1("TCP4", CLAIMED, ("127.0.0.1", 2222))


def flags(fd: int) -> tuple[bool, bool]:
    """(non-blocking, close-on-exec)"""
    status = fcntl.fcntl(fd, fcntl.F_GETFL)
    descriptor = fcntl.fcntl(fd, fcntl.F_GETFD)
    return bool(status & os.O_NONBLOCK), bool(descriptor & fcntl.FD_CLOEXEC)


def accept_one(core: _splice.Core, listen_fd: int) -> tuple[int, str, int]:
    """One client of an unknown balancer, handed back unread: (fd, host, port)."""
    _, _, back, error, _ = _splice.handshake(core, listen_fd, 1, 4096, {}, {}, 0, True, Connection)
    if error:
        raise OSError(error, os.strerror(error))
    if not back:
        raise BlockingIOError
    return back[0][0], back[0][1], back[0][2]


def test_accept_gives_a_non_blocking_close_on_exec_fd_and_the_peer(bed: Bed) -> None:
    with pytest.raises(BlockingIOError):
        accept_one(bed.core, bed.listener.fileno())
    with socket.create_connection(bed.listener.getsockname()) as client:
        select.select([bed.listener], [], [], 5)
        fd, host, port = accept_one(bed.core, bed.listener.fileno())
        try:
            assert (host, port) == client.getsockname()
            assert flags(fd) == (True, True)
            client.sendall(b"ping")
            select.select([fd], [], [], 5)
            assert os.read(fd, 10) == b"ping"
        finally:
            os.close(fd)


def test_accept_gives_an_ipv4_peer_of_a_dual_stack_listener_as_ipv4(bed: Bed) -> None:
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            select.select([server], [], [], 5)
            fd, host, peer_port = accept_one(bed.core, server.fileno())
            os.close(fd)
            assert (host, peer_port) == client.getsockname()  # not ::ffff:127.0.0.1


def test_accept_on_a_bad_fd_reports_it(bed: Bed) -> None:
    for fd in (99999, -1):
        with pytest.raises(OSError) as info:
            accept_one(bed.core, fd)
        assert info.value.errno == errno.EBADF


def test_an_unknown_balancer_comes_back_unread(bed: Bed) -> None:
    with bed.connect(HEADER + b"hello"):
        relayed, _, back, error, lost = bed.handshake()
        assert (relayed, error, lost, len(back)) == (0, 0, 0, 1)
        fd, host, _port, data, header, err, upstream, sent = back[0]
        assert (host, data, header, err, upstream, sent) == ("127.0.0.1", None, None, 0, -1, 0)
        assert os.read(fd, 100) == HEADER + b"hello"  # not a byte read before the check
        os.close(fd)


def test_a_known_client_is_connected_from_its_claim_and_relayed(bed: Bed) -> None:
    needs_root("IP_TRANSPARENT needs root")
    bed.know()
    header = encode_v2("PROXY", "TCP4", CLAIMED, ("127.0.0.1", 2222))
    with bed.connect(header + b"hello"):
        relayed, v2, back, error, lost = bed.handshake()
        assert (relayed, v2, back, error, lost) == (1, 1, [], 0, 0)
        conn, peer = bed.target.accept()
        with conn:
            assert peer == CLAIMED  # the application sees the claimed client and port
            assert conn.recv(100) == b"hello"
        assert len(bed.core) == 1
        (handle, nin, _nout), *_ = [(c[0], c[1], c[2]) for c in bed.core.connections()]
        assert isinstance(handle, Connection)
        info = handle.info
        assert isinstance(info, tuple)
        assert info == ("127.0.0.1", info[1], *CLAIMED, bed.target.getsockname(), 2)
        assert nin == len(b"hello")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (HEADER, "no bytes after the header: the connect is awaited in Python"),
        (encode_v2("LOCAL", "UNSPEC") + b"x", "LOCAL: the balancer speaks for itself"),
        (encode_v1("TCP4", ("127.0.0.3", 1), ("127.0.0.1", 2)) + b"x", "a claim not let through"),
        (encode_v2("PROXY", "TCP4", CLAIMED, ("127.0.0.1", 2), [(0x05, b"id")]) + b"x", "TLVs"),
        (b"PROXY TCP4 127.0.0.2 127.0.0.1 01 2\r\nx", "the codec words the error"),
        (b"PROXY TCP4 127.0", "incomplete"),
    ],
)
def test_what_needs_a_decision_comes_back_with_what_was_read(
    bed: Bed, data: bytes, why: str
) -> None:
    bed.know()
    with bed.connect(data):
        relayed, _, back, _, _ = bed.handshake()
        assert relayed == 0, why
        fd, _, _, got, header, err, upstream, _ = back[0]
        os.close(fd)
        assert (got, err, upstream) == (data, 0, -1), why
        assert header == _splice.parse_header(data)


def test_a_client_that_sent_nothing_yet_comes_back_with_eagain(bed: Bed) -> None:
    bed.know()
    with bed.connect(b""):
        _, _, back, _, _ = bed.handshake()
        fd, _, _, data, _, err, _, _ = back[0]
        os.close(fd)
        assert (data, err) == (None, errno.EAGAIN)


def test_a_target_that_refuses_leaves_the_client_to_python(bed: Bed) -> None:
    needs_root("IP_TRANSPARENT needs root")
    bed.know()
    port = bed.target.getsockname()[1]
    bed.target.close()  # nothing listens there now
    bed.claims["TCP4", CLAIMED[0]] = ("127.0.0.1", port)
    with bed.connect(HEADER + b"hello"):
        relayed, _, back, _, _ = bed.handshake()
        fd, _, _, data, _, _, upstream, _ = back[0]
        os.close(fd)
        assert (relayed, data, upstream) == (0, HEADER + b"hello", -1)  # Python does it again


def test_an_empty_backlog_is_no_error_and_the_limit_holds(bed: Bed) -> None:
    assert bed.handshake() == (0, 0, [], 0, 0)
    clients = [bed.connect(b"x") for _ in range(3)]
    _, _, back, _, _ = bed.handshake(limit=2)
    assert len(back) == 2
    _, _, rest, _, _ = bed.handshake()
    assert len(rest) == 1
    for item in back + rest:
        os.close(item[0])
    for client in clients:
        client.close()


def test_bad_arguments_are_refused(bed: Bed) -> None:
    with pytest.raises(ValueError):
        _splice.handshake(bed.core, bed.listener.fileno(), 1, 1 << 20, {}, {}, 0, True, Connection)
    with pytest.raises(TypeError):
        _splice.handshake(None, bed.listener.fileno(), 1, 4096, {}, {}, 0, True, Connection)  # type: ignore[arg-type]

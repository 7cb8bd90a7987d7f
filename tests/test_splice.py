"""The C part of the forwarder (mmproxy/_splice.c): accept, connect, and the Core's
contract where mmproxy.relay does not already exercise it (tests/test_relay.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
from collections.abc import Iterator

import pytest

from mmproxy import _splice
from tests.support import needs_root


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def flags(fd: int) -> tuple[bool, bool]:
    """(non-blocking, close-on-exec)"""
    status = fcntl.fcntl(fd, fcntl.F_GETFL)
    descriptor = fcntl.fcntl(fd, fcntl.F_GETFD)
    return bool(status & os.O_NONBLOCK), bool(descriptor & fcntl.FD_CLOEXEC)


def test_connect_plainly(listener: socket.socket) -> None:
    host, port = listener.getsockname()
    fd, step, error = _splice.connect(socket.AF_INET, None, 0, host, port, 0, 0)
    assert (step, error) == ("", 0) and fd >= 0
    try:
        select.select([], [fd], [], 5)
        assert _splice.socket_error(fd) == 0
        assert flags(fd) == (True, True)
        with socket.socket(fileno=os.dup(fd)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            # Urgent bytes in line: the relay passes each on, none dropped (issue 11, 5).
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 1
            assert sock.getpeername() == (host, port)
    finally:
        os.close(fd)


def test_connect_sets_the_options_asked_for(listener: socket.socket) -> None:
    host, port = listener.getsockname()
    options = _splice.CONNECT_KEEPALIVE | _splice.CONNECT_DEFER_ACK
    fd, _, _ = _splice.connect(socket.AF_INET, None, 0, host, port, 0, options)
    with socket.socket(fileno=fd) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0


def test_connect_from_a_source_address_keeps_or_drops_its_port(listener: socket.socket) -> None:
    needs_root("IP_TRANSPARENT needs root")
    # 127.0.0.2 is on lo: the kernel accepts the bind and the reply needs no routing.
    host, port = listener.getsockname()
    kept = _splice.CONNECT_KEEP_PORT
    fd, step, error = _splice.connect(socket.AF_INET, "127.0.0.2", 40001, host, port, 7, kept)
    assert (step, error) == ("", 0)
    with socket.socket(fileno=fd) as sock:
        assert sock.getsockname() == ("127.0.0.2", 40001)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 7
        assert sock.getsockopt(socket.SOL_IP, 19) == 1  # IP_TRANSPARENT
    fd, _, _ = _splice.connect(socket.AF_INET, "127.0.0.2", 40001, host, port, 0, 0)
    with socket.socket(fileno=fd) as sock:
        select.select([], [sock], [], 5)
        assert sock.getsockname()[0] == "127.0.0.2"
        assert sock.getsockname()[1] != 40001  # the port is the kernel's choice


def test_a_refused_connect_is_reported(listener: socket.socket) -> None:
    host, port = listener.getsockname()
    listener.close()  # nothing listens there now
    fd, step, error = _splice.connect(socket.AF_INET, None, 0, host, port, 0, 0)
    if fd >= 0:  # the refusal may come after connect() returned
        select.select([], [fd], [], 5)
        error = _splice.socket_error(fd)
        os.close(fd)
    else:
        assert step == "connect"
    assert error == errno.ECONNREFUSED


@pytest.mark.parametrize(
    ("family", "host"),
    [
        (socket.AF_INET, "300.1.1.1"),
        (socket.AF_INET, "::1"),
        (socket.AF_INET6, "127.0.0.1"),
        (socket.AF_INET6, "fe80::1%no-such-interface0"),
        (socket.AF_UNIX, "/tmp/x"),
    ],
)
def test_a_bad_address_is_reported_before_any_socket(family: int, host: str) -> None:
    before = len(os.listdir("/proc/self/fd"))
    assert _splice.connect(family, None, 0, host, 22, 0, 0) == (-1, "address", errno.EINVAL)
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_ipv6_scope_is_understood() -> None:
    # fe80::1 on lo is no neighbour: the connect fails, but the scope was parsed.
    fd, step, _ = _splice.connect(socket.AF_INET6, None, 0, "fe80::1%lo", 22, 0, 0)
    if fd >= 0:
        os.close(fd)
    assert step != "address"


def test_core_add_refuses_bad_sockets_and_leaves_them_to_the_caller() -> None:
    epoll = select.epoll()
    core = _splice.Core(epoll.fileno(), 65536)
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError):
            core.add(r, r, "same twice")
        with pytest.raises(ValueError):
            core.add(-1, r, "negative")
        with pytest.raises(ValueError):
            core.add(1 << 30, r, "no fd can be this high")
        with open(__file__) as regular, pytest.raises(OSError) as info:
            core.add(regular.fileno(), r, "a file cannot be polled")
        assert info.value.errno == errno.EPERM
        with open(__file__) as regular, pytest.raises(OSError):
            core.add(r, regular.fileno(), "the second cannot be polled")
        assert len(core) == 0
        os.fstat(r)  # still open: the caller's to close
        core.add(r, w, "both pollable")  # r was taken out of the epoll set again
        assert len(core) == 1
        assert core.close_all() == [("both pollable", _splice.END_CLOSED, 0, 0, 0, 0)]
        with pytest.raises(OSError):
            os.fstat(r)  # the core closed what it owned
    finally:
        epoll.close()

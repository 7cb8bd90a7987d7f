"""The splice relay on loopback TCP pairs (no root needed)."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmproxy.relay import Connection, Relay


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


Running = tuple[Relay, list[tuple[Connection, str]]]  # the relay, the connections it closed


class Harness:
    """client <-> [relay: client_side, upstream_side] <-> application"""

    def __init__(self, relay: Relay, closed: list[tuple[Connection, str]]) -> None:
        self.relay = relay
        self.closed = closed
        self.client, client_side = tcp_pair()
        upstream_side, self.app = tcp_pair()
        client_side.setblocking(False)  # the relay's contract: non-blocking sockets
        upstream_side.setblocking(False)
        self.conn = Connection(client_side.detach(), upstream_side.detach(), info="test")
        relay.add(self.conn)

    def wait_closed(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for conn, reason in self.closed:
                if conn is self.conn:
                    return reason
            time.sleep(0.01)
        raise AssertionError("connection not closed")


@pytest.fixture
def relay() -> Iterator[Running]:
    closed: list[tuple[Connection, str]] = []
    r = Relay(lambda conn, reason: closed.append((conn, reason)), pipe_size=65536)
    r.start()
    yield r, closed
    r.stop()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    sock.settimeout(5)
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def test_bytes_pass_both_ways_and_are_counted(relay: Running) -> None:
    h = Harness(*relay)
    up, down = os.urandom(300_000), os.urandom(200_000)
    threading.Thread(target=h.client.sendall, args=(up,)).start()
    assert recv_exactly(h.app, len(up)) == up
    threading.Thread(target=h.app.sendall, args=(down,)).start()
    assert recv_exactly(h.client, len(down)) == down
    h.client.shutdown(socket.SHUT_WR)
    assert h.app.recv(1) == b""  # the half-close was passed on
    h.app.close()
    assert h.client.recv(1) == b""
    assert h.wait_closed() == "client closed first"
    assert (h.conn.bytes_in, h.conn.bytes_out) == (len(up), len(down))


def test_application_closing_first_is_reported(relay: Running) -> None:
    h = Harness(*relay)
    h.app.sendall(b"bye")
    h.app.shutdown(socket.SHUT_WR)
    assert recv_exactly(h.client, 3) == b"bye"
    h.client.sendall(b"ok")
    assert recv_exactly(h.app, 2) == b"ok"
    h.client.close()
    assert h.wait_closed() == "target closed first"


def test_a_reset_is_passed_on(relay: Running) -> None:
    h = Harness(*relay)
    h.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    h.app.close()  # RST
    assert "reset" in h.wait_closed()
    h.client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        h.client.recv(1)


def test_idle_connections_hold_no_pipe(relay: Running) -> None:
    r, _ = relay
    h = Harness(*relay)
    h.client.sendall(b"x" * 1000)
    recv_exactly(h.app, 1000)
    time.sleep(0.05)
    assert r.pipes()[0] == 0


def test_close_all_ends_every_connection(relay: Running) -> None:
    r, closed = relay
    harnesses = [Harness(r, closed) for _ in range(5)]
    deadline = time.monotonic() + 5
    while len(r) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # added from this thread: the relay thread adopts them
    assert len(r) == 5
    r.close_all("mmproxy is stopping")
    for h in harnesses:
        assert h.wait_closed() == "mmproxy is stopping"
    assert len(r) == 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pipes_are_held_only_while_bytes_wait_and_the_pool_is_bounded() -> None:
    closed: list[tuple[Connection, str]] = []
    r = Relay(lambda conn, reason: closed.append((conn, reason)), pipe_size=65536, keep_pipes=2)
    r.start()
    try:
        harnesses = [Harness(r, closed) for _ in range(3)]
        payload = os.urandom(8 << 20)
        senders = [threading.Thread(target=h.client.sendall, args=(payload,)) for h in harnesses]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 5
        while r.pipes()[0] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the applications read nothing: every pipe stays full
        assert r.pipes() == (3, 0)
        before = open_fds()
        for h in harnesses:
            assert recv_exactly(h.app, len(payload)) == payload
        for t in senders:
            t.join()
        time.sleep(0.05)
        assert r.pipes() == (0, 2)  # two kept for reuse, the third closed
        assert open_fds() == before - 2
    finally:
        r.stop()


@pytest.fixture
def timed_relay() -> Iterator[tuple[Relay, list[tuple[Connection, str]]]]:
    closed: list[tuple[Connection, str]] = []
    r = Relay(lambda c, reason: closed.append((c, reason)), idle_timeout=0.5)
    r.half_close_timeout = 0.5
    r.start()
    yield r, closed
    r.stop()


def test_an_idle_connection_is_closed_after_idle_timeout(timed_relay: Running) -> None:
    h = Harness(*timed_relay)
    h.client.sendall(b"hi")
    assert recv_exactly(h.app, 2) == b"hi"
    assert h.wait_closed(timeout=5) == "idle for more than 0.5 s"


def test_a_half_closed_connection_is_closed_after_its_timeout(
    timed_relay: Running,
) -> None:
    r, _ = timed_relay
    r.idle_timeout = 0  # only the half-close timeout applies
    h = Harness(*timed_relay)
    h.client.shutdown(socket.SHUT_WR)
    assert h.app.recv(1) == b""
    assert h.wait_closed(timeout=5) == "half-closed by the client for more than 0.5 s"


def watch_on_loop(r: Relay, fd: int, events: int, timeout: float) -> list[str]:
    """Relay.watch, called on the relay thread as its contract says; returns what fired."""
    fired: list[str] = []
    deadline = time.monotonic() + timeout

    def arm() -> None:
        r.watch(fd, events, deadline, lambda: fired.append("ready"), lambda: fired.append("x"))

    r._request(arm)
    return fired


def wait_for(fired: list[str], timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while not fired and time.monotonic() < deadline:
        time.sleep(0.01)
    return fired


def test_a_watched_socket_is_reported_once_when_ready(relay: Running) -> None:
    r, _ = relay
    a, b = tcp_pair()
    fired = watch_on_loop(r, b.fileno(), select.EPOLLIN, 5.0)
    time.sleep(0.05)
    assert fired == []
    a.sendall(b"x")
    assert wait_for(fired) == ["ready"]
    a.sendall(b"y")  # unregistered after the first event: no second call
    time.sleep(0.05)
    assert fired == ["ready"] and r.waiting() == 0
    a.close()
    b.close()


def test_a_watched_socket_expires_at_its_deadline(relay: Running) -> None:
    r, _ = relay
    a, b = tcp_pair()
    started = time.monotonic()
    fired = watch_on_loop(r, b.fileno(), select.EPOLLIN, 0.2)
    assert wait_for(fired) == ["x"]
    assert 0.15 < time.monotonic() - started < 2.0
    assert r.waiting() == 0
    a.close()
    b.close()


def test_adding_from_another_thread_a_connection_that_resets_at_once(
    relay: Running,
) -> None:
    """A hand-shake worker hands over a connection whose client has already reset: the
    relay may finish it (closing both sockets) as soon as the first one is registered,
    and the worker must not then touch the closed (or reused) second descriptor. Found by
    the soak test: `OSError: [Errno 9] Bad file descriptor` in the worker, 3 in 100,000."""
    r, closed = relay
    errors: list[BaseException] = []
    count = 1000

    def hand_over(conn: Connection) -> None:
        try:
            r.add(conn)
        except BaseException as exc:
            errors.append(exc)

    for _ in range(count):
        client, client_side = tcp_pair()
        upstream_side, app = tcp_pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # RST: pending on client_side before the relay sees it
        app.close()
        client_side.setblocking(False)
        upstream_side.setblocking(False)
        worker = threading.Thread(
            target=hand_over,
            args=(Connection(client_side.detach(), upstream_side.detach(), info="test"),),
        )
        worker.start()
        worker.join()
    deadline = time.monotonic() + 10
    while len(closed) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert errors == []
    assert len(closed) == count and len(r) == 0


# --- the loop never stops (security issue 11, item 4) -----------------------------------


def test_a_watch_that_cannot_be_registered_leaves_nothing_behind(
    relay: Running, tmp_path: Path
) -> None:
    """epoll refuses a regular file (EPERM): the watch must not stay in the tables, where
    its deadline would later run on_expire, which closes an fd number that may by then
    belong to another connection."""
    r, _ = relay
    fired: list[str] = []
    raised: list[BaseException] = []
    fd = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR)

    def arm() -> None:
        try:
            r.watch(fd, select.EPOLLIN, time.monotonic(), lambda: fired.append("ready"),
                    lambda: fired.append("expired"))  # fmt: skip
        except OSError as exc:
            raised.append(exc)

    r._request(arm)
    h = Harness(*relay)  # a connection relayed after the deadline passed: the loop turned
    h.client.sendall(b"x")
    assert recv_exactly(h.app, 1) == b"x"
    os.close(fd)
    assert [type(e) for e in raised] == [PermissionError]
    assert r.waiting() == 0 and fired == []


def test_an_exception_in_a_listener_is_counted_and_the_loop_carries_on(
    relay: Running,
) -> None:
    r, _ = relay
    calls: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)

        def broken() -> None:
            calls.append(1)
            r.remove_listeners()
            raise RuntimeError("a bug in an accept loop")

        r.add_listener(server.fileno(), broken)
        socket.create_connection(server.getsockname()).close()
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    assert r.alive() and calls == [1]
    assert r.errors["listener"] == 1
    h = Harness(*relay)  # and established connections are still relayed
    h.client.sendall(b"still here")
    assert recv_exactly(h.app, 10) == b"still here"


def test_listeners_are_removed_on_the_loop_thread_between_two_calls(
    relay: Running,
) -> None:
    """stop_accepting() runs on the main thread while the loop may be inside a listener:
    the removal waits for the loop (which alone changes its tables), so the loop never
    finds a listener gone between looking it up and calling it, and none runs after."""
    r, _ = relay
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def accepting() -> None:
        entered.set()
        release.wait(5)
        order.append("listener returned")

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        r.add_listener(server.fileno(), accepting)
        with socket.create_connection(server.getsockname()):
            assert entered.wait(5)

            def remove() -> None:
                r.remove_listeners()
                order.append("removed")

            remover = threading.Thread(target=remove)
            remover.start()
            time.sleep(0.1)  # the removal, were it done here, would be done by now
            release.set()
            remover.join(5)
            time.sleep(0.05)  # the client still waits in the backlog: no call after it
    assert order[0] == "listener returned"  # (the loop may call it again before it)
    assert order[-1] == "removed"
    assert r.alive() and not r.errors


# --- TCP urgent data (security issue 11, item 5) ----------------------------------------


def inline(*socks: socket.socket) -> None:
    """Urgent bytes kept in the stream, where recv() returns them in order."""
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)


def send_with_urgent(sock: socket.socket, parts: list[bytes]) -> bytes:
    """Send the parts, every other one as urgent data (telnet's interrupt, FTP's ABOR);
    returns every byte sent, in order."""
    for k, part in enumerate(parts):
        if k % 2:
            assert sock.send(part, socket.MSG_OOB) == len(part)
        else:
            sock.sendall(part)
        time.sleep(0.01)  # each its own segment: each urgent byte its own mark
    return b"".join(parts)


@pytest.mark.parametrize("direction", ["client to application", "application to client"])
def test_urgent_data_is_relayed_and_the_stream_goes_on(relay: Running, direction: str) -> None:
    """splice() stops at the urgent mark and says EAGAIN there for ever: without the
    relay's recv()/send() past it, everything after the first urgent byte was stuck."""
    h = Harness(*relay)
    inline(h.client, h.app)
    sender, receiver = (h.client, h.app) if direction.startswith("client") else (h.app, h.client)
    parts = [b"before", b"!", b"between", b"?", b"after" * 1000, b"#", b"end"]
    sent = send_with_urgent(sender, parts)
    assert recv_exactly(receiver, len(sent)) == sent
    # And the connection works on afterwards, both ways.
    h.client.sendall(b"more")
    assert recv_exactly(h.app, 4) == b"more"
    h.app.sendall(b"back")
    assert recv_exactly(h.client, 4) == b"back"
    total = len(sent) + 4
    h.client.close()
    h.app.close()
    h.wait_closed()
    assert sorted((h.conn.bytes_in, h.conn.bytes_out)) == [4, total]


def test_urgent_data_just_before_a_close_is_not_lost(relay: Running) -> None:
    """With a FIN behind the mark, splice() says 0 there, as at the end of the stream."""
    h = Harness(*relay)
    inline(h.app)
    sent = send_with_urgent(h.client, [b"data", b"!", b"tail"])
    h.client.shutdown(socket.SHUT_WR)
    assert recv_exactly(h.app, len(sent)) == sent
    assert h.app.recv(1) == b""  # and then the half-close


def test_urgent_data_stays_urgent(relay: Running) -> None:
    """The application (without SO_OOBINLINE) finds the byte where the client put it:
    out of band, at the mark."""
    h = Harness(*relay)
    send_with_urgent(h.client, [b"abc", b"!", b"def"])
    assert recv_exactly(h.app, 3) == b"abc"  # a read stops at the mark
    h.app.settimeout(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert h.app.recv(1, socket.MSG_OOB) == b"!"
            break
        except BlockingIOError:  # EAGAIN... not yet here
            time.sleep(0.01)
        except OSError:  # EINVAL: no urgent byte (yet)
            time.sleep(0.01)
    else:
        raise AssertionError("no urgent byte arrived")
    assert recv_exactly(h.app, 3) == b"def"


def test_urgent_bytes_while_the_application_side_is_full(relay: Running) -> None:
    """The relay meets urgent marks while the application's side cannot take a byte (it
    then goes on in line through the pipe, keeping its place: measured, about one mark in
    seven here); every byte arrives in order, whatever the timing."""
    r, _ = relay
    client, client_side = tcp_pair()
    upstream_side, app = tcp_pair()
    # Full as soon as one byte waits unsent: TCP_NOTSENT_LOWAT (25) of 1.
    upstream_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    upstream_side.setsockopt(socket.IPPROTO_TCP, 25, 1)
    inline(app, client_side, upstream_side)  # as the daemon's sockets are
    for sock in (client_side, upstream_side):
        sock.setblocking(False)
    r.add(Connection(client_side.detach(), upstream_side.detach(), info="full"))
    rng = random.Random(11)
    parts = []
    for _ in range(200):
        parts += [rng.randbytes(rng.choice([0, 1, 10, 1000, 4000, 9000])), b"!"]
    parts = [p for p in parts if p]
    sent = b"".join(parts)

    def send() -> None:
        for part in parts:
            if part == b"!":
                client.send(part, socket.MSG_OOB)
                time.sleep(0.002)  # else the next mark replaces this one before it is met
            else:
                client.sendall(part)

    sender = threading.Thread(target=send)
    sender.start()
    got = b""
    app.settimeout(10)
    while len(got) < len(sent):
        chunk = app.recv(rng.choice([1, 100, 3000]))
        assert chunk, f"EOF after {len(got)} of {len(sent)} bytes"
        got += chunk
    sender.join()
    assert got == sent
    client.close()
    app.close()


def test_open_connections_are_listed_with_their_bytes_so_far(relay: Running) -> None:
    """What `mmproxy status` shows: asked of the loop from another thread, while open."""
    h, other = Harness(*relay), Harness(*relay)
    h.client.sendall(b"12345")
    assert recv_exactly(h.app, 5) == b"12345"
    h.app.sendall(b"abc")
    assert recv_exactly(h.client, 3) == b"abc"
    listed = {id(conn): (nin, nout) for conn, nin, nout in relay[0].connections()}
    assert listed == {id(h.conn): (5, 3), id(other.conn): (0, 0)}
    other.client.close()
    other.app.close()
    other.wait_closed()
    assert [conn for conn, _, _ in relay[0].connections()] == [h.conn]

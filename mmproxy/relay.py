"""The relay: one epoll thread moves the bytes of every established connection (and,
through add_listener, runs the forwarder's accept loop too).

Bytes go socket -> pipe -> socket with splice(2), so they never enter Python. An idle
connection holds its two sockets and nothing else: a pipe is taken from a shared pool
only while bytes are waiting in it, and given back as soon as it is empty (so 10,000 idle
connections need 20,000 fds, not 60,000).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Edge-triggered: a direction is pumped until the kernel says EAGAIN, so no wake-up is lost.
# EPOLLOUT is added to a socket only once a write to it has met a full buffer: a fresh
# socket is writable, and asking for EPOLLOUT from the start costs one useless event per
# socket (two per connection, most of which never fill a buffer).
EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
EVENTS_AND_OUT = EVENTS | select.EPOLLOUT
READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
END_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
LINGER_RESET = struct.pack("ii", 1, 0)
SWEEP_INTERVAL = 1.0  # seconds between checks of the idle and half-close timeouts

log = logging.getLogger("mmproxy.relay")


class PipePool:
    """Pipes of one size, reused: creating and sizing a pipe costs three syscalls."""

    def __init__(self, size: int, keep: int = 64) -> None:
        self.size = size
        self._keep = keep
        self._free: list[tuple[int, int]] = []
        # A splice from a socket that moved fewer bytes than this has emptied the
        # socket's queue: each byte takes at most one of the pipe's page slots, so the
        # pipe cannot be what stopped it. 0 once a pipe could not be sized.
        self.short_read = size // PAGE_SIZE

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            # Over the per-user pipe budget: a smaller pipe still works, only slower.
            self.short_read = 0
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()


class Flow:
    """One direction of a connection: bytes read from `src` and written to `dst`."""

    __slots__ = (
        "done",
        "dst",
        "dst_sock",
        "dst_watched",
        "name",
        "nbytes",
        "pending",
        "pipe",
        "src",
    )

    def __init__(self, name: str, src: socket.socket, dst: socket.socket) -> None:
        self.name = name  # who sends on this flow: "client" or "target"
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.dst_watched = False  # EPOLLOUT asked for on dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.nbytes = 0
        self.done = False


class Connection:
    """An established client <-> target pair, owned by the relay once added."""

    __slots__ = (
        "client",
        "closed",
        "first_eof",
        "half_closed_at",
        "inbound",
        "info",
        "last_active",
        "outbound",
        "started",
        "upstream",
    )

    def __init__(self, client: socket.socket, upstream: socket.socket, info: object) -> None:
        self.client = client
        self.upstream = upstream
        self.info = info
        self.started = self.last_active = time.monotonic()
        self.half_closed_at = 0.0
        self.inbound = Flow("client", client, upstream)  # client -> application
        self.outbound = Flow("target", upstream, client)  # application -> client
        self.closed = False
        self.first_eof: str | None = None  # which side closed first, for the log


# Called once per connection when it ends: (connection, why it ended).
OnClose = Callable[[Connection, str], None]


class _Watch:
    """A socket the loop waits on before it becomes a connection (a header still on its
    way, a connect under way): `on_ready` at its first event, else `on_expire` at the
    deadline. Waiting here instead of on a thread spares two GIL hand-offs."""

    __slots__ = ("deadline", "fd", "on_expire", "on_ready")

    def __init__(
        self, fd: int, deadline: float, on_ready: Callable[[], None], on_expire: Callable[[], None]
    ) -> None:
        self.fd = fd
        self.deadline = deadline
        self.on_ready = on_ready
        self.on_expire = on_expire


class _Abort(Exception):
    def __init__(self, reason: str, reset_peer: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reset_peer = reset_peer


class Relay:
    """Owns established connections until both directions have ended."""

    def __init__(
        self,
        on_close: OnClose,
        pipe_size: int = 1 << 20,
        idle_timeout: float = 0.0,
        half_close_timeout: float = 0.0,
    ) -> None:
        self._on_close = on_close
        # 0 turns a timeout off; both may be changed while running (a reload).
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self._pipes = PipePool(pipe_size)
        self._epoll = select.epoll()
        self._by_fd: dict[int, Connection] = {}
        self._calls: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        # Listening sockets share the loop: accepting and relaying on one thread spares
        # a GIL hand-off per connection. `on_tick` runs at least every `tick_interval` s.
        self._listeners: dict[int, Callable[[], None]] = {}
        self.on_tick: Callable[[float], None] | None = None
        self.tick_interval = 0.0
        self._watches: dict[int, _Watch] = {}
        # (deadline, sequence, watch): a heap, entries of watches already gone are skipped.
        self._deadlines: list[tuple[float, int, _Watch]] = []
        self._sequence = itertools.count()

    def start(self) -> None:
        self._thread.start()

    def add_listener(self, fd: int, on_ready: Callable[[], None]) -> None:
        self._listeners[fd] = on_ready
        self._listen(fd)

    def _listen(self, fd: int) -> None:
        # Worker processes share the listening sockets: EPOLLEXCLUSIVE wakes one of them
        # per new client, not all (the others would find the backlog empty).
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def listening(self, on: bool) -> None:
        """Pause or resume accepting (the listen backlog holds new clients meanwhile)."""
        for fd in list(self._listeners):
            # An exclusive registration cannot be modified: it is removed and added again.
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # paused already
            if on:
                self._listen(fd)

    def remove_listeners(self) -> None:
        for fd in list(self._listeners):
            self._listeners.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def alive(self) -> bool:
        return self._thread.is_alive()

    def __len__(self) -> int:
        return len(self._by_fd) // 2

    def add(self, conn: Connection) -> None:
        """Hand a connection over (both sockets non-blocking); safe from any thread."""
        # Published before registration: events are handled as soon as a socket is in.
        self._by_fd[conn.inbound.src] = conn
        self._by_fd[conn.outbound.src] = conn
        if threading.current_thread() is self._thread:
            self._register(conn)
        else:
            # Registered by the relay thread: once the first socket is registered the relay
            # may finish the connection (a reset) and close both sockets, so registering the
            # second one from here could hit a closed, or already reused, descriptor.
            self._request(lambda: self._register(conn))

    def _register(self, conn: Connection) -> None:
        if conn.closed:  # ended meanwhile (close_all)
            return
        self._epoll.register(conn.inbound.src, EVENTS)
        self._epoll.register(conn.outbound.src, EVENTS)

    def watch(
        self,
        fd: int,
        events: int,
        deadline: float,
        on_ready: Callable[[], None],
        on_expire: Callable[[], None],
    ) -> None:
        """Relay thread only: call `on_ready` once `fd` has one of `events` (or an error),
        or `on_expire` at `deadline` (time.monotonic()); the fd is unregistered first."""
        watch = _Watch(fd, deadline, on_ready, on_expire)
        self._watches[fd] = watch
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), watch))
        self._epoll.register(fd, events)

    def waiting(self) -> int:
        """Sockets watched now (not yet connections)."""
        return len(self._watches)

    def connections(self) -> list[Connection]:
        return list(set(self._by_fd.values()))

    def close_all(self, reason: str) -> None:
        """End every connection now (from any thread): used when a drain time runs out."""

        def finish_all() -> None:
            for conn in self.connections():
                self._finish(conn, reason)
            for watch in list(self._watches.values()):
                self._unwatch(watch)[1]()

        self._request(finish_all)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join()
        self._pipes.close()
        self._epoll.close()
        os.close(self._wake)

    def _request(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the relay thread, which alone touches connection state."""
        self._calls.put(fn)
        os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        by_fd = self._by_fd
        wake = self._wake
        listeners = self._listeners
        watches = self._watches
        deadlines = self._deadlines
        monotonic = time.monotonic
        next_sweep = next_tick = monotonic()
        while not self._stopping:
            timed = self.idle_timeout or self.half_close_timeout
            timeout = min(SWEEP_INTERVAL if timed else 3600.0, self.tick_interval or 3600.0)
            if deadlines:
                timeout = max(0.0, min(timeout, deadlines[0][0] - monotonic()))
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            now = monotonic()
            if deadlines and deadlines[0][0] <= now:
                self._expire(now)
            if timed and now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self._sweep(now)
            if self.on_tick is not None and now >= next_tick:
                next_tick = now + self.tick_interval
                self.on_tick(now)
            for fd, ev in events:
                conn = by_fd.get(fd)
                if conn is None:
                    watch = watches.get(fd)
                    if watch is not None:
                        self._call(self._unwatch(watch)[0])
                    elif fd == wake:
                        self._on_wake()
                    elif fd in listeners:
                        listeners[fd]()
                    continue
                if conn.closed:
                    continue
                conn.last_active = now
                try:
                    self._on_event(conn, fd, ev)
                except _Abort as abort:
                    self._finish(conn, abort.reason, abort.reset_peer)
                except Exception:  # never let one connection take the relay down
                    log.exception("relay error on one connection; closing it")
                    self._finish(conn, "internal error")

    def _unwatch(self, watch: _Watch) -> tuple[Callable[[], None], Callable[[], None]]:
        """Stop watching; returns (on_ready, on_expire). The heap keeps the entry until
        its deadline, so the callbacks (and the sockets they hold) are let go now."""
        del self._watches[watch.fd]
        try:
            self._epoll.unregister(watch.fd)
        except OSError:
            pass  # closed meanwhile
        callbacks = watch.on_ready, watch.on_expire
        watch.on_ready = watch.on_expire = _nothing
        return callbacks

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            watch = heapq.heappop(deadlines)[2]
            if self._watches.get(watch.fd) is watch:
                self._call(self._unwatch(watch)[1])

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # never let one hand-shake take the relay down
            log.exception("error in a hand-shake step on the relay thread")

    def _sweep(self, now: float) -> None:
        """Close connections idle, or half-closed, for longer than allowed."""
        idle, half = self.idle_timeout, self.half_close_timeout
        for conn in self.connections():
            if idle and now - conn.last_active > idle:
                self._finish(conn, f"idle for more than {idle:g} s", reset_peer=True)
            elif half and conn.half_closed_at and now - conn.half_closed_at > half:
                reason = f"half-closed by the {conn.first_eof} for more than {half:g} s"
                self._finish(conn, reason, reset_peer=True)

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            return
        while not self._calls.empty():
            self._calls.get()()

    def _on_event(self, conn: Connection, fd: int, ev: int) -> None:
        if fd == conn.inbound.src:
            reading, writing = conn.inbound, conn.outbound
        else:
            reading, writing = conn.outbound, conn.inbound
        # A flow blocked on its destination resumes reading when that becomes writable.
        if ev & READ_EVENTS and not reading.pending and not reading.done:
            # Unless the peer has closed (its EOF is still to be read), a short read may
            # end the pump: data that arrives later is a new edge-triggered event.
            self._pump(reading, conn, not ev & END_EVENTS)
        if ev & WRITE_EVENTS and writing.pending:
            self._pump(writing, conn, False)
        if conn.inbound.done and conn.outbound.done:
            self._finish(conn, f"{conn.first_eof} closed first")

    def _pump(self, flow: Flow, conn: Connection, short_read_ends: bool) -> None:
        """Move bytes until the source says EAGAIN or EOF, or the destination is full.
        `short_read_ends`: a read that emptied the socket's queue ends it too, which
        spares a splice() that would say EAGAIN (and the exception it raises here)."""
        pipes = self._pipes
        splice = os.splice
        drained = False
        while True:
            if flow.pending:
                assert flow.pipe is not None
                try:
                    n = splice(flow.pipe[0], flow.dst, flow.pending, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    if not flow.dst_watched:  # resumes on its EPOLLOUT from now on
                        flow.dst_watched = True
                        self._epoll.modify(flow.dst, EVENTS_AND_OUT)
                    return
                except OSError as exc:
                    raise _write_abort(flow, conn, exc) from exc
                flow.pending -= n
                flow.nbytes += n
                if drained and not flow.pending:
                    pipes.give(flow.pipe)
                    flow.pipe = None
                    return
                continue
            if flow.pipe is None:
                flow.pipe = pipes.take()
            try:
                n = splice(flow.src, flow.pipe[1], pipes.size, flags=SPLICE_FLAGS)
            except BlockingIOError:
                pipes.give(flow.pipe)
                flow.pipe = None
                return
            except OSError as exc:
                raise _read_abort(flow, conn, exc) from exc
            if n == 0:
                pipes.give(flow.pipe)
                flow.pipe = None
                flow.done = True
                if conn.first_eof is None:
                    conn.first_eof = flow.name
                    conn.half_closed_at = time.monotonic()
                elif conn.inbound.done and conn.outbound.done:
                    return  # both ways ended: closing the sockets, next, says it
                # Pass the half-close on: the peer may still answer the other way.
                try:
                    flow.dst_sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            flow.pending = n
            drained = short_read_ends and n < pipes.short_read

    def _finish(self, conn: Connection, reason: str, reset_peer: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        for flow in (conn.inbound, conn.outbound):
            self._by_fd.pop(flow.src, None)
            if flow.pipe is not None:
                # Bytes still in the pipe can't be delivered: the pipe is not reusable.
                os.close(flow.pipe[0])
                os.close(flow.pipe[1])
                flow.pipe = None
        if reset_peer:
            for sock in (conn.client, conn.upstream):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
        conn.client.close()
        conn.upstream.close()
        try:
            self._on_close(conn, reason)
        except Exception:
            log.exception("error while recording a closed connection")


def _nothing() -> None:
    pass


def _side(conn: Connection, fd: int) -> str:
    return "client" if fd == conn.inbound.src else "target"


def _read_abort(flow: Flow, conn: Connection, exc: OSError) -> _Abort:
    side = _side(conn, flow.src)
    if exc.errno == errno.ECONNRESET:
        return _Abort(f"{side} reset the connection", reset_peer=True)
    if exc.errno == errno.ETIMEDOUT:
        return _Abort(f"{side} timed out (keepalive)", reset_peer=True)
    return _Abort(f"read from {side} failed: {exc.strerror}", reset_peer=True)


def _write_abort(flow: Flow, conn: Connection, exc: OSError) -> _Abort:
    side = _side(conn, flow.dst)
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
        return _Abort(f"{side} closed while data was still being sent to it", reset_peer=True)
    return _Abort(f"write to {side} failed: {exc.strerror}", reset_peer=True)

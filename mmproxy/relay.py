"""The relay: one epoll thread moves the bytes of every established connection (and,
through add_listener, runs the forwarder's accept loop too).

Bytes go socket -> pipe -> socket with splice(2), so they never enter Python; the
per-event work (which direction, how much, half-closes, errors) is done in C by
mmproxy._splice, which owns the established connections' sockets. Python keeps the loop:
listeners, sockets being hand-shaken (watch), timers, and the record of each connection
that ended. An idle connection holds its two sockets and nothing else: a pipe is taken
from a shared pool only while bytes are waiting in it (so 10,000 idle connections need
20,000 fds, not 60,000).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import queue
import select
import threading
import time
from collections import Counter
from collections.abc import Callable

from mmproxy import _splice

SWEEP_INTERVAL = 1.0  # seconds between checks of the idle and half-close timeouts
SIDES = ("client", "target")
TABLE_CHANGE_TIMEOUT = 5.0  # how long another thread waits for the loop to apply a change
ERROR_LOG_WINDOW = 10.0  # the loop logs at most one traceback per kind of error per window

log = logging.getLogger("mmproxy.relay")


class Connection:
    """An established client <-> target pair of non-blocking sockets (their fds): the
    relay owns and closes them once added; bytes_in / bytes_out are final when the relay
    reports it closed."""

    __slots__ = ("bytes_in", "bytes_out", "client", "info", "started", "upstream")

    def __init__(self, client: int, upstream: int, info: object, bytes_in: int = 0) -> None:
        self.client = client
        self.upstream = upstream
        self.info = info
        self.started = time.monotonic()
        self.bytes_in = bytes_in  # client -> application (bytes already sent count)
        self.bytes_out = 0  # application -> client


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


class Relay:
    """Owns established connections until both directions have ended."""

    def __init__(
        self,
        on_close: OnClose,
        pipe_size: int = 1 << 20,
        idle_timeout: float = 0.0,
        half_close_timeout: float = 0.0,
        keep_pipes: int = 64,
        errors: Counter[str] | None = None,
    ) -> None:
        self._on_close = on_close
        # Exceptions the loop caught and carried on from, by where they happened.
        self.errors: Counter[str] = Counter() if errors is None else errors
        self._error_logged: dict[str, float] = {}
        self._whys: dict[tuple[int, int, int], str] = {}
        # 0 turns a timeout off; both may be changed while running (a reload).
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self._epoll = select.epoll()
        self._core = _splice.Core(self._epoll.fileno(), pipe_size, keep_pipes)
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
        self._next_sweep = self._next_tick = 0.0

    def start(self) -> None:
        self._thread.start()

    def add_listener(self, fd: int, on_ready: Callable[[], None]) -> None:
        def add() -> None:
            self._listeners[fd] = on_ready
            self._listen(fd)

        self._on_loop(add)

    def _listen(self, fd: int) -> None:
        # Worker processes share the listening sockets: EPOLLEXCLUSIVE wakes one of them
        # per new client, not all (the others would find the backlog empty).
        try:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        except OSError:
            self._failed("listen")  # the backlog keeps its clients; the next resume retries

    def listening(self, on: bool) -> None:
        """Pause or resume accepting (the listen backlog holds new clients meanwhile)."""

        def switch() -> None:
            for fd in list(self._listeners):
                # An exclusive registration cannot be modified: it is removed and added again.
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # paused already
                if on:
                    self._listen(fd)

        self._on_loop(switch)

    def remove_listeners(self) -> None:
        """Stop accepting for good; once this returns no listener is called again."""

        def remove() -> None:
            for fd in list(self._listeners):
                del self._listeners[fd]
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass

        self._on_loop(remove)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def __len__(self) -> int:
        return len(self._core)

    def add(self, conn: Connection) -> None:
        """Hand a connection over; safe from any thread."""
        if threading.current_thread() is self._thread:
            self._adopt(conn)
        else:
            # Adopted by the relay thread, which alone touches the core.
            self._request(lambda: self._adopt(conn))

    @property
    def core(self) -> _splice.Core:
        """The C core, for the forwarder's C hand-shake (on the relay thread only)."""
        return self._core

    def _adopt(self, conn: Connection) -> None:
        try:
            self._core.add(conn.client, conn.upstream, conn, conn.bytes_in)
        except OSError as exc:  # epoll out of memory: this connection fails, not the loop
            os.close(conn.client)
            os.close(conn.upstream)
            self._report([(conn, _splice.END_RELAY, 0, exc.errno or 0, conn.bytes_in, 0)])
        except Exception:  # a bug: the fds may be another connection's, so left open
            self._failed("add")
            self._report([(conn, _splice.END_RELAY, 0, errno.EINVAL, conn.bytes_in, 0)])

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
        # Registered first: if that fails nothing is kept, since a watch left behind would
        # at its deadline close an fd number that may belong to another socket by then.
        self._epoll.register(fd, events)
        watch = _Watch(fd, deadline, on_ready, on_expire)
        self._watches[fd] = watch
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), watch))

    def waiting(self) -> int:
        """Sockets watched now (not yet connections)."""
        return len(self._watches)

    def pipes(self) -> tuple[int, int]:
        """(pipes held by connections now, pipes kept for reuse)."""
        return self._core.pipes()

    def connections(self) -> list[tuple[Connection, int, int]]:
        """Every established connection with its bytes so far (in, out): asked of the
        loop, which alone reads the core; from any thread but the loop's."""
        found: list[tuple[Connection, int, int]] = []
        self._on_loop(lambda: found.extend(self._core.connections()))
        return found

    def close_all(self, reason: str) -> None:
        """End every connection now (from any thread): used when a drain time runs out."""

        def finish_all() -> None:
            self._report(self._core.close_all(), reason)
            for watch in list(self._watches.values()):
                self._unwatch(watch)[1]()

        self._request(finish_all)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join()
        self._core.close()
        self._epoll.close()
        os.close(self._wake)

    def _request(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the relay thread, which alone touches connection state."""
        self._calls.put(fn)
        os.eventfd_write(self._wake, 1)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn`, which changes the loop's tables, on the relay thread and wait for it
        (at once when called there, or when the loop is not running)."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._request(run)
        if not done.wait(TABLE_CHANGE_TIMEOUT):
            log.error("the relay loop did not apply a change within %g s", TABLE_CHANGE_TIMEOUT)

    def _run(self) -> None:
        # One exception must never end this thread: every connection of the process
        # would hang until the watchdog restarts it. Each step logs, counts, carries on.
        while not self._stopping:
            try:
                self._turn()
            except Exception:
                self._failed("loop")
                time.sleep(0.01)  # a lasting failure (of epoll itself) must not spin

    def _turn(self) -> None:
        """One wait for events and what follows it."""
        deadlines = self._deadlines
        timed = self.idle_timeout or self.half_close_timeout
        timeout = min(SWEEP_INTERVAL if timed else 3600.0, self.tick_interval or 3600.0)
        if deadlines:
            timeout = max(0.0, min(timeout, deadlines[0][0] - time.monotonic()))
        # The connections' events are handled inside poll(); the rest come back here.
        events, ended = self._core.poll(timeout)
        if ended:
            self._report(ended)
        now = time.monotonic()
        if deadlines and deadlines[0][0] <= now:
            self._guarded("timer", self._expire, now)
        if timed and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._guarded("sweep", self._sweep)
        if self.on_tick is not None and now >= self._next_tick:
            self._next_tick = now + self.tick_interval
            self._guarded("tick", self.on_tick, now)
        watches, listeners, wake = self._watches, self._listeners, self._wake
        for fd, _ in events:
            watch = watches.get(fd)
            if watch is not None:
                self._guarded("watch", self._ready, watch)
            elif fd == wake:
                self._on_wake()
            elif (on_ready := listeners.get(fd)) is not None:
                self._guarded("listener", on_ready)
            # Else an fd whose watch or listener an earlier step of this turn removed.

    def _sweep(self) -> None:
        self._report(self._core.sweep(self.idle_timeout, self.half_close_timeout))

    def _guarded(self, where: str, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self._failed(where)

    def _failed(self, where: str) -> None:
        """Count the exception being handled; log it, at most once per window per place
        (a failure met on every turn must not flood the journal)."""
        self.errors[where] += 1
        now = time.monotonic()
        if now - self._error_logged.get(where, float("-inf")) >= ERROR_LOG_WINDOW:
            self._error_logged[where] = now
            log.exception(
                "error in the relay loop (%s, %d so far); carrying on", where, self.errors[where]
            )

    def _report(
        self, ended: list[tuple[Connection, int, int, int, int, int]], reason: str = ""
    ) -> None:
        """Tell the owner about connections that ended (records from the core)."""
        for conn, kind, side, err, nin, nout in ended:
            conn.bytes_in, conn.bytes_out = nin, nout
            try:  # inline, not _guarded(): this runs once per connection
                self._on_close(conn, reason or self._why_cached(kind, side, err))
            except Exception:
                self._failed("record")

    def _why_cached(self, kind: int, side: int, err: int) -> str:
        # The same few sentences for nearly every connection: worded once each. Not the
        # timeouts', which name a value a reload may change.
        key = (kind, side, err)
        why = self._whys.get(key)
        if why is None:
            why = self._why(kind, side, err)
            if kind not in (_splice.END_IDLE, _splice.END_HALF_CLOSED) and len(self._whys) < 256:
                self._whys[key] = why
        return why

    def _why(self, kind: int, side: int, err: int) -> str:
        who = SIDES[side]
        if kind == _splice.END_EOF:
            return f"{who} closed first"
        if kind == _splice.END_READ:
            if err == errno.ECONNRESET:
                return f"{who} reset the connection"
            if err == errno.ETIMEDOUT:
                return f"{who} timed out (keepalive)"
            return f"read from {who} failed: {os.strerror(err)}"
        if kind == _splice.END_WRITE:
            if err in (errno.EPIPE, errno.ECONNRESET):
                return f"{who} closed while data was still being sent to it"
            return f"write to {who} failed: {os.strerror(err)}"
        if kind == _splice.END_IDLE:
            return f"idle for more than {self.idle_timeout:g} s"
        if kind == _splice.END_HALF_CLOSED:
            return f"half-closed by the {who} for more than {self.half_close_timeout:g} s"
        return f"relay error: {os.strerror(err)}"

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
                self._guarded("watch", self._unwatch(watch)[1])

    def _ready(self, watch: _Watch) -> None:
        self._unwatch(watch)[0]()

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            return
        while not self._calls.empty():
            self._guarded("call", self._calls.get())


def _nothing() -> None:
    pass

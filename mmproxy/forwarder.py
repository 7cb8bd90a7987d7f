"""The forwarder: accept balancer connections, read the PROXY header, connect to the
application with the client's address, and hand the pair to the relay.

One thread does it all: the relay's epoll loop also accepts, and does the whole
hand-shake at once when nothing has to wait (the usual case: the header came with the
connection, the local target accepts at once); a connection that must wait (a header
still on its way, a slow target) is watched by the same loop with a deadline, so the
loop never waits on a client. Several worker processes (mmproxy.supervisor) each run one.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmproxy import _splice
from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.networks import AllowedNetworks
from mmproxy.policy import Rejected, route
from mmproxy.proxy_protocol import (
    PP2_TYPE_UNIQUE_ID,
    IncompleteHeader,
    InvalidHeader,
    ProxyHeader,
    parse,
)
from mmproxy.ratelimit import RateLimitedLog
from mmproxy.relay import Connection, Relay
from mmproxy.stats import TcpStats
from mmproxy.transparent import (
    LocalAddresses,
    UpstreamError,
    connect_failure,
    finish_upstream,
    set_keepalive,
    start_upstream,
)

log = logging.getLogger("mmproxy")

# accept() errors that mean "out of a resource for now": back off, never exit.
_ACCEPT_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BACKOFF = 0.1
_RECV_SIZE = 4096
_ACCEPT_BATCH = 64


@dataclass(slots=True)
class ConnInfo:
    """What the connection record says about a connection."""

    balancer: tuple[str, int]
    client: Address | None = None  # None: a health check (LOCAL / UNKNOWN), not spoofed
    target: Address | None = None
    unique_id: bytes | None = None


class Forwarder:
    """Accepts on the given listening sockets until stopped."""

    def __init__(self, config: Config, listeners: Sequence[socket.socket]) -> None:
        self.config = config
        self.allowed: AllowedNetworks = config.allowed()
        self.stats = TcpStats()
        self._listeners = list(listeners)
        self._local = LocalAddresses()
        self._rejections = RateLimitedLog()
        self._relay = Relay(self._on_close, errors=self.stats.errors)
        self._apply_timeouts(config)
        self._stopping = False
        self._paused = False  # at max_connections: new clients wait in the backlog
        self._resume_at = 0.0  # after an accept error such as EMFILE: back off until then
        # Called from the accept loop at least every `heartbeat_interval` s (the systemd
        # watchdog): if the loop wedges, the pings stop and systemd restarts us.
        self.heartbeat: Callable[[], None] | None = None
        self.heartbeat_interval = 0.0
        self._last_beat = float("-inf")

    # --- lifecycle -------------------------------------------------------------------

    def _apply_timeouts(self, config: Config) -> None:
        self._relay.idle_timeout = config.idle_timeout
        self._relay.half_close_timeout = config.half_close_timeout

    def start(self) -> None:
        for sock in self._listeners:
            sock.setblocking(False)
            # Accepted sockets inherit these from the listener: no syscalls per client.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # TCP urgent bytes stay in the stream: the header read and the relay keep them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
            if self.config.tcp_keepalive:
                set_keepalive(sock)
        for sock in self._listeners:
            self._relay.add_listener(sock.fileno(), functools.partial(self._accept_all, sock))
        self._relay.on_tick = self._tick
        self._relay.tick_interval = min(self.heartbeat_interval / 2 or 1.0, 1.0)
        self._relay.start()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config to new connections; established ones are untouched."""
        allowed = config.allowed()
        self.config, self.allowed = config, allowed
        self._apply_timeouts(config)

    def stop_accepting(self) -> None:
        self._stopping = True
        self._relay.remove_listeners()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for connections to end by themselves; True if all did."""
        deadline = time.monotonic() + timeout
        while self.stats.active and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.stats.active

    def stop(self, drain_timeout: float = 0.0) -> None:
        self.stop_accepting()
        if not self.drain(drain_timeout):
            log.warning(
                "closing %d connections still open after the %g s drain time",
                self.stats.active,
                drain_timeout,
            )
            self._relay.close_all("mmproxy is stopping")
            self.drain(1.0)
        self._relay.stop()

    # --- accept ----------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        """On the relay thread, at least every second: the watchdog, the accept back-off."""
        if self._resume_at and now >= self._resume_at and not self._stopping:
            self._resume_at = 0.0
            self._relay.listening(True)
        if self.heartbeat is not None and now - self._last_beat >= self.heartbeat_interval / 2:
            self._last_beat = now
            self.heartbeat()

    def _accept_all(self, listener: socket.socket) -> None:
        """Accept until the backlog is empty or a batch is done (one epoll wake-up serves
        many clients; the batch limit keeps the heartbeat and other listeners served)."""
        max_connections = self.config.max_connections
        # The accepted sockets stay plain fds: a socket object per client costs more than
        # the accept4() itself (socket.accept() adds a getsockname() and an ioctl()).
        accept = _splice.accept
        listen_fd = listener.fileno()
        stats = self.stats
        for _ in range(_ACCEPT_BATCH):
            if self._stopping:
                return
            if stats.active >= max_connections:
                # Leave the rest in the backlog; _released() resumes accepting.
                self._paused = True
                self._relay.listening(False)
                return
            try:
                fd, host, port = accept(listen_fd)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client is gone (or a firewall refused it): the next
                self._accept_failed(exc)
                return
            self._admit(fd, (host, port))

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds or memory, or an error nothing expects (EINVAL from a listener shut
        down under us): say so, pause accepting a while, and carry on."""
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno not in _ACCEPT_BACKOFF_ERRNOS:
            self.stats.errors["accept-" + name] += 1
        self._rejections.warning(
            "accept-" + name,
            f"accept failed: {exc.strerror or exc}; pausing {_ACCEPT_BACKOFF} s",
            {"CLOSE_REASON": "accept-failed"},
        )
        self._relay.listening(False)
        self._resume_at = time.monotonic() + _ACCEPT_BACKOFF

    def _admit(self, client: int, balancer: tuple[str, int]) -> None:
        if balancer[0] not in self.allowed:
            os.close(client)  # before reading a byte: an untrusted peer may not send a header
            self._reject(
                ConnInfo(balancer),
                Rejected("untrusted-balancer", "peer is not in allowed_networks"),
            )
            return
        stats = self.stats
        stats.active += 1
        stats.total += 1
        info = ConnInfo(balancer)
        try:
            self._read_header(client, info, b"", 0.0)
        except Exception as exc:  # a bug must cost one connection, not the acceptor
            self._internal_error(info, client, None, exc)

    # --- hand-shake ------------------------------------------------------------------
    # All of it runs on the relay thread. Usually the header came with the connection and
    # the local target accepts at once, so nothing waits; a step that must wait (a header
    # still on its way, a connect under way) has the loop watch the socket and resumes
    # when it is ready (Relay.watch), with the header or connect timeout as its deadline.
    # No thread hand-off, hence no GIL hand-off, on any path.

    def _read_header(self, client: int, info: ConnInfo, data: bytes, deadline: float) -> None:
        """Read what the client sent so far; `deadline` 0: not waited yet."""
        try:
            chunk = os.read(client, _RECV_SIZE)
        except BlockingIOError:
            self._wait_for_header(client, info, data, deadline)
            return
        except OSError as exc:
            self._fail(client, None, info, _read_error(exc))
            return
        if not chunk:
            self._fail(client, None, info, _closed_before_header(data))
            return
        data += chunk
        try:
            header = parse(data)
        except IncompleteHeader:
            self._wait_for_header(client, info, data, deadline)
            return
        except InvalidHeader as exc:
            self._fail(client, None, info, _invalid_header(exc))
            return
        self._connect(client, info, header, data[header.length :])

    def _wait_for_header(self, client: int, info: ConnInfo, data: bytes, deadline: float) -> None:
        timeout = self.config.header_timeout
        deadline = deadline or time.monotonic() + timeout
        expired = Rejected(
            "header-timeout",
            f"no complete PROXY header within {timeout:g} s ({len(data)} bytes received)",
        )
        self._relay.watch(
            client,
            select.EPOLLIN | select.EPOLLRDHUP,
            deadline,
            self._later(info, client, None, self._read_header, client, info, data, deadline),
            self._later(info, client, None, self._fail, client, None, info, expired),
        )

    def _connect(self, client: int, info: ConnInfo, header: ProxyHeader, early: bytes) -> None:
        try:
            upstream = self._start_upstream(header, info, bool(early))
        except Rejected as exc:
            self._fail(client, None, info, exc)
            return
        if early:
            self._send_early(client, upstream, info, early, len(early), 0.0)
        else:
            self._await_connect(client, upstream, info, 0.0)

    def _send_early(
        self,
        client: int,
        upstream: int,
        info: ConnInfo,
        early: bytes,
        total: int,
        deadline: float,
    ) -> None:
        """Send the bytes that came after the header. Sent at once, they also prove the
        connect done, which spares a poll() and a getsockopt(): a socket still connecting
        says EAGAIN, one whose connect failed gives the reason."""
        try:
            sent = os.write(upstream, early)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(client, upstream, info, _early_send_failed(_target(info), exc))
            return
        if sent < len(early):
            self._wait_for_target(
                client, upstream, info, deadline,
                self._send_early, client, upstream, info, early[sent:], total,
            )  # fmt: skip
            return
        self._established(client, upstream, info, total)

    def _await_connect(self, client: int, upstream: int, info: ConnInfo, deadline: float) -> None:
        try:
            connected = finish_upstream(upstream, _target(info), 0)
        except UpstreamError as exc:
            self._fail(client, upstream, info, _unavailable(exc))
            return
        if connected:
            self._established(client, upstream, info, 0)
        else:
            self._wait_for_target(
                client, upstream, info, deadline, self._await_connect, client, upstream, info
            )

    def _wait_for_target(
        self,
        client: int,
        upstream: int,
        info: ConnInfo,
        deadline: float,
        step: Callable[..., None],
        *args: object,
    ) -> None:
        """Resume `step(*args, deadline)` when the target's socket is writable."""
        timeout = self.config.connect_timeout
        deadline = deadline or time.monotonic() + timeout
        expired = _unavailable(
            UpstreamError(f"target {_target(info)} did not answer within {timeout:g} s")
        )
        self._relay.watch(
            upstream,
            select.EPOLLOUT,
            deadline,
            self._later(info, client, upstream, step, *args, deadline),
            self._later(info, client, upstream, self._fail, client, upstream, info, expired),
        )

    def _later(
        self,
        info: ConnInfo,
        client: int,
        upstream: int | None,
        step: Callable[..., None],
        *args: object,
    ) -> Callable[[], None]:
        """`step(*args)` for the relay to call later, with _admit's guard around it."""

        def run() -> None:
            try:
                step(*args)
            except Exception as exc:  # a bug must cost one connection, not the relay
                self._internal_error(info, client, upstream, exc)

        return run

    def _internal_error(
        self, info: ConnInfo, client: int, upstream: int | None, exc: Exception
    ) -> None:
        log.exception("unexpected error during a hand-shake")
        self._fail(client, upstream, info, Rejected("internal-error", repr(exc)))

    def _start_upstream(self, header: ProxyHeader, info: ConnInfo, data_follows: bool) -> int:
        config = self.config
        info.client, info.target = route(header, config, self._local, info.balancer)
        if header.version == 2:
            info.unique_id = header.tlv(PP2_TYPE_UNIQUE_ID)
        try:
            return start_upstream(
                info.target, info.client, config.mark, config.tcp_keepalive, data_follows
            )
        except UpstreamError as exc:
            raise _unavailable(exc) from exc

    def _established(self, client: int, upstream: int, info: ConnInfo, early: int) -> None:
        self._relay.add(Connection(client, upstream, info, early))

    def _fail(
        self,
        client: int,
        upstream: int | None,
        info: ConnInfo,
        reason: Rejected,
    ) -> None:
        try:
            os.close(client)
        except OSError:
            pass  # a bug closed it already (an internal error after the close)
        if upstream is not None:
            os.close(upstream)
        self._handshake_failed(info, reason)

    def _handshake_failed(self, info: ConnInfo, exc: Rejected) -> None:
        self.stats.active -= 1
        self._released()
        self._reject(info, exc)

    def _released(self) -> None:
        """A connection ended: accept again if that was the limit."""
        if self._paused and self.stats.active < self.config.max_connections:
            self._paused = False
            if not self._stopping:
                self._relay.listening(True)

    def _reject(self, info: ConnInfo, exc: Rejected) -> None:
        self.stats.rejected[exc.reason] += 1
        if self.config.log_connections == "none":
            return  # counted: the status line and `mmproxy` stats still show it
        if exc.reason == "probe":
            log.debug("health check from %s: %s", _format_peer(info.balancer), exc)
            return
        lb = _format_peer(info.balancer)
        who = f"client {info.client} via {lb}" if info.client else lb
        fields = _record_fields(info)
        fields["CLOSE_REASON"] = exc.reason
        self._rejections.warning(exc.reason, f"rejected {who}: {exc}", fields)

    # --- end of a connection (relay thread) ------------------------------------------

    def _on_close(self, conn: Connection, reason: str) -> None:
        nin, nout = conn.bytes_in, conn.bytes_out
        stats = self.stats
        stats.active -= 1
        stats.bytes_in += nin
        stats.bytes_out += nout
        if self._paused:
            self._released()
        if self.config.log_connections != "all" or not log.isEnabledFor(logging.INFO):
            return
        info = conn.info
        assert isinstance(info, ConnInfo)
        duration = time.monotonic() - conn.started
        fields = _record_fields(info)
        fields.update(BYTES_IN=nin, BYTES_OUT=nout, DURATION=f"{duration:.3f}", CLOSE_REASON=reason)
        source = str(info.client) if info.client else "health check"
        log.info(
            "%s via %s -> %s: %s after %.3f s, %d bytes in, %d bytes out",
            source,
            _format_peer(info.balancer),
            info.target,
            reason,
            duration,
            nin,
            nout,
            extra=fields,
        )


def _invalid_header(exc: InvalidHeader) -> Rejected:
    return Rejected("invalid-header", f"invalid PROXY header: {exc}")


def _unavailable(exc: UpstreamError) -> Rejected:
    return Rejected("target-unavailable", str(exc))


# What sending on a socket whose connect failed says (the error the connect met).
_CONNECT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.ENETDOWN,
}


def _early_send_failed(target: Address, exc: OSError) -> Rejected:
    if exc.errno in _CONNECT_ERRNOS:
        return _unavailable(connect_failure(target, exc.errno))
    return Rejected("early-data", f"sending the bytes after the header: {exc}")


def _read_error(exc: OSError) -> Rejected:
    return Rejected("balancer-error", f"reading the header: {exc.strerror or exc}")


def _closed_before_header(data: bytes) -> Rejected:
    if not data:
        # A balancer's plain TCP health check: connect, then close.
        return Rejected("probe", "balancer closed the connection without sending")
    return Rejected(
        "closed-before-header",
        f"balancer closed the connection after {len(data)} bytes, before a full header",
    )


def _target(info: ConnInfo) -> Address:
    assert info.target is not None  # set by _start_upstream before any connect
    return info.target


def _format_peer(peer: tuple[str, int]) -> str:
    return str(Address(peer[0], peer[1]))


def _record_fields(info: ConnInfo) -> dict[str, object]:
    """Journal fields (upper case) so that `journalctl CLIENT_ADDR=...` finds a record."""
    fields: dict[str, object] = {"LB_ADDR": info.balancer[0], "LB_PORT": info.balancer[1]}
    if info.client is not None:
        fields["CLIENT_ADDR"] = info.client.host
        fields["CLIENT_PORT"] = info.client.port
    if info.target is not None:
        fields["TARGET_ADDR"] = str(info.target)
    if info.unique_id is not None:
        fields["UNIQUE_ID"] = info.unique_id.hex()
    return fields

"""The forwarder: accept balancer connections, read the PROXY header, connect to the
application with the client's address, and hand the pair to the relay.

One thread does it all: the relay's epoll loop also accepts, and does the whole
hand-shake at once when nothing has to wait (the usual case: the header came with the
connection, the local target accepts at once); a connection that must wait (a header
still on its way, a slow target) is watched by the same loop with a deadline, so the
loop never waits on a client. Several worker processes (mmproxy.supervisor) each run one.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmproxy import _splice
from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.localaddr import LocalAddresses
from mmproxy.networks import AllowedNetworks
from mmproxy.policy import Claims, Rejected
from mmproxy.proxy_protocol import (
    PP2_TYPE_UNIQUE_ID,
    IncompleteHeader,
    InvalidHeader,
    parse,
)
from mmproxy.ratelimit import RateLimitedLog
from mmproxy.relay import Connection, Relay
from mmproxy.stats import Details, OpenConnection, Rejection, TcpStats, close_label
from mmproxy.transparent import (
    UpstreamError,
    connect_failure,
    errno_name,
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
_DEFER_ACCEPT = 1  # s (TCP_DEFER_ACCEPT)
_BALANCERS_REMEMBERED = 4096  # balancer addresses let through, for the C hand-shake
RECENT_REJECTIONS = 20  # how many `mmproxy status` shows


class Step(enum.Enum):
    """Where a hand-shake waits, if it must."""

    HEADER = "header"  # for the rest of the PROXY header
    CONNECT = "connect"  # for the target to accept
    EARLY = "early"  # to send the bytes that came after the header


@dataclass(frozen=True)
class _Gate:
    """What one config lets through: the balancers' networks, the balancer addresses
    already let through, and the claims (for the C hand-shake to repeat)."""

    allowed: AllowedNetworks
    balancers: dict[str, bool]  # by address
    claims: Claims


@dataclass(slots=True, eq=False)
class Handshake:
    """One connection from accept to the relay: where its hand-shake stands and what its
    record will say. The relay keeps it as the connection's opaque `info`."""

    balancer: tuple[str, int]
    client_fd: int
    upstream_fd: int | None = None
    step: Step = Step.HEADER
    pending: bytes = b""  # the header so far; then the bytes after it still to send
    early: int = 0  # how many bytes came after the header (relayed as bytes in)
    deadline: float = 0.0  # of the step that waits; 0: nothing waited yet
    client: Address | None = None  # the source the application sees; None: this host
    target: Address | None = None
    unique_id: bytes | None = None
    health_check: bool = False  # LOCAL / UNKNOWN: the balancer speaks for itself


class Forwarder:
    """Accepts on the given listening sockets until stopped."""

    def __init__(self, config: Config, listeners: Sequence[socket.socket]) -> None:
        self.config = config
        self.stats = TcpStats()
        self._listeners = list(listeners)
        self._local = LocalAddresses()
        self._gate = _Gate(config.allowed(), {}, Claims(config, self._local))
        self._rejections = RateLimitedLog()
        # (time, balancer, client, reason, detail) of the last rejections, for the status
        self._recent: deque[tuple[float, tuple[str, int], Address | None, str, str]] = deque(
            maxlen=RECENT_REJECTIONS
        )
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
            # A client is accepted once its first bytes (the header) are there, so the C
            # hand-shake finds them in its first read; one that sends nothing is accepted
            # after about a second all the same, and a close (a health check) at once.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _DEFER_ACCEPT)
            if self.config.tcp_keepalive:
                set_keepalive(sock)
        for sock in self._listeners:
            self._relay.add_listener(sock.fileno(), functools.partial(self._accept_all, sock))
        self._relay.on_tick = self._tick
        self._relay.tick_interval = min(self.heartbeat_interval / 2 or 1.0, 1.0)
        self._relay.start()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config to new connections; established ones are untouched."""
        # One assignment: the relay thread reads one gate per step, never one half
        # old and one half new (a balancer let through by the old allowed_networks
        # must not be remembered for the new config).
        self._gate = _Gate(config.allowed(), {}, Claims(config, self._local))
        self.config = config
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
        """Accept a batch (one epoll wake-up serves many clients; the batch limit keeps the
        heartbeat and other listeners served). The C hand-shake relays at once the
        clients whose every decision was already made here (a known balancer, a header
        the pre-parser takes, a claim the policy let through); the others come back."""
        stats = self.stats
        room = self.config.max_connections - stats.active
        if self._stopping:
            return
        if room <= 0:
            # Leave the rest in the backlog; _released() resumes accepting.
            self._paused = True
            self._relay.listening(False)
            return
        config, gate = self.config, self._gate
        relayed, v2, handed_back, error, lost = _splice.handshake(
            self._relay.core, listener.fileno(), min(room, _ACCEPT_BATCH), _RECV_SIZE,
            gate.balancers, gate.claims.fresh(), config.mark, config.tcp_keepalive,
            Connection,
        )  # fmt: skip
        if relayed:
            stats.accepted += relayed
            stats.active += relayed
            stats.total += relayed
            if relayed > v2:
                stats.headers[1, "PROXY"] += relayed - v2
            if v2:
                stats.headers[2, "PROXY"] += v2
        for item in handed_back:
            try:
                self._handed_back(item)
            except Exception:  # a bug: the rest of the batch is still served
                stats.errors["handshake"] += 1
                log.exception("unexpected error with a client of the C hand-shake")
        if lost:
            stats.errors["handshake"] += lost
            log.error("lost %d connections to an internal error (out of memory?)", lost)
        if error:
            self._accept_failed(OSError(error, os.strerror(error)))
        elif stats.active >= config.max_connections and not self._paused:
            # Full: stop listening now, not at the next client's wake-up, which (with
            # EPOLLEXCLUSIVE) may go to another worker and leave this one's share idle.
            self._paused = True
            self._relay.listening(False)

    def _handed_back(self, item: _splice.HandedBack) -> None:
        """A client the C hand-shake left to Python, at the step where it stopped."""
        fd, host, port, data, fast, error, upstream, sent = item
        balancer = (host, port)
        if data is None and not error:
            self._admit(fd, balancer)  # a balancer not let through yet: checked first
            return
        stats = self.stats
        stats.accepted += 1
        stats.active += 1
        stats.total += 1
        hs = Handshake(balancer, fd)
        try:
            if data is None:
                if error == errno.EAGAIN:
                    self._wait(hs, Step.HEADER)
                else:
                    self._fail(hs, _read_error(OSError(error, os.strerror(error))))
            elif upstream < 0:
                self._received(hs, data, fast)
            else:
                assert fast is not None
                hs.upstream_fd = upstream
                self._sending(hs, data, fast, sent)
        except Exception as exc:  # a bug must cost one connection, not the acceptor
            self._internal_error(hs, exc)

    def _sending(self, hs: Handshake, data: bytes, fast: _splice.HeaderValue, sent: int) -> None:
        """The C hand-shake connected and sent `sent` early bytes; the rest must wait."""
        version, command, family, source, destination, length = fast
        self.stats.headers[version, command] += 1
        hs.early = len(data) - length
        hs.pending = data[length + sent :]
        try:
            hs.client, hs.target = self._gate.claims.route(
                command, family, source, destination, hs.balancer
            )
        except Rejected as exc:  # this host's addresses changed in between
            self._fail(hs, exc)
            return
        self._wait(hs, Step.EARLY)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds or memory, or an error nothing expects (EINVAL from a listener shut
        down under us): say so, pause accepting a while, and carry on."""
        name = errno_name(exc.errno or 0)
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
        self.stats.accepted += 1
        gate = self._gate
        if balancer[0] not in gate.allowed:
            os.close(client)  # before reading a byte: an untrusted peer may not send a header
            self._reject(
                Handshake(balancer, -1),
                Rejected("untrusted-balancer", "peer is not in allowed_networks"),
            )
            return
        if len(gate.balancers) >= _BALANCERS_REMEMBERED:
            gate.balancers.clear()
        gate.balancers[balancer[0]] = True  # the C hand-shake serves it from now on
        stats = self.stats
        stats.active += 1
        stats.total += 1
        hs = Handshake(balancer, client)
        try:
            self._read_header(hs)
        except Exception as exc:  # a bug must cost one connection, not the acceptor
            self._internal_error(hs, exc)

    # --- hand-shake ------------------------------------------------------------------
    # All of it runs on the relay thread. Usually the header came with the connection and
    # the local target accepts at once, so nothing waits; a step that must wait (a header
    # still on its way, a connect under way) has the loop watch the socket and resumes
    # when it is ready (Relay.watch), with the header or connect timeout as its deadline.
    # No thread hand-off, hence no GIL hand-off, on any path. Every step takes the
    # connection's Handshake and nothing else.

    def _read_header(self, hs: Handshake) -> None:
        """Read what the client sent so far. The C pre-parser takes the usual header (whole
        in the first read, no TLVs) at once; anything else goes through the codec."""
        try:
            chunk, fast = _splice.read_header(hs.client_fd, _RECV_SIZE)
        except BlockingIOError:
            self._wait(hs, Step.HEADER)
            return
        except OSError as exc:
            self._fail(hs, _read_error(exc))
            return
        self._received(hs, chunk, fast)

    def _received(self, hs: Handshake, chunk: bytes, fast: _splice.HeaderValue | None) -> None:
        if not chunk:
            self._fail(hs, _closed_before_header(hs.pending))
            return
        if fast is not None and not hs.pending:
            version, command, family, source, destination, length = fast
            hs.pending = chunk[length:]
            hs.early = len(hs.pending)
            self._connect(hs, version, command, family, source, destination, None)
            return
        data = hs.pending + chunk
        try:
            header = parse(data)
        except IncompleteHeader:
            hs.pending = data
            self._wait(hs, Step.HEADER)
            return
        except InvalidHeader as exc:
            self._fail(hs, _invalid_header(exc))
            return
        hs.pending = data[header.length :]
        hs.early = len(hs.pending)
        unique_id = header.tlv(PP2_TYPE_UNIQUE_ID) if header.tlvs else None
        self._connect(
            hs, header.version, header.command, header.family, header.source,
            header.destination, unique_id,
        )  # fmt: skip

    def _connect(
        self,
        hs: Handshake,
        version: int,
        command: str,
        family: str,
        source: tuple[str, int] | None,
        destination: tuple[str, int] | None,
        unique_id: bytes | None,
    ) -> None:
        """Route the header's claim (mmproxy.policy) and start the connect to the target."""
        hs.deadline = 0.0  # the connect timeout starts now
        config = self.config
        self.stats.headers[version, command] += 1
        hs.unique_id = unique_id
        hs.health_check = command == "LOCAL" or family == "UNKNOWN"
        try:
            hs.client, hs.target = self._gate.claims.route(
                command, family, source, destination, hs.balancer
            )
            hs.upstream_fd = start_upstream(
                hs.target, hs.client, config.mark, config.tcp_keepalive, bool(hs.pending)
            )
        except Rejected as exc:
            self._fail(hs, exc)
            return
        except UpstreamError as exc:
            self._fail(hs, _unavailable(exc))
            return
        if hs.pending:
            self._send_early(hs)
        else:
            self._await_connect(hs)

    def _send_early(self, hs: Handshake) -> None:
        """Send the bytes that came after the header. Sent at once, they also prove the
        connect done, which spares a poll() and a getsockopt(): a socket still connecting
        says EAGAIN, one whose connect failed gives the reason."""
        assert hs.upstream_fd is not None
        try:
            sent = os.write(hs.upstream_fd, hs.pending)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(hs, _early_send_failed(_target(hs), exc))
            return
        hs.pending = hs.pending[sent:]
        if hs.pending:
            self._wait(hs, Step.EARLY)
            return
        self._established(hs)

    def _await_connect(self, hs: Handshake) -> None:
        assert hs.upstream_fd is not None
        try:
            connected = finish_upstream(hs.upstream_fd, _target(hs), 0)
        except UpstreamError as exc:
            self._fail(hs, _unavailable(exc))
            return
        if connected:
            self._established(hs)
        else:
            self._wait(hs, Step.CONNECT)

    def _wait(self, hs: Handshake, step: Step) -> None:
        """Have the relay resume `hs` at `step` when its socket is ready, or fail it at
        its deadline (the header timeout, or the connect timeout for the target)."""
        hs.step = step
        if step is Step.HEADER:
            fd, events, timeout = (
                hs.client_fd,
                select.EPOLLIN | select.EPOLLRDHUP,
                (self.config.header_timeout),
            )
        else:
            assert hs.upstream_fd is not None
            fd, events, timeout = hs.upstream_fd, select.EPOLLOUT, self.config.connect_timeout
        hs.deadline = hs.deadline or time.monotonic() + timeout
        self._relay.watch(
            fd, events, hs.deadline, functools.partial(self._resume, hs),
            functools.partial(self._expire, hs),
        )  # fmt: skip

    def _resume(self, hs: Handshake) -> None:
        try:
            if hs.step is Step.HEADER:
                self._read_header(hs)
            elif hs.step is Step.CONNECT:
                self._await_connect(hs)
            else:
                self._send_early(hs)
        except Exception as exc:  # a bug must cost one connection, not the relay
            self._internal_error(hs, exc)

    def _expire(self, hs: Handshake) -> None:
        if hs.step is Step.HEADER:
            timeout = self.config.header_timeout
            reason = Rejected(
                "header-timeout",
                f"no complete PROXY header within {timeout:g} s ({len(hs.pending)} bytes received)",
            )
        else:
            timeout = self.config.connect_timeout
            reason = _unavailable(
                UpstreamError(
                    f"target {_target(hs)} did not answer within {timeout:g} s", code="ETIMEDOUT"
                )
            )
        try:
            self._fail(hs, reason)
        except Exception as exc:  # a bug must cost one connection, not the relay
            self._internal_error(hs, exc)

    def _internal_error(self, hs: Handshake, exc: Exception) -> None:
        log.exception("unexpected error during a hand-shake")
        self._fail(hs, Rejected("internal-error", repr(exc)))

    def _established(self, hs: Handshake) -> None:
        assert hs.upstream_fd is not None
        hs.pending = b""
        self._relay.add(Connection(hs.client_fd, hs.upstream_fd, hs, hs.early))

    def _fail(self, hs: Handshake, reason: Rejected) -> None:
        try:
            os.close(hs.client_fd)
        except OSError:
            pass  # a bug closed it already (an internal error after the close)
        if hs.upstream_fd is not None:
            os.close(hs.upstream_fd)
            hs.upstream_fd = None
        self.stats.active -= 1
        self._released()
        self._reject(hs, reason)

    def _released(self) -> None:
        """A connection ended: accept again if that was the limit."""
        if self._paused and self.stats.active < self.config.max_connections:
            self._paused = False
            if not self._stopping:
                self._relay.listening(True)

    def _reject(self, info: Handshake, exc: Rejected) -> None:
        stats = self.stats
        stats.rejected[exc.reason] += 1
        if exc.code:
            stats.connect_errors[exc.code] += 1
        if exc.reason != "probe":  # a balancer's health checks would crowd the others out
            self._recent.append((time.time(), info.balancer, info.client, exc.reason, str(exc)))
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

    # --- for `mmproxy status` (any thread but the relay's) ------------------------------

    def details(self, limit: int) -> Details:
        """The `limit` oldest open connections (their bytes so far, asked of the relay
        loop) and the last rejections."""
        conns = self._relay.connections()
        conns.sort(key=lambda c: c[0].started)
        listed = tuple(_open_connection(conn, nin, nout) for conn, nin, nout in conns[:limit])
        rejections = tuple(
            Rejection(at, _format_peer(lb), str(client or ""), reason, detail)
            for at, lb, client, reason, detail in list(self._recent)  # a C-level copy
        )
        return Details(listed, rejections, max(0, len(conns) - limit))

    # --- end of a connection (relay thread) ------------------------------------------

    def _on_close(self, conn: Connection, reason: str) -> None:
        nin, nout = conn.bytes_in, conn.bytes_out
        stats = self.stats
        stats.active -= 1
        stats.bytes_in += nin
        stats.bytes_out += nout
        stats.closed[close_label(reason)] += 1
        if self._paused:
            self._released()
        if self.config.log_connections != "all" or not log.isEnabledFor(logging.INFO):
            return
        info = _handshake_of(conn.info)
        duration = time.monotonic() - conn.started
        fields = _record_fields(info)
        fields.update(BYTES_IN=nin, BYTES_OUT=nout, DURATION=f"{duration:.3f}", CLOSE_REASON=reason)
        source = "health check" if info.health_check else info.client
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
    return Rejected("target-unavailable", str(exc), exc.code)


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


def _target(info: Handshake) -> Address:
    assert info.target is not None  # set by _start_upstream before any connect
    return info.target


def _handshake_of(info: object) -> Handshake:
    """A connection's Handshake; the C hand-shake gives a tuple instead (see
    _splice.handshake), made into one only when a record or the status needs it."""
    if isinstance(info, Handshake):
        return info
    assert isinstance(info, tuple)
    lb_host, lb_port, host, port, (target_host, target_port), _version = info
    return Handshake(
        (lb_host, lb_port), -1, client=Address(host, port), target=Address(target_host, target_port)
    )


def _open_connection(conn: Connection, nin: int, nout: int) -> OpenConnection:
    info = _handshake_of(conn.info)
    client = "health check" if info.health_check else str(info.client or "this host")
    return OpenConnection(
        client, _format_peer(info.balancer), str(info.target), nin, nout, conn.started
    )


def _format_peer(peer: tuple[str, int]) -> str:
    return str(Address(peer[0], peer[1]))


def _record_fields(info: Handshake) -> dict[str, object]:
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

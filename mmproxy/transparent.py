"""Transparent sockets: connect to the application with the client's address as source.

Linux lets a socket with IP_TRANSPARENT bind an address this host does not own; the
replies find their way back only through the policy routing that the README describes
(a `local` route in a table the marked or loopback-sourced replies are sent to).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct

from mmproxy import _splice
from mmproxy.address import Address

log = logging.getLogger("mmproxy")

# Python 3.11's socket module lacks some of these on some builds: the kernel's numbers.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)


class UpstreamError(Exception):
    """The connection to the application could not be opened; the message says why.
    `denied`: the kernel refused for want of a privilege (CAP_NET_ADMIN); `code`: the
    errno's name (ETIMEDOUT for a target that did not answer in time), or ""."""

    def __init__(self, message: str, denied: bool = False, code: str = "") -> None:
        super().__init__(message)
        self.denied = denied
        self.code = code


def errno_name(error: int) -> str:
    return errno.errorcode.get(error, f"errno-{error}")


# Keepalive: a peer that vanished (power loss, a dropped NAT entry) is found after
# 60 s idle + 6 probes 10 s apart, instead of the kernel's default of over two hours.
KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 6))


def set_keepalive(sock: socket.socket) -> None:
    """Turn TCP keepalive on; set on a listening socket, accepted sockets inherit it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def start_upstream(
    target: Address,
    source: Address | None,
    mark: int,
    keepalive: bool = False,
    data_follows: bool = False,
) -> int:
    """A non-blocking socket (its fd) whose connect to `target` is under way (or done).

    The client's port is kept when it is free; a port in use (another connection from the
    same client port to the same target, or one in TIME_WAIT) falls back to an ephemeral one.
    `data_follows`: the caller sends as soon as it is connected, so the hand-shake's last
    ACK may wait for that data and go with it: on a connecting socket TCP_DEFER_ACCEPT
    holds it back (Linux; what HAProxy's tcp-smart-connect does with TCP_QUICKACK), so the
    application is woken once, with its data, and one packet fewer crosses the stack.
    Never without data to send: the ACK would wait for the delayed-ACK timer (40 ms).
    The socket is made in C (mmproxy._splice.connect): one call instead of about ten.
    """
    options = (_splice.CONNECT_KEEPALIVE if keepalive else 0) | (
        _splice.CONNECT_DEFER_ACK if data_follows else 0
    )
    family, host, port = target.family, target.host, target.port
    if source is None:
        fd, step, error = _splice.connect(family, None, 0, host, port, 0, options)
    else:
        fd, step, error = _splice.connect(
            family, source.host, source.port, host, port, mark, options | _splice.CONNECT_KEEP_PORT
        )
        if fd < 0 and _port_busy(source, step, error):
            fd, step, error = _splice.connect(family, source.host, 0, host, port, mark, options)
    if fd < 0:
        denied = step in ("transparent", "mark") and error in _NO_PRIVILEGE
        message = _describe_failure(target, source, mark, step, error)
        raise UpstreamError(message, denied, errno_name(error))
    return fd


def _port_busy(source: Address, step: str, error: int) -> bool:
    """Whether keeping the client's port is what failed (a port in use, in TIME_WAIT
    towards the same target, or below 1024 without CAP_NET_BIND_SERVICE)."""
    if step == "bind" and error == errno.EACCES:
        _privileged_port(source)
        return True
    return (step, error) in _PORT_BUSY


_PORT_BUSY = {("bind", errno.EADDRINUSE), ("connect", errno.EADDRNOTAVAIL),
              ("connect", errno.EADDRINUSE)}  # fmt: skip
_NO_PRIVILEGE = (errno.EPERM, errno.EACCES)


def _describe_failure(
    target: Address, source: Address | None, mark: int, step: str, error: int
) -> str:
    if step == "connect":
        return _describe_connect_error(target, error)
    if step == "transparent":
        if error in _NO_PRIVILEGE:
            return "cannot set IP_TRANSPARENT: the process needs CAP_NET_ADMIN"
        return f"cannot set IP_TRANSPARENT: {os.strerror(error)}"
    if step == "mark":
        if error in _NO_PRIVILEGE:
            return f"cannot set SO_MARK {mark}: the process needs CAP_NET_ADMIN"
        return f"cannot set SO_MARK {mark}: {os.strerror(error)}"
    if step == "bind":
        return f"cannot bind the client address {source}: {os.strerror(error)}"
    if step == "address":
        return f"cannot connect to target {target} from {source}: not an IP address"
    return f"cannot open a socket to {target}: {os.strerror(error)}"


def probe_upstream(target: Address, source: Address | None, mark: int, timeout: float) -> None:
    """Connect to `target` (from `source` when given, else from this host), waiting up to
    `timeout` s, then reset the connection before the
    application can accept it: the hand-shake's last ACK is held back (TCP_DEFER_ACCEPT
    on the connecting socket) and the socket is closed with a RST (SO_LINGER 0). So a
    self-check costs the application nothing: sshd would fork and re-execute itself for
    a connection it accepts, and log it, at every start."""
    fd = start_upstream(target, source, mark, data_follows=True)
    with socket.socket(fileno=fd) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        finish_upstream(fd, target, timeout)


def finish_upstream(fd: int, target: Address, timeout: float) -> bool:
    """Wait up to `timeout` s for the connect of socket `fd`; True once connected. With
    timeout 0 it only looks (False: still under way); otherwise running out of time is
    an UpstreamError."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(timeout * 1000):
        if timeout == 0:
            return False
        message = f"target {target} did not answer within {timeout:g} s"
        raise UpstreamError(message, code="ETIMEDOUT")
    error = _splice.socket_error(fd)
    if error:
        raise UpstreamError(_describe_connect_error(target, error), code=errno_name(error))
    return True


def open_datagram(target: Address, source: Address | None, mark: int) -> socket.socket:
    """A non-blocking UDP socket connected to `target`, bound to `source` when given
    (spoofed), else to an address of this host.

    Connected, so that the kernel delivers to it only the target's replies. The client's
    port is kept when free; when another flow holds it (the same client behind two
    balancers), the kernel picks a port: never SO_REUSEADDR, which would let two sockets
    share one 4-tuple and the replies of one reach the other.
    """
    try:
        sock = socket.socket(target.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        raise UpstreamError(f"cannot open a UDP socket to {target}: {exc.strerror}") from exc
    try:
        if source is not None:
            _make_transparent(sock, target.family, mark)
            try:
                sock.bind((source.host, source.port))
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    _privileged_port(source)
                elif exc.errno != errno.EADDRINUSE:
                    raise
                sock.bind((source.host, 0))
        sock.connect(target.sockaddr)
    except UpstreamError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise UpstreamError(f"cannot open a UDP flow to {target}: {exc.strerror}") from exc
    return sock


def _make_transparent(sock: socket.socket, family: int, mark: int) -> None:
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except PermissionError as exc:
        raise UpstreamError(
            "cannot set IP_TRANSPARENT: the process needs CAP_NET_ADMIN", denied=True
        ) from exc
    if mark:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except PermissionError as exc:
            raise UpstreamError(
                f"cannot set SO_MARK {mark}: the process needs CAP_NET_ADMIN", denied=True
            ) from exc


def connect_failure(target: Address, error: int) -> UpstreamError:
    """The UpstreamError for a connect that failed with errno `error`."""
    return UpstreamError(_describe_connect_error(target, error), code=errno_name(error))


_warned_privileged_port = False


def _privileged_port(source: Address) -> None:
    """A client port below 1024 needs CAP_NET_BIND_SERVICE: without it the client is
    still served, from a port the kernel picks; say so once, not per connection."""
    global _warned_privileged_port
    if not _warned_privileged_port:
        _warned_privileged_port = True
        log.warning(
            "client %s: ports below 1024 need CAP_NET_BIND_SERVICE, which this process "
            "lacks; such clients get a port the kernel picks (the address is kept)",
            source,
        )


def _describe_connect_error(target: Address, error: int) -> str:
    if error == errno.ECONNREFUSED:
        return f"target {target} refused the connection (is the application running?)"
    return f"cannot connect to target {target}: {os.strerror(error)}"

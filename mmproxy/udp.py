"""UDP: PROXY v2 datagrams from the balancer, relayed from the client's own address.

Every datagram carries its own PROXY v2 header (the specification puts header and
payload in one datagram). A flow is one client address seen through one balancer: it owns
a transparent UDP socket bound to the client's address and connected to the target, so the
application sees the client, and its replies come back to that socket (the policy routing
sends them to `lo`). They go on to the balancer, without a header, from the listening
socket and from the address the balancer sent to. A flow ends after `udp_idle_timeout`
without a datagram either way.

One epoll thread does all of it: a datagram needs no hand-shake, so nothing waits. A
balancer repeats the same header for every datagram of a flow, so once a header has been
checked its exact bytes, from that balancer, lead straight to the flow (until a reload).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmproxy.config import Address, Config
from mmproxy.forwarder import RateLimitedLog
from mmproxy.policy import UDP_FAMILIES, Rejected, route
from mmproxy.proxy_protocol import V2_SIGNATURE, ProxyProtocolError, parse
from mmproxy.transparent import LocalAddresses, UpstreamError, open_datagram, unmap

log = logging.getLogger("mmproxy")

# Python 3.11's socket module lacks some of these: the kernel's numbers (linux/in.h, in6.h).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr
_IN6_PKTINFO = struct.Struct("=16si")  # ipi6_addr, ipi6_ifindex

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
LISTENER_RECEIVE_BUFFER = 4 << 20
MAX_DATAGRAM = 65535  # larger than any UDP payload over IPv4 or IPv6 (without jumbograms)
_ANCILLARY_SIZE = socket.CMSG_SPACE(_IN6_PKTINFO.size)  # room for either family's pktinfo
_BATCH = 64  # datagrams from one listener per wake-up, so that the flows get their turn
_SWEEP_INTERVAL = 1.0

Ancillary = list[tuple[int, int, bytes]]


@dataclass
class UdpStats:
    """Live counters, read by the status reporter and the tests."""

    flows: int = 0
    total: int = 0
    packets_in: int = 0  # balancer -> application
    packets_out: int = 0  # application -> balancer
    bytes_in: int = 0  # payload only, headers not counted
    bytes_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop(self, reason: str) -> None:
        with self.lock:
            self.dropped[reason] += 1

    def summary(self) -> str:
        with self.lock:
            dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"udp: {self.flows} flows, {self.total} total, dropped: {dropped}, "
            f"{self.packets_in} packets ({self.bytes_in} bytes) in, "
            f"{self.packets_out} packets ({self.bytes_out} bytes) out"
        )


@dataclass(eq=False)
class _Listener:
    sock: socket.socket
    wildcard: bool  # bound to 0.0.0.0 or [::]: replies must say which address they are from


@dataclass(slots=True, eq=False)
class Flow:
    key: tuple[object, ...]
    known_as: tuple[object, ...] | None  # its entry in the checked-headers table
    listener: _Listener
    balancer: tuple[object, ...]  # the sockaddr the datagrams came from: replies go there
    client: Address | None  # None: the balancer's own (LOCAL) traffic, not spoofed
    target: Address
    upstream: socket.socket
    reply_ancillary: Ancillary
    started: float
    last_seen: float
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class UdpForwarder:
    """Relays the datagrams of the UDP listeners until stop()."""

    def __init__(self, config: Config, listeners: Sequence[socket.socket]) -> None:
        self.config = config
        self.stats = UdpStats()
        self._allowed = config.allowed()
        self._local = LocalAddresses()
        self._drops = RateLimitedLog(what="datagrams dropped")
        self._epoll = select.epoll()
        self._listeners = {sock.fileno(): _Listener(sock, _prepare(sock)) for sock in listeners}
        self._flows: dict[tuple[object, ...], Flow] = {}
        self._by_fd: dict[int, Flow] = {}
        # (listener fd, balancer sockaddr, header bytes) -> flow, for headers already checked
        self._known: dict[tuple[object, ...], Flow] = {}
        self.last_loop = time.monotonic()  # the watchdog's proof that the thread is alive
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._forget_known = False
        self._thread = threading.Thread(target=self._run, name="mmproxy-udp", daemon=True)

    # --- control (main thread) ---------------------------------------------------------

    def start(self) -> None:
        for fd, listener in self._listeners.items():
            listener.sock.setblocking(False)
            self._epoll.register(fd, select.EPOLLIN)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread.start()

    def reconfigure(self, config: Config) -> None:
        """New settings for new datagrams; open flows keep their target, but every header
        is checked again (a balancer may have lost its trust)."""
        self._allowed = config.allowed()
        self.config = config
        self._forget_known = True

    def alive(self, within: float = 5.0) -> bool:
        """Whether the loop went round in the last `within` seconds (it does every 1 s)."""
        return self._thread.is_alive() and time.monotonic() - self.last_loop < within

    def stop(self) -> None:
        """Close every flow (each logs its record) and end the thread."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join()
        for flow in list(self._flows.values()):
            self._close(flow, "stopping")
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_INTERVAL
        while not self._stopping:
            events = self._epoll.poll(max(0.0, next_sweep - time.monotonic()))
            now = self.last_loop = time.monotonic()
            if self._forget_known:  # set by a reload, done here: only this thread reads it
                self._forget_known = False
                self._known.clear()
                for flow in self._flows.values():
                    flow.known_as = None
            for fd, _ in events:
                try:
                    self._ready(fd, now)
                except Exception:  # a bug must cost one datagram, never the daemon
                    log.exception("internal error while relaying UDP; continuing")
            if now >= next_sweep:
                try:
                    self._sweep(now)
                except Exception:
                    log.exception("internal error while closing idle UDP flows; continuing")
                next_sweep = now + _SWEEP_INTERVAL

    def _ready(self, fd: int, now: float) -> None:
        listener = self._listeners.get(fd)
        if listener is not None:
            self._from_balancer(listener, now)
            return
        flow = self._by_fd.get(fd)
        if flow is not None:
            self._from_target(flow, now)

    def _sweep(self, now: float) -> None:
        idle = self.config.udp_idle_timeout
        for flow in [f for f in self._flows.values() if now - f.last_seen >= idle]:
            self._close(flow, "idle")

    # --- balancer -> application -------------------------------------------------------

    def _from_balancer(self, listener: _Listener, now: float) -> None:
        ancillary: Ancillary = []
        for _ in range(_BATCH):
            try:
                if listener.wildcard:
                    data, ancillary, _flags, peer = listener.sock.recvmsg(
                        MAX_DATAGRAM, _ANCILLARY_SIZE
                    )
                else:
                    data, peer = listener.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ENOBUFS; the next datagram may do
                self._drop("receive-error", f"cannot receive: {exc.strerror}", None)
                return
            try:
                self._datagram(listener, data, ancillary, peer, now)
            except Rejected as exc:
                self._drop(exc.reason, str(exc), peer)

    def _datagram(
        self,
        listener: _Listener,
        data: bytes,
        ancillary: Ancillary,
        peer: tuple[object, ...],
        now: float,
    ) -> None:
        size = _v2_size(data)
        known = (listener.sock.fileno(), peer, data[:size])
        flow = self._known.get(known) if size else None
        if flow is None:
            flow, size = self._check(listener, data, ancillary, peer, now)
            if flow.known_as is not None:
                del self._known[flow.known_as]
            flow.known_as = known
            self._known[known] = flow
        payload = memoryview(data)[size:]
        self._send_upstream(flow, payload)
        flow.last_seen = now
        flow.packets_in += 1
        flow.bytes_in += len(payload)
        self.stats.packets_in += 1
        self.stats.bytes_in += len(payload)

    def _check(
        self,
        listener: _Listener,
        data: bytes,
        ancillary: Ancillary,
        peer: tuple[object, ...],
        now: float,
    ) -> tuple[Flow, int]:
        """The whole check of a header not seen before: its flow (opened if need be) and
        the header's length."""
        balancer = (unmap(str(peer[0])), peer[1])
        if balancer[0] not in self._allowed:
            raise Rejected("untrusted-balancer", "not in allowed_networks")
        try:
            header = parse(data)
        except ProxyProtocolError as exc:
            raise Rejected("invalid-header", str(exc)) from None
        if header.version != 2:
            raise Rejected(
                "invalid-header", "PROXY v1 cannot describe UDP: the balancer must send v2"
            )
        source, target = route(
            header, self.config, self._local, (balancer[0], int(str(balancer[1]))), UDP_FAMILIES
        )
        key = (listener.sock.fileno(), balancer, source)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._open(key, listener, peer, ancillary, source, target, now)
        return flow, header.length

    def _open(
        self,
        key: tuple[object, ...],
        listener: _Listener,
        peer: tuple[object, ...],
        ancillary: Ancillary,
        source: Address | None,
        target: Address,
        now: float,
    ) -> Flow:
        config = self.config
        if len(self._flows) >= config.udp_max_flows:
            raise Rejected("flow-limit", f"{len(self._flows)} flows open (udp_max_flows)")
        try:
            upstream = open_datagram(target, source, config.mark if source else 0)
        except UpstreamError as exc:
            raise Rejected("target-unavailable", str(exc)) from None
        reply = _reply_ancillary(ancillary) if listener.wildcard else []
        flow = Flow(key, None, listener, peer, source, target, upstream, reply, now, now)
        self._flows[key] = flow
        self._by_fd[upstream.fileno()] = flow
        self._epoll.register(upstream.fileno(), select.EPOLLIN)
        self.stats.flows += 1
        self.stats.total += 1
        return flow

    def _send_upstream(self, flow: Flow, payload: memoryview) -> None:
        for attempt in (1, 2):
            try:
                flow.upstream.send(payload)
                return
            except ConnectionRefusedError:
                # An earlier datagram's ICMP "port unreachable", reported now; this one
                # was not sent: one retry tells a target that came back from one still down.
                if attempt == 2:
                    raise Rejected(
                        "target-refused",
                        f"target {flow.target} refused it (is the application running?)",
                    ) from None
            except BlockingIOError:
                raise Rejected(
                    "target-busy", f"the socket buffer towards {flow.target} is full"
                ) from None
            except OSError as exc:
                raise Rejected(
                    "send-error", f"cannot send to {flow.target}: {exc.strerror}"
                ) from None

    # --- application -> balancer -------------------------------------------------------

    def _from_target(self, flow: Flow, now: float) -> None:
        # One datagram per wake-up: a flow rarely has a second one waiting, so reading on
        # to EAGAIN would cost a failed call per reply (the poll is level-triggered, so a
        # second datagram wakes the loop again).
        try:
            data = flow.upstream.recv(MAX_DATAGRAM)
        except BlockingIOError:
            return
        except ConnectionRefusedError:
            why = f"target {flow.target} refused a datagram (is the application running?)"
            self._drop("target-refused", why, flow.balancer)
            return
        except OSError as exc:
            self._close(flow, f"receive error: {exc.strerror}")
            return
        flow.last_seen = now
        try:
            if flow.reply_ancillary:
                flow.listener.sock.sendmsg([data], flow.reply_ancillary, 0, flow.balancer)
            else:
                flow.listener.sock.sendto(data, flow.balancer)
        except BlockingIOError:
            self._drop("reply-busy", "the socket buffer towards the balancer is full", None)
            return
        except OSError as exc:
            self._drop("reply-error", f"cannot reply: {exc.strerror}", flow.balancer)
            return
        flow.packets_out += 1
        flow.bytes_out += len(data)
        self.stats.packets_out += 1
        self.stats.bytes_out += len(data)

    # --- endings -----------------------------------------------------------------------

    def _close(self, flow: Flow, reason: str) -> None:
        self._flows.pop(flow.key, None)
        if flow.known_as is not None:
            self._known.pop(flow.known_as, None)
        fd = flow.upstream.fileno()
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # the epoll is closed already (stop)
        flow.upstream.close()
        self.stats.flows -= 1
        if log.isEnabledFor(logging.INFO):
            _log_record(flow, reason, time.monotonic() - flow.started)

    def _drop(self, reason: str, detail: str, peer: tuple[object, ...] | None) -> None:
        self.stats.drop(reason)
        fields: dict[str, object] = {"PROTOCOL": "udp", "CLOSE_REASON": reason}
        source = ""
        if peer is not None:
            fields.update(LB_ADDR=unmap(str(peer[0])), LB_PORT=peer[1])
            source = f" from {_format_peer(peer)}"
        self._drops.warning(reason, f"dropped a datagram{source}: {detail}", fields)


def _v2_size(data: bytes) -> int:
    """The length a v2 header at the start of `data` claims, or 0 if it is not one."""
    if len(data) < 16 or not data.startswith(V2_SIGNATURE):
        return 0
    return 16 + int.from_bytes(data[14:16], "big")


def _prepare(sock: socket.socket) -> bool:
    """Enlarge the receive buffer, and ask for each datagram's destination address when
    the socket is bound to every address: a reply must leave from the address the balancer
    sent to, or the balancer (or a NAT on the way) will not match it with its request.
    True when asked."""
    _enlarge_receive_buffer(sock)
    host = sock.getsockname()[0]
    if not ipaddress.ip_address(host).is_unspecified:
        return False
    if sock.family == socket.AF_INET6:
        # Also covers IPv4 on a dual-stack socket: the kernel reports it v4-mapped.
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
    return True


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    # Every balancer's datagrams queue on this one socket: the default (208 KiB, about 90
    # full-size datagrams) overflows in a burst. CAP_NET_ADMIN, which mmproxy has, may
    # exceed net.core.rmem_max; without it the kernel caps the plain request there.
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, LISTENER_RECEIVE_BUFFER)
            return
        except OSError:
            continue


def _reply_ancillary(ancillary: Ancillary) -> Ancillary:
    """The sendmsg() data that makes a reply leave from the datagram's destination."""
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_PKTINFO and len(data) >= 12:
            _ifindex, _spec_dst, destination = _IN_PKTINFO.unpack_from(data)
            return [(level, kind, _IN_PKTINFO.pack(0, destination, bytes(4)))]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            destination, ifindex = _IN6_PKTINFO.unpack_from(data)
            # An interface only for link-local addresses, which need one.
            keep = ifindex if destination[:2] == b"\xfe\x80" else 0
            return [(level, kind, _IN6_PKTINFO.pack(destination, keep))]
    return []


def _format_peer(peer: tuple[object, ...]) -> str:
    return Address(unmap(str(peer[0])), int(str(peer[1]))).endpoint


def _log_record(flow: Flow, reason: str, duration: float) -> None:
    """One journal record per flow, with the fields `journalctl FIELD=value` finds."""
    lb_host, lb_port = unmap(str(flow.balancer[0])), flow.balancer[1]
    fields: dict[str, object] = {
        "PROTOCOL": "udp",
        "LB_ADDR": lb_host,
        "LB_PORT": lb_port,
        "TARGET_ADDR": str(flow.target),
        "PACKETS_IN": flow.packets_in,
        "PACKETS_OUT": flow.packets_out,
        "BYTES_IN": flow.bytes_in,
        "BYTES_OUT": flow.bytes_out,
        "DURATION": f"{duration:.3f}",
        "CLOSE_REASON": reason,
    }
    if flow.client is not None:
        fields.update(CLIENT_ADDR=flow.client.host, CLIENT_PORT=flow.client.port)
    log.info(
        "%s via %s -> %s (udp): %s after %.3f s, %d packets (%d bytes) in, "
        "%d packets (%d bytes) out",
        flow.client or "balancer's own traffic",
        _format_peer(flow.balancer),
        flow.target,
        reason,
        duration,
        flow.packets_in,
        flow.bytes_in,
        flow.packets_out,
        flow.bytes_out,
        extra=fields,
    )

"""UDP: datagrams from the balancer, relayed from the client's own address.

Two framings (`udp_header`):

- `v2` (default): a datagram that starts with the PROXY v2 signature is a header, with or
  without payload. Some balancers (older frp, caddy-l4; the 2026 specification) put one on
  every datagram; Cloudflare Spectrum puts one on the first datagram of a flow only, often
  as a datagram of its own, and sends the rest of the flow from the same address and port
  with no header. So a header also makes its flow the one of that balancer port, and a
  datagram without a header goes to the flow of its port (or is dropped as `no-flow`). A
  header-only datagram opens or refreshes a flow and is never forwarded.
- `spp`: Simple Proxy Protocol (Spectrum, EdgeOne): a fixed 38-byte header on every
  datagram; replies to the balancer carry the flow's header back (mmproxy/spp.py).

A flow is one client address seen through one balancer port: it owns a transparent UDP
socket bound to the client's address and connected to the target, so the application sees
the client, and its replies come back to that socket (the policy routing sends them to
`lo`). They go on to the balancer from the listening socket and from the address the
balancer sent to. A flow ends after `udp_idle_timeout` without a datagram either way; a
new one beyond `udp_max_flows` (or a balancer's `udp_max_flows_per_balancer`) closes the
least recently used flow (of that balancer, when its share is full) to make room.

One epoll thread does all of it: a datagram needs no hand-shake, so nothing waits. A
balancer repeats the same header for every datagram of a flow, so once a header has been
checked its exact bytes, from that balancer, lead straight to the flow (until a reload).
With the C part (mmproxy._splice.UdpEngine) those datagrams, the headerless ones of a
port's flow and every reply are relayed in C, in batches; what they do not match comes
back here (docs/udp-relay.md).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.localaddr import LocalAddresses, unmap
from mmproxy.policy import UDP_FAMILIES, Rejected, route
from mmproxy.proxy_protocol import V2_SIGNATURE, ProxyHeader, ProxyProtocolError, parse
from mmproxy.ratelimit import RateLimitedLog
from mmproxy.spp import HEADER_SIZE as SPP_SIZE
from mmproxy.spp import SppError
from mmproxy.spp import parse as parse_spp
from mmproxy.stats import UdpStats
from mmproxy.transparent import UpstreamError, open_datagram

try:
    from mmproxy import _splice

    _Engine = getattr(_splice, "UdpEngine", None)
except ImportError:  # without the C part: every datagram takes the Python path
    _splice = None  # type: ignore[assignment]
    _Engine = None

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
_ENGINE_ROUND = 0.25  # the C relay comes back to Python at least this often (s)
_REORDER = 0.25  # a flow's place in the LRU order is refreshed at most this often (s)
_EVICTION_SCAN = 8  # eviction picks the least recently used of the first few in that order
_V1_PREFIX = b"PROXY "

Ancillary = list[tuple[int, int, bytes]]
FlowKey = tuple[object, ...]  # (listener fd, (balancer host, port), client Address)
PortKey = tuple[int, tuple[object, ...]]  # (listener fd, the balancer's sockaddr)


@dataclass(eq=False)
class _Listener:
    sock: socket.socket
    wildcard: bool  # bound to 0.0.0.0 or [::]: replies must say which address they are from
    fd: int = -1

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()


@dataclass(slots=True, eq=False)
class Flow:
    key: FlowKey
    known_as: tuple[object, ...] | None  # its entry in the checked-headers table
    listener: _Listener
    balancer: tuple[object, ...]  # the sockaddr the datagrams came from: replies go there
    client: Address | None  # the address the application sees; None: not spoofed
    target: Address
    upstream: socket.socket
    reply_ancillary: Ancillary
    started: float
    last_seen: float
    moved: float  # when it last went to the end of the LRU order
    lb_host: str  # the balancer's address, unmapped: its share of the flow table
    group: OrderedDict[FlowKey, Flow]  # that balancer's flows, least recently used first
    reply_prefix: bytes = b""  # SPP: the header its replies carry, as last received
    owns_port: bool = False  # v2: took a header-only or headerless datagram (Spectrum)
    port: PortKey | None = None  # v2: its entry in the ports table, while it has one
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class UdpForwarder:
    """Relays the datagrams of the UDP listeners until stop()."""

    def __init__(
        self, config: Config, listeners: Sequence[socket.socket], native: bool = True
    ) -> None:
        self.config = config
        self.stats = UdpStats(framing=config.udp_header)
        self._allowed = config.allowed()
        self._spp = config.udp_header == "spp"
        self._local = LocalAddresses()
        self._drops = RateLimitedLog(what="datagrams dropped")
        self._evictions = RateLimitedLog(what="UDP flows evicted")
        self._epoll = select.epoll()
        self._listeners = {sock.fileno(): _Listener(sock, _prepare(sock)) for sock in listeners}
        # Every flow, least recently used first (to the second: see _REORDER), and the
        # same per balancer address: the order eviction and the idle sweep follow.
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        self._balancers: dict[str, OrderedDict[FlowKey, Flow]] = {}
        self._by_fd: dict[int, Flow] = {}
        # v2: the flow a datagram without a header from this balancer port belongs to
        self._ports: dict[PortKey, Flow] = {}
        # (listener fd, balancer sockaddr, header bytes) -> flow, for headers already checked
        self._known: dict[tuple[object, ...], Flow] = {}
        self.last_loop = time.monotonic()  # the watchdog's proof that the thread is alive
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._forget_known = False
        self._thread = threading.Thread(target=self._run, name="mmproxy-udp", daemon=True)
        self._engine = None
        if _Engine is not None and native:
            self._engine = _Engine(self._epoll.fileno(), self._spp)
            for fd, listener in self._listeners.items():
                self._engine.add_listener(fd, listener.wildcard)
            self.stats.native = self._engine.totals

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
        if self._engine is not None:  # nothing more on the old checks, from now
            self._engine.hold()
        self._forget_known = True
        self.stats.framing = config.udp_header

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
            timeout = max(0.0, next_sweep - time.monotonic())
            if self._engine is not None:
                now = self._run_engine(min(timeout, _ENGINE_ROUND))
            else:
                events = self._epoll.poll(timeout)
                now = self._run_events(events)
            if now >= next_sweep:
                try:
                    self._sweep(now)
                except Exception:
                    log.exception("internal error while closing idle UDP flows; continuing")
                next_sweep = now + _SWEEP_INTERVAL

    def _run_events(self, events: list[tuple[int, int]]) -> float:
        now = self.last_loop = time.monotonic()
        self._check_reload()
        for fd, _ in events:
            try:
                self._ready(fd, now)
            except Exception:  # a bug must cost one datagram, never the daemon
                log.exception("internal error while relaying UDP; continuing")
        return now

    def _run_engine(self, timeout: float) -> float:
        """One round of the C relay; what it hands back is done here, in its order."""
        assert self._engine is not None
        try:
            items = self._engine.run(timeout)
        except OSError as exc:  # epoll_wait failed: say so and go round again
            log.error("cannot wait for UDP datagrams: %s", exc.strerror)
            time.sleep(0.1)
            items = []
        now = self.last_loop = time.monotonic()
        self._check_reload()
        for item in items:
            try:
                self._engine_item(item, now)
            except Exception:  # a bug must cost one datagram, never the daemon
                log.exception("internal error while relaying UDP; continuing")
        return now

    def _engine_item(self, item: tuple[Any, ...], now: float) -> None:
        kind = item[0]
        if kind == _splice.UDP_DATAGRAM:
            _, fd, data, ancillary, peer = item
            try:
                self._datagram(self._listeners[fd], data, ancillary, peer, now)
            except Rejected as exc:
                self._drop(exc.reason, str(exc), peer)
            return
        _, fd, code = item
        if kind == _splice.UDP_LISTEN_ERROR:
            self._drop("receive-error", f"cannot receive: {os.strerror(code)}", None)
            return
        flow = self._by_fd.get(fd)
        if flow is None:
            return  # the wake-up pipe, or a flow closed since
        if kind == _splice.UDP_SEND_ERROR:
            rejected = _send_failure(flow, code)
            self._drop(rejected.reason, str(rejected), None)
        elif kind == _splice.UDP_RECV_ERROR:
            self._receive_failed(flow, OSError(code, os.strerror(code)))
        elif kind == _splice.UDP_REPLY_ERROR:
            self._reply_failed(flow, OSError(code, os.strerror(code)))

    def _check_reload(self) -> None:
        if self._forget_known:  # set by a reload, done here: only this thread reads it
            self._forget_known = False
            self._reloaded()

    def _reloaded(self) -> None:
        self._known.clear()
        if self._engine is not None:
            self._engine.forget_known()
            self._engine.set_spp(self.config.udp_header == "spp")
        for flow in self._flows.values():
            flow.known_as = None
        spp = self.config.udp_header == "spp"
        if spp != self._spp:  # a flow's replies are framed as its balancer expects
            self._spp = spp
            for flow in list(self._flows.values()):
                self._close(flow, "udp_header changed")
        # A first-datagram flow sees no header again to check: check its balancer here.
        for port, flow in list(self._ports.items()):
            if flow.lb_host not in self._allowed:
                del self._ports[port]
                flow.port = None
                self._bind_port(flow)

    def _ready(self, fd: int, now: float) -> None:
        listener = self._listeners.get(fd)
        if listener is not None:
            self._from_balancer(listener, now)
            return
        flow = self._by_fd.get(fd)
        if flow is not None:
            self._from_target(flow, now)

    def _sweep(self, now: float) -> None:
        """Close the flows quiet for udp_idle_timeout. They are all near the front of the
        order (moved <= last_seen < moved + _REORDER), before the first flow moved since
        the limit."""
        self._sync_times()
        limit = now - self.config.udp_idle_timeout
        quiet = []
        for flow in self._flows.values():  # least recently moved first
            if flow.moved > limit:
                break
            if flow.last_seen <= limit:
                quiet.append(flow)
        for flow in quiet:
            self._close(flow, "idle")

    def _sync_times(self) -> None:
        """The flows the C part relayed for since the last time are used as of then."""
        if self._engine is None:
            return
        for fd, last_seen in self._engine.touched():
            flow = self._by_fd.get(fd)
            if flow is not None and last_seen > flow.last_seen:
                self._touch(flow, last_seen)

    def _bind_port(self, flow: Flow) -> None:
        """Tell the C part whether the flow's balancer port now leads to it: only once it
        owns the port (a header alone or a headerless datagram came), as here."""
        if self._engine is not None:
            self._engine.bind_port(flow.upstream.fileno(), flow.owns_port and flow.port is not None)

    def _reorder(self, flow: Flow, now: float) -> None:
        # Not at every datagram: two moves per datagram each way cost more than a
        # least-recently-used order to the second is worth.
        flow.moved = now
        self._flows.move_to_end(flow.key)
        flow.group.move_to_end(flow.key)

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
        size = header_size(data, self._spp)
        if size == HEADERLESS:  # v2 without a header: the rest of its balancer port's flow
            self._headerless(listener, data, peer, now)
            return
        known = (listener.fd, peer, data[:size])
        flow = self._known.get(known) if size else None
        if flow is None:
            flow = self._check(listener, data, ancillary, peer, now)
            if flow.known_as is not None:
                del self._known[flow.known_as]
            flow.known_as = known
            self._known[known] = flow
            if self._spp:
                flow.reply_prefix = data[:SPP_SIZE]
            if self._engine is not None and size:
                self._engine.learn(flow.upstream.fileno(), data[:size])
        if not self._spp:
            if flow.port is None:
                self._claim_port(flow, (listener.fd, peer))
            if size >= len(data):  # a header alone (Spectrum's first datagram): no payload
                if not flow.owns_port:
                    flow.owns_port = True
                    self._bind_port(flow)
                self._touch(flow, now)
                return
        self._forward(flow, memoryview(data)[size:], now)

    def _headerless(
        self, listener: _Listener, data: bytes, peer: tuple[object, ...], now: float
    ) -> None:
        flow = self._ports.get((listener.fd, peer))
        if flow is None:
            raise self._without_flow(data, peer)
        if not flow.owns_port:
            flow.owns_port = True
            self._bind_port(flow)
        self._forward(flow, data, now)

    def _touch(self, flow: Flow, now: float) -> None:
        """The flow was used now (its place in the LRU order moves, at most every _REORDER)."""
        flow.last_seen = now
        if now - flow.moved >= _REORDER:
            self._reorder(flow, now)

    def _forward(self, flow: Flow, payload: bytes | memoryview, now: float) -> None:
        """A flow's payload to the application, counted; the flow marked as used."""
        self._send_upstream(flow, payload)
        self._touch(flow, now)
        flow.packets_in += 1
        flow.bytes_in += len(payload)
        self.stats.packets_in += 1
        self.stats.bytes_in += len(payload)

    def _claim_port(self, flow: Flow, port: PortKey) -> None:
        """v2: a header makes its flow the one of its balancer port. The port's previous
        client is replaced (closed) if it was Spectrum's kind of flow, which owns its
        port; a balancer with a header on every datagram may carry several clients on one
        port, and their flows stay until idle."""
        previous = self._ports.get(port)
        if previous is not None:
            previous.port = None
            self._bind_port(previous)
            if previous.owns_port:
                self._close(previous, "replaced")
        self._ports[port] = flow
        flow.port = port
        self._bind_port(flow)

    def _without_flow(self, data: bytes, peer: tuple[object, ...]) -> Rejected:
        """Why a datagram without a header, from a port with no flow, is dropped."""
        if unmap(str(peer[0])) not in self._allowed:
            return Rejected("untrusted-balancer", "not in allowed_networks")
        if data.startswith(_V1_PREFIX):
            return Rejected(
                "invalid-header", "PROXY v1 cannot describe UDP: the balancer must send v2"
            )
        return Rejected(
            "no-flow",
            "no PROXY header, and no flow from this balancer port: a flow starts with a "
            "datagram that carries one",
        )

    def _check(
        self,
        listener: _Listener,
        data: bytes,
        ancillary: Ancillary,
        peer: tuple[object, ...],
        now: float,
    ) -> Flow:
        """The whole check of a header not seen before: its flow, opened if need be."""
        lb_host = unmap(str(peer[0]))
        if lb_host not in self._allowed:
            raise Rejected("untrusted-balancer", "not in allowed_networks")
        header = self._parse(data)
        balancer = (lb_host, int(str(peer[1])))
        source, target = route(header, self.config, self._local, balancer, UDP_FAMILIES)
        key = (listener.fd, balancer, source)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._open(key, lb_host, listener, peer, ancillary, source, target, now)
        return flow

    def _parse(self, data: bytes) -> ProxyHeader:
        if self._spp:
            try:
                spp = parse_spp(data)
            except SppError as exc:
                raise Rejected("invalid-header", str(exc)) from None
            # As a v2 header would say it, so that one policy judges both framings.
            return ProxyHeader(2, "PROXY", spp.family, spp.client, spp.proxy, SPP_SIZE)
        try:
            header = parse(data)
        except ProxyProtocolError as exc:
            raise Rejected("invalid-header", str(exc)) from None
        if header.version != 2:
            raise Rejected(
                "invalid-header", "PROXY v1 cannot describe UDP: the balancer must send v2"
            )
        return header

    def _open(
        self,
        key: FlowKey,
        lb_host: str,
        listener: _Listener,
        peer: tuple[object, ...],
        ancillary: Ancillary,
        source: Address | None,
        target: Address,
        now: float,
    ) -> Flow:
        config = self.config
        try:
            upstream = open_datagram(target, source, config.mark if source else 0)
        except UpstreamError as exc:
            raise Rejected("target-unavailable", str(exc)) from None
        group = self._balancers.get(lb_host)
        if group is None:
            group = self._balancers[lb_host] = OrderedDict()
        self._make_room(group, lb_host)
        reply = _reply_ancillary(ancillary) if listener.wildcard else []
        if self._engine is not None:
            try:
                self._engine.add_flow(upstream.fileno(), listener.fd, peer, reply)
            except BaseException:
                upstream.close()
                raise
        flow = Flow(
            key,
            None,
            listener,
            peer,
            source,
            target,
            upstream,
            reply,
            now,
            now,
            now,
            lb_host,
            group,
        )
        self._flows[key] = flow
        group[key] = flow
        self._by_fd[upstream.fileno()] = flow
        self._epoll.register(upstream.fileno(), select.EPOLLIN)
        self.stats.flows += 1
        self.stats.total += 1
        return flow

    def _make_room(self, group: OrderedDict[FlowKey, Flow], lb_host: str) -> None:
        """Close least recently used flows until a new one fits: first the balancer's own
        (so that a flood from one balancer address costs only its share), then anyone's."""
        config = self.config
        share = min(config.udp_max_flows_per_balancer or config.udp_max_flows,
                    config.udp_max_flows)  # fmt: skip
        if len(group) >= share or len(self._flows) >= config.udp_max_flows:
            self._sync_times()  # the C part's datagrams count in the LRU order
        while len(group) >= share:
            self._evict(_least_recently_used(group), f"{lb_host} holds {len(group)} flows "
                        "(udp_max_flows_per_balancer)")  # fmt: skip
        while len(self._flows) >= config.udp_max_flows:
            self._evict(_least_recently_used(self._flows),
                        f"{len(self._flows)} flows open (udp_max_flows)")  # fmt: skip

    def _evict(self, flow: Flow, why: str) -> None:
        self.stats.evicted += 1
        idle = time.monotonic() - flow.last_seen
        fields: dict[str, object] = {
            "PROTOCOL": "udp",
            "CLOSE_REASON": "evicted",
            "LB_ADDR": flow.lb_host,
        }
        self._evictions.warning(
            "evicted",
            f"closed the least recently used UDP flow ({flow.client or 'not spoofed'} via "
            f"{_format_peer(flow.balancer)}, quiet for {idle:.1f} s) for a new one: {why}",
            fields,
        )
        self._close(flow, "evicted")

    def _send_upstream(self, flow: Flow, payload: bytes | memoryview) -> None:
        for attempt in (1, 2):
            try:
                flow.upstream.send(payload)
                return
            except ConnectionRefusedError:
                # An earlier datagram's ICMP "port unreachable", reported now; this one
                # was not sent: one retry tells a target that came back from one still down.
                if attempt == 2:
                    raise _send_failure(flow, errno.ECONNREFUSED) from None
            except OSError as exc:
                raise _send_failure(flow, exc.errno or 0) from None

    # --- application -> balancer -------------------------------------------------------

    def _from_target(self, flow: Flow, now: float) -> None:
        # One datagram per wake-up: a flow rarely has a second one waiting, so reading on
        # to EAGAIN would cost a failed call per reply (the poll is level-triggered, so a
        # second datagram wakes the loop again).
        try:
            data = flow.upstream.recv(MAX_DATAGRAM)
        except BlockingIOError:
            return
        except OSError as exc:
            self._receive_failed(flow, exc)
            return
        self._touch(flow, now)
        try:
            if flow.reply_prefix:  # SPP: the balancer strips 38 bytes from every reply
                flow.listener.sock.sendmsg(
                    [flow.reply_prefix, data], flow.reply_ancillary, 0, flow.balancer
                )
            elif flow.reply_ancillary:
                flow.listener.sock.sendmsg([data], flow.reply_ancillary, 0, flow.balancer)
            else:
                flow.listener.sock.sendto(data, flow.balancer)
        except OSError as exc:
            self._reply_failed(flow, exc)
            return
        flow.packets_out += 1
        flow.bytes_out += len(data)
        self.stats.packets_out += 1
        self.stats.bytes_out += len(data)

    def _receive_failed(self, flow: Flow, exc: OSError) -> None:
        if exc.errno == errno.ECONNREFUSED:
            why = f"target {flow.target} refused a datagram (is the application running?)"
            self._drop("target-refused", why, flow.balancer)
        elif exc.errno not in (errno.EAGAIN, errno.EINTR):
            self._close(flow, f"receive error: {exc.strerror}")

    def _reply_failed(self, flow: Flow, exc: OSError) -> None:
        if exc.errno == errno.EAGAIN:
            self._drop("reply-busy", "the socket buffer towards the balancer is full", None)
        else:
            self._drop("reply-error", f"cannot reply: {exc.strerror}", flow.balancer)

    # --- endings -----------------------------------------------------------------------

    def _close(self, flow: Flow, reason: str) -> None:
        if self._flows.pop(flow.key, None) is None:
            return  # closed already
        flow.group.pop(flow.key, None)
        if not flow.group:
            self._balancers.pop(flow.lb_host, None)
        if flow.known_as is not None:
            self._known.pop(flow.known_as, None)
        if flow.port is not None:
            del self._ports[flow.port]
        fd = flow.upstream.fileno()
        self._by_fd.pop(fd, None)
        if self._engine is not None:
            packets_in, bytes_in, packets_out, bytes_out = self._engine.remove(fd)
            flow.packets_in += packets_in
            flow.bytes_in += bytes_in
            flow.packets_out += packets_out
            flow.bytes_out += bytes_out
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


HEADERLESS = -1


def header_size(data: bytes, spp: bool) -> int:
    """The size of the header a datagram claims to start with: HEADERLESS (v2 without the
    signature), or 0 when too short to say (the full check says why). The C part reads
    the same bytes alike (tests/test_udp_engine.py holds the two together)."""
    if spp:
        return SPP_SIZE
    if not data.startswith(V2_SIGNATURE):
        return HEADERLESS
    return 16 + (data[14] << 8 | data[15]) if len(data) >= 16 else 0


def _send_failure(flow: Flow, code: int) -> Rejected:
    """Why a datagram could not be sent to the application (errno `code`)."""
    if code == errno.ECONNREFUSED:
        return Rejected(
            "target-refused", f"target {flow.target} refused it (is the application running?)"
        )
    if code == errno.EAGAIN:
        return Rejected("target-busy", f"the socket buffer towards {flow.target} is full")
    return Rejected("send-error", f"cannot send to {flow.target}: {os.strerror(code)}")


def _least_recently_used(flows: OrderedDict[FlowKey, Flow]) -> Flow:
    """Of the first flows in LRU order (least recently moved), the one quiet longest: the
    order is only refreshed every _REORDER seconds, so its head is not exact."""
    return min(itertools.islice(flows.values(), _EVICTION_SCAN), key=_last_seen)


def _last_seen(flow: Flow) -> float:
    return flow.last_seen


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

"""One instance: a configuration's forwarders (TCP and UDP), their counters and their
reload. It does not know who runs it: the single-process runner, or a worker process
under the supervisor."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mmproxy.config import Config
from mmproxy.forwarder import Forwarder
from mmproxy.log import reconfigure as reconfigure_logging
from mmproxy.log import set_connection_logging
from mmproxy.stats import Details, Snapshot, total

if TYPE_CHECKING:
    from mmproxy.udp import UdpForwarder


class Instance:
    """start() once, then reconfigure() at each reload, snapshot() for the counters,
    stop() to drain and end. `heartbeat` is called from the TCP loop every
    `heartbeat_interval` seconds (the watchdog), while the UDP loop is alive too."""

    def __init__(
        self,
        config: Config,
        listeners: Sequence[socket.socket],
        heartbeat: Callable[[], None] | None = None,
        heartbeat_interval: float = 0.0,
    ) -> None:
        self.config = config
        self._stream = [s for s in listeners if s.type != socket.SOCK_DGRAM]
        self._datagram = [s for s in listeners if s.type == socket.SOCK_DGRAM]
        self._heartbeat = heartbeat
        self._heartbeat_interval = heartbeat_interval
        self.forwarder: Forwarder | None = None
        self.udp: UdpForwarder | None = None

    def start(self) -> None:
        set_connection_logging(self.config.log_connections)
        # The TCP forwarder runs even with no TCP listener: its loop beats the watchdog.
        self.forwarder = Forwarder(self.config, self._stream)
        if self._heartbeat is not None and self._heartbeat_interval:
            self.forwarder.heartbeat = self._beat
            self.forwarder.heartbeat_interval = self._heartbeat_interval
        self.forwarder.start()
        if self._datagram:
            # Imported here: an instance without a UDP listener never needs it (a few ms
            # of every start-up, issue 15).
            from mmproxy.udp import UdpForwarder

            self.udp = UdpForwarder(self.config, self._datagram)
            self.udp.start()

    def _beat(self) -> None:
        # Pinged from the TCP loop; a wedged UDP loop withholds the ping as well.
        if self._heartbeat is not None and (self.udp is None or self.udp.alive()):
            self._heartbeat()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration (listen addresses change only at a restart)."""
        self.config = config
        reconfigure_logging(config.log_level, config.log_connections)
        if self.forwarder is not None:
            self.forwarder.reconfigure(config)
        if self.udp is not None:
            self.udp.reconfigure(config)

    def snapshot(self) -> Snapshot:
        tcp = self.forwarder.stats.snapshot() if self.forwarder and self._stream else None
        udp = self.udp.stats.snapshot() if self.udp is not None else None
        return Snapshot(tcp, udp)

    def details(self, limit: int) -> Details:
        """The oldest open connections (at most `limit`) and the last rejections; from
        any thread but the relay's (it asks the relay loop)."""
        return self.forwarder.details(limit) if self.forwarder is not None else Details()

    def summary(self) -> str:
        return total(self.snapshot()).summary()

    def stop(self, drain_timeout: float) -> None:
        """Stop taking connections and wait up to `drain_timeout` for the open ones."""
        if self.udp is not None:
            self.udp.stop()  # datagrams have no drain: nothing is in flight
        if self.forwarder is not None:
            self.forwarder.stop(drain_timeout)

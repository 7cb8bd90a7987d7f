"""The daemon's lifecycle: sockets, self-checks, ready, reload, drain and stop."""

from __future__ import annotations

import logging
import resource
import signal
import socket
import threading
from collections.abc import Callable, Sequence

from mmproxy.address import Address
from mmproxy.checks import run_checks
from mmproxy.config import Config, ConfigError
from mmproxy.forwarder import Forwarder
from mmproxy.log import reconfigure as reconfigure_logging
from mmproxy.log import set_connection_logging
from mmproxy.systemd import Notifier, listen_sockets
from mmproxy.udp import UdpForwarder
from mmproxy.workers import Supervisor, worker_count

log = logging.getLogger("mmproxy")

LISTEN_BACKLOG = 4096  # net.core.somaxconn's default on Debian 12; the kernel caps it anyway
STATUS_INTERVAL = 2.0


class ServerError(Exception):
    """The server cannot start; the message says why and what to do."""


def bind_listeners(addresses: Sequence[Address]) -> list[socket.socket]:
    """Bind (and for TCP listen on) every address, or raise ServerError naming the one
    that failed."""
    with_v4 = {(a.transport, a.port) for a in addresses if a.family == socket.AF_INET}
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(_bind_one(address, v6only=(address.transport, address.port) in with_v4))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_one(address: Address, v6only: bool) -> socket.socket:
    udp = address.transport == "udp"
    sock = socket.socket(address.family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        if not udp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            # [::] alone serves IPv4 too; beside an IPv4 listener on the same port it can't.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((address.host, address.port))
        if not udp:
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {address}: {exc.strerror}") from exc
    return sock


def raise_fd_limit(config: Config, workers: int = 1) -> int:
    """Lift the soft limit on open files to the hard one, as Go programs do by themselves:
    systemd's default soft limit (1024) would cap mmproxy near 500 connections. Returns
    the new limit; warns when the configured maxima could need more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    tcp = any(a.transport == "tcp" for a in config.listen)
    udp = any(a.transport == "udp" for a in config.listen)
    # The limit is per process: each worker holds its share of the connections.
    share = -(-config.max_connections // workers)
    needed = (2 * share if tcp else 0) + (config.udp_max_flows if udp else 0)
    if needed > soft:
        log.warning(
            "the open-file limit (%d) is below what %s may need (%d): raise LimitNOFILE= "
            "in a drop-in (systemctl edit mmproxy@.service), or lower them",
            soft,
            " and ".join(k for k, on in (("max_connections", tcp), ("udp_max_flows", udp)) if on),
            needed,
        )
    return soft


class Server:
    """Runs one instance until SIGTERM/SIGINT; SIGHUP reloads the configuration.

    `reload_config` re-reads the file with the same command-line overrides.
    """

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        instance: str | None = None,
        notifier: Notifier | None = None,
        host_checks: bool = True,
    ) -> None:
        self.config = config
        self.instance = instance
        self.host_checks = host_checks  # False: the root helper ran them (see checks.py)
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.forwarder: Forwarder | None = None
        self.udp: UdpForwarder | None = None
        self.announce = True  # log the listening sockets at start (one worker does)
        self.listeners: list[socket.socket] = []
        self._activated = False
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False

    # --- signals ---------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    # --- lifecycle -------------------------------------------------------------------

    def self_check(self) -> bool:
        """Run the checks and log them; False when a failure should stop the start."""
        results = run_checks(self.config, self.instance, self.host_checks)
        failed = [r for r in results if not r.ok]
        for result in results:
            (log.info if result.ok else log.error)("%s", result.line())
        if not failed:
            return True
        if self.config.check_failure == "warn":
            log.warning("%d self-checks failed; starting anyway (check_failure: warn)", len(failed))
            return True
        self.notifier.status(f"self-check failed: {failed[0].what}")
        log.error(
            "%d self-checks failed; not starting (set check_failure: warn to start anyway)",
            len(failed),
        )
        return False

    def open_listeners(self) -> None:
        """Take the listening sockets from systemd, or bind them."""
        activated = listen_sockets()
        self._activated = activated is not None
        self.listeners = activated if activated is not None else bind_listeners(self.config.listen)

    def start(self) -> Forwarder:
        """Take the listening sockets (unless a worker inherited them) and start forwarding."""
        if not self.listeners:
            self.open_listeners()
        datagram = [s for s in self.listeners if s.type == socket.SOCK_DGRAM]
        stream = [s for s in self.listeners if s.type != socket.SOCK_DGRAM]
        set_connection_logging(self.config.log_connections)
        self.forwarder = Forwarder(self.config, stream)
        if self.notifier.watchdog_interval:
            self.forwarder.heartbeat = self._watchdog
            self.forwarder.heartbeat_interval = self.notifier.watchdog_interval
        self.forwarder.start()
        if datagram:
            self.udp = UdpForwarder(self.config, datagram)
            self.udp.start()
        how = "from systemd" if self._activated else "bound"
        for sock in self.listeners if self.announce else ():
            log.info("listening on %s (%s)", _sockname(sock), how)
        return self.forwarder

    def _watchdog(self) -> None:
        # Pinged from the TCP loop; a wedged UDP loop withholds the ping as well.
        if self.udp is None or self.udp.alive():
            self.notifier.watchdog()

    def run(self) -> int:
        """Check, start, report ready, then serve until stopped. Returns an exit status."""
        self.install_signal_handlers()
        if not self.self_check():
            return 1
        raise_fd_limit(self.config, worker_count(self.config))
        if worker_count(self.config) > 1:
            return Supervisor(self, self._reload_config).run()
        self.start()
        self.notifier.ready(self.status())
        while True:
            self._wake.wait(STATUS_INTERVAL)
            self._wake.clear()
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self.notifier.status(self.status())
        self.notifier.stopping(f"stopping: {self.status()}")
        log.info(
            "stopping: %s; waiting up to %g s for open connections",
            self.status(),
            self.config.drain_timeout,
        )
        self.shutdown()
        return 0

    def status(self) -> str:
        assert self.forwarder is not None
        if self.udp is None:
            return self.forwarder.stats.summary()
        if all(s.type == socket.SOCK_DGRAM for s in self.listeners):
            return self.udp.stats.summary()
        return f"{self.forwarder.stats.summary()}; {self.udp.stats.summary()}"

    def reload(self) -> None:
        """Re-read the configuration; a bad one keeps the running one and says why."""
        if self._reload_config is None or self.forwarder is None:
            return
        new = reread(self._reload_config, self.notifier, self.status)
        if new is None:
            return
        if new.listen != self.config.listen and not self._activated:
            log.warning("listen addresses changed: they take effect at the next restart")
        self.config = new
        reconfigure_logging(new.log_level, new.log_connections)
        self.forwarder.reconfigure(new)
        if self.udp is not None:
            self.udp.reconfigure(new)
        log.info("configuration reloaded from %s", new.path or "the command line")
        self.notifier.ready(self.status())

    def shutdown(self) -> None:
        if self.udp is not None:
            self.udp.stop()  # datagrams have no drain: nothing is in flight
        if self.forwarder is not None:
            self.forwarder.stop(self.config.drain_timeout)
        for sock in self.listeners:
            sock.close()


def reread(
    reload_config: Callable[[], Config], notifier: Notifier, status: Callable[[], str]
) -> Config | None:
    """The reloaded configuration, or None when it is bad: then the running one stays,
    and the journal and systemd's status say why."""
    notifier.reloading()
    try:
        return reload_config()
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        notifier.ready(f"reload failed: {exc}; {status()}")
        return None


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port, "udp" if sock.type == socket.SOCK_DGRAM else "tcp"))

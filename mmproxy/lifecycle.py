"""The start-up and reload steps that the single-process runner and the supervisor
share: self-checks, the listening sockets, the open-file limit, re-reading the
configuration. Written once, below both."""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Callable, Sequence

from mmproxy.address import Address
from mmproxy.checks import run_checks
from mmproxy.config import Config, ConfigError
from mmproxy.observe import ObserveError, Observer, Source
from mmproxy.systemd import Notifier, listen_sockets

log = logging.getLogger("mmproxy")

LISTEN_BACKLOG = 4096  # net.core.somaxconn's default on Debian 12; the kernel caps it anyway


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def self_check(config: Config, instance: str | None, host: bool, notifier: Notifier) -> bool:
    """Run the checks and log them; False when a failure should stop the start. `host`:
    the routing checks too (False when the root helper ran them, see checks.py)."""
    results = run_checks(config, instance, host)
    failed = [r for r in results if not r.ok]
    for result in results:
        (log.info if result.ok else log.error)("%s", result.line())
    if not failed:
        return True
    if config.check_failure == "warn":
        log.warning("%d self-checks failed; starting anyway (check_failure: warn)", len(failed))
        return True
    notifier.status(f"self-check failed: {failed[0].what}")
    log.error(
        "%d self-checks failed; not starting (set check_failure: warn to start anyway)",
        len(failed),
    )
    return False


def open_listeners(config: Config) -> tuple[list[socket.socket], bool]:
    """The listening sockets from systemd (True), or bound here (False)."""
    activated = listen_sockets()
    if activated is not None:
        return activated, True
    return bind_listeners(config.listen), False


def announce(listeners: Sequence[socket.socket], activated: bool) -> None:
    how = "from systemd" if activated else "bound"
    for sock in listeners:
        log.info("listening on %s (%s)", _sockname(sock), how)


def bind_listeners(addresses: Sequence[Address]) -> list[socket.socket]:
    """Bind (and for TCP listen on) every address, or raise StartError naming the one
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
        raise StartError(f"cannot listen on {address}: {exc.strerror}") from exc
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


def reload(
    current: Config,
    reload_config: Callable[[], Config] | None,
    notifier: Notifier,
    status: Callable[[], str],
) -> Config | None:
    """The reloaded configuration, or None (no reloader, or a bad file: then the running
    one stays, and the journal and systemd's status say why)."""
    if reload_config is None:
        return None
    notifier.reloading()
    try:
        new = reload_config()
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        notifier.ready(f"reload failed: {exc}; {status()}")
        return None
    for key in ("listen", "metrics_listen", "status_group"):  # bound once, at the start
        if getattr(new, key) != getattr(current, key):
            log.warning("%s changed: it takes effect at the next restart", key)
    return new


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port, "udp" if sock.type == socket.SOCK_DGRAM else "tcp"))


def observe(config: Config, name: str | None, source: Source) -> Observer:
    """Start the metrics listener and the status socket (mmproxy.observe)."""
    observer = Observer(config, name, source)
    try:
        observer.start()
    except ObserveError as exc:
        observer.stop()
        raise StartError(str(exc)) from exc
    return observer

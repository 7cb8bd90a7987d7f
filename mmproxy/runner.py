"""The single-process runner: one instance in this process until SIGTERM/SIGINT; SIGHUP
reloads the configuration. Its sibling for several processes is mmproxy.supervisor."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from mmproxy import lifecycle
from mmproxy.config import Config
from mmproxy.instance import Instance
from mmproxy.metrics import State
from mmproxy.observe import Source
from mmproxy.systemd import Notifier

log = logging.getLogger("mmproxy")

STATUS_INTERVAL = 2.0
LISTED_CONNECTIONS = 1000  # open connections `mmproxy status` lists at most


class Runner:
    """Opens the listeners, runs an Instance on them, talks to systemd (READY, STATUS,
    WATCHDOG, RELOADING, STOPPING). `reload_config` re-reads the file with the same
    command-line overrides."""

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name  # the instance's, for its status socket
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._request(stop=True))
        signal.signal(signal.SIGINT, lambda *_: self._request(stop=True))
        signal.signal(signal.SIGHUP, lambda *_: self._request(reload=True))

    def _request(self, stop: bool = False, reload: bool = False) -> None:
        self._stop_requested |= stop
        self._reload_requested |= reload
        self._wake.set()

    def run(self) -> int:
        """Serve until stopped; an exit status."""
        self._install_signal_handlers()
        listeners, activated = lifecycle.open_listeners(self.config)
        instance = Instance(
            self.config, listeners, self.notifier.watchdog, self.notifier.watchdog_interval
        )
        instance.start()
        source = Source(
            instance.snapshot,
            lambda: State(self._stop_requested, 1),
            lambda: instance.details(LISTED_CONNECTIONS),
        )
        try:
            observer = lifecycle.observe(self.config, self.name, source)
        except lifecycle.StartError:
            instance.stop(0)
            raise
        lifecycle.announce(listeners, activated)
        self.notifier.ready(instance.summary())
        while True:
            self._wake.wait(STATUS_INTERVAL)
            self._wake.clear()
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self._reload(instance)
            self.notifier.status(instance.summary())
        self.notifier.stopping(f"stopping: {instance.summary()}")
        log.info(
            "stopping: %s; waiting up to %g s for open connections",
            instance.summary(),
            self.config.drain_timeout,
        )
        instance.stop(self.config.drain_timeout)
        observer.stop()
        for sock in listeners:
            sock.close()
        return 0

    def _reload(self, instance: Instance) -> None:
        new = lifecycle.reload(self.config, self._reload_config, self.notifier, instance.summary)
        if new is None:
            return
        self.config = new
        instance.reconfigure(new)
        log.info("configuration reloaded from %s", new.path or "the command line")
        self.notifier.ready(instance.summary())

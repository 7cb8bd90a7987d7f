"""The supervisor: worker processes, one instance each (one per CPU), all accepting on the
same listening sockets. Its sibling for one process is mmproxy.runner.

A Python process runs one thread at a time, so one process keeps one CPU busy at most;
the relay is bound by that CPU under many short connections. The supervisor (the
process systemd started) opens the listening sockets and runs the self-checks, then
forks `workers` processes; each runs its own forwarder and relay loop on the inherited
sockets (EPOLLEXCLUSIVE: a new client wakes one of them) and logs its own connection
records. The supervisor alone talks to systemd (READY, STATUS with every worker's
counters added up, WATCHDOG while every worker's loop still beats), passes SIGHUP on
as the reloaded configuration, stops them all on SIGTERM, and replaces a worker that
dies.

Each worker talks to the supervisor over two pipes: orders come in ("config", "stop",
"details"), reports go out ("ready", "stats", "stopping", "exit", "details"), each with
its counters. The supervisor serves /metrics and the status socket (mmproxy.observe)
from the counters it has; `mmproxy status` asks the workers for their open connections.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from mmproxy import lifecycle
from mmproxy.channel import Channel, pipe, wait
from mmproxy.config import Config
from mmproxy.instance import Instance
from mmproxy.log import reconfigure as reconfigure_logging
from mmproxy.metrics import State
from mmproxy.observe import Observer, Source
from mmproxy.stats import Details, Snapshot, Totals, join_details
from mmproxy.systemd import Notifier

log = logging.getLogger("mmproxy")

REPORT_INTERVAL = 1.0  # seconds between a worker's counter reports
STATUS_INTERVAL = 2.0  # seconds between the supervisor's STATUS lines
POLL_INTERVAL = 0.25  # how often the supervisor looks at signals and dead workers
START_TIMEOUT = 15.0  # every worker must be ready within this, or the start fails
RESPAWN_DELAY = 1.0  # a worker that died is replaced after this (no busy crash loop)
STOP_REPORT_TIMEOUT = 2.0  # wait this long for the workers' counters at a stop
KILL_MARGIN = 5.0  # beyond the drain time, then a worker still running is killed
DETAILS_TIMEOUT = 2.0  # how long `mmproxy status` waits for the workers' connections
LISTED_CONNECTIONS = 1000  # open connections `mmproxy status` lists at most


def worker_count(config: Config) -> int:
    """The configured count; 0 ("auto") is one per CPU this process may run on. UDP is
    served by one process (a flow's datagrams must all reach the same one), so an
    instance that listens on UDP only runs one."""
    if config.listen and all(a.transport == "udp" for a in config.listen):
        return 1
    count = config.workers or len(os.sched_getaffinity(0))
    return max(1, min(count, config.max_connections))  # each may hold one at least


def share(config: Config, workers: int, slot: int) -> Config:
    """The config of worker `slot`: its share of max_connections, the shares adding up to
    it exactly (the first ones take one more when it does not divide evenly)."""
    each, left = divmod(config.max_connections, workers)
    return dataclasses.replace(config, max_connections=each + (slot < left))


# --- the supervisor ----------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process as the supervisor sees it."""

    slot: int
    pid: int
    orders: Channel  # supervisor -> worker
    reports: Channel  # worker -> supervisor
    started: float
    ready: bool = False
    stopping: bool = False
    stats: Snapshot = field(default_factory=Snapshot)
    reported_at: float = 0.0
    beat_age: float = 0.0  # how long ago its relay loop last beat, at its last report
    details: Details = field(default_factory=Details)
    details_round: int = 0  # the status request its details answer


class Supervisor:
    """Forks the workers and looks after them until SIGTERM/SIGINT."""

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name  # the instance's, for its status socket
        self.count = worker_count(self.config)
        self.notifier = notifier or Notifier()
        self._reload_config = reload_config
        self.listeners: list[socket.socket] = []
        self._activated = False
        self.workers: dict[int, Worker] = {}
        self._retired = Totals()  # counters of workers that ended (totals only)
        # Held while a worker's counters move to _retired, and while the observer's
        # threads add them up: a scrape never sees them twice, or not at all.
        self._counting = threading.Lock()
        self._respawn_at: dict[int, float] = {}
        self._stop = False
        self._reload = False
        self._signalled = (-1, -1)  # a pipe the signal handlers wake the wait with
        self.observer: Observer | None = None
        # Status requests (on the observer's threads) and the workers' answers.
        self._details = threading.Condition()
        self._details_asked = 0
        self._details_sent = 0

    # --- signals ---------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._signalled = _signal_pipe()
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._request_reload())

    def _request_stop(self) -> None:
        self._stop = True

    def _request_reload(self) -> None:
        self._reload = True

    # --- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers, report ready, supervise until stopped. An exit status."""
        self._install_signal_handlers()
        self.listeners, self._activated = lifecycle.open_listeners(self.config)
        for slot in range(self.count):
            self._spawn(slot)
        if not self._wait_ready():
            self._stop_workers()
            self._close_listeners()
            return 1
        try:
            self.observer = lifecycle.observe(self.config, self.name, self._source())
        except lifecycle.StartError:
            self._stop_workers()
            self._close_listeners()
            raise
        log.info("%d worker processes accept and relay connections", self.count)
        self.notifier.ready(self.status())
        next_status = time.monotonic() + STATUS_INTERVAL
        last_ping = float("-inf")
        while not self._stop:
            self._poll(POLL_INTERVAL)
            if self._stop:
                break
            if self._reload:
                self._reload = False
                self.reload()
            now = time.monotonic()
            self._respawn_due(now)
            if now >= next_status:
                next_status = now + STATUS_INTERVAL
                self.notifier.status(self.status())
            interval = self.notifier.watchdog_interval
            if interval and now - last_ping >= interval / 2 and self._all_beating(now, interval):
                last_ping = now
                self.notifier.watchdog()
        self._stop_workers()
        self._close_listeners()
        if self.observer is not None:
            self.observer.stop()
        return 0

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self.workers.values()) and not self._stop:
            if time.monotonic() > deadline:
                log.error("worker processes did not start within %g s", START_TIMEOUT)
                return False
            if self._poll(POLL_INTERVAL, respawn=False):
                log.error("a worker process exited during the start; not starting")
                return False
        return True

    def _stop_workers(self) -> None:
        """Stop every worker: they drain their connections, then exit."""
        self._respawn_at.clear()
        for worker in self.workers.values():
            _send(worker.orders, ("stop", None))
        deadline = time.monotonic() + STOP_REPORT_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            if all(w.stopping for w in self.workers.values()):
                break
            self._poll(0.05, respawn=False)
        summary = self.status()
        self.notifier.stopping(f"stopping: {summary}")
        drain = self.config.drain_timeout
        log.info("stopping: %s; waiting up to %g s for open connections", summary, drain)
        deadline = time.monotonic() + drain + KILL_MARGIN
        while self.workers and time.monotonic() < deadline:
            self._poll(0.1, respawn=False)
        for worker in list(self.workers.values()):
            log.error("worker %d (pid %d) did not stop: killing it", worker.slot, worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
            self._forget(worker)

    def reload(self) -> None:
        """Re-read the configuration and hand it to every worker; a bad one is refused
        here, once, and every worker keeps the running one."""
        new = lifecycle.reload(self.config, self._reload_config, self.notifier, self.status)
        if new is None:
            return
        if worker_count(new) != self.count:
            log.warning("workers changed: it takes effect at the next restart")
        self.config = new
        reconfigure_logging(new.log_level, new.log_connections)
        for worker in self.workers.values():
            worker.ready = False
            _send(worker.orders, ("config", share(new, self.count, worker.slot)))
        # Reported once every worker applies it, so that a client connecting after the
        # line finds the new configuration whichever worker accepts it.
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self.workers.values()) and time.monotonic() < deadline:
            self._poll(0.05)
        log.info("configuration reloaded from %s", new.path or "the command line")
        self.notifier.ready(self.status())

    def status(self) -> str:
        return self._totals().summary()

    def _totals(self) -> Totals:
        totals = Totals()
        with self._counting:
            totals.merge(self._retired)
            for worker in list(self.workers.values()):  # a copy: observer threads call this
                totals.add(worker.stats)
        return totals

    # --- what operators see (on the observer's threads) --------------------------------

    def _source(self) -> Source:
        return Source(
            lambda: self._totals().snapshot(),
            lambda: State(self._stop, self.count),
            self.details,
        )

    def details(self) -> Details:
        """Every worker's open connections and last rejections: asked of them through
        the main loop, waited for up to DETAILS_TIMEOUT (a stopped worker is left out)."""
        with self._details:
            self._details_asked += 1
            asked = self._details_asked
            try:
                os.write(self._signalled[1], b"d")  # wakes the main loop's wait
            except OSError:
                pass  # full: it is awake already
            self._details.wait_for(
                lambda: all(w.details_round >= asked for w in list(self.workers.values())),
                DETAILS_TIMEOUT,
            )
            parts = [w.details for w in list(self.workers.values()) if w.details_round >= asked]
        return join_details(parts, LISTED_CONNECTIONS)

    def _ask_details(self) -> None:
        """On the main loop: pass a status request on to the workers."""
        asked = self._details_asked
        if asked > self._details_sent:
            self._details_sent = asked
            for worker in self.workers.values():
                _send(worker.orders, ("details", asked))

    # --- workers ---------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        orders_in, orders_out = pipe()
        reports_in, reports_out = pipe()
        config = share(self.config, self.count, slot)
        beat = self.notifier.watchdog_interval
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                if self.observer is not None:
                    self.observer.close_copies()  # the supervisor's, not this process's
                orders_out.close()
                reports_in.close()
                for other in self.workers.values():  # so that each sees its own EOFs
                    other.orders.close()
                    other.reports.close()
                for fd in self._signalled:
                    os.close(fd)
                listeners = self.listeners
                if slot:  # the first worker alone serves UDP, and says where it listens
                    listeners = _leave_udp(listeners)
                else:
                    lifecycle.announce(listeners, self._activated)
                _pin(slot, self.count)
                status = _worker_main(config, listeners, orders_in, reports_out, beat)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                _exit(status)
        orders_in.close()
        reports_out.close()
        self.workers[slot] = Worker(slot, pid, orders_out, reports_in, time.monotonic())
        log.debug("worker %d started (pid %d)", slot, pid)

    def _poll(self, timeout: float, respawn: bool = True) -> bool:
        """Read the workers' reports for up to `timeout` s, then reap the dead ones
        (replaced later unless stopping). True if one died."""
        self._ask_details()
        by_conn = {w.reports: w for w in self.workers.values()}
        for ready in wait([*by_conn, self._signalled[0]], timeout):
            if isinstance(ready, Channel):
                self._read_reports(by_conn[ready])
            else:
                _drain(self._signalled[0])
        return self._reap(respawn)

    def _read_reports(self, worker: Worker) -> None:
        try:
            while worker.reports.poll():
                kind, stats, beat_age, extra = worker.reports.recv()
                worker.stats = stats
                worker.reported_at = time.monotonic()
                worker.beat_age = beat_age
                if kind == "details":
                    with self._details:
                        worker.details_round, worker.details = extra
                        self._details.notify_all()
                elif kind == "ready":
                    worker.ready = True
                elif kind == "stopping":
                    worker.stopping = True
        except (EOFError, OSError):
            pass  # it exited: _reap takes it from here

    def _reap(self, respawn: bool) -> bool:
        died = False
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is None:
                continue
            self._read_reports(worker)  # its last counters, if any are left in the pipe
            self._forget(worker)
            if self._stop:
                continue
            died = True
            log.error(
                "worker %d (pid %d) %s; its connections are lost%s",
                worker.slot,
                pid,
                _describe_exit(status),
                "; starting a new one" if respawn else "",
            )
            if respawn:
                # Not at once: a worker that stopped on a SIGTERM from systemd may be
                # just ahead of the supervisor's own; one that crashed at start would
                # crash again.
                now = time.monotonic()
                delay = now + RESPAWN_DELAY if worker.stopping else worker.started
                self._respawn_at[worker.slot] = max(delay, worker.started + RESPAWN_DELAY)
        return died

    def _forget(self, worker: Worker) -> None:
        with self._counting:
            self._retired.add(worker.stats.ended())  # its connections and flows ended with it
            del self.workers[worker.slot]
        worker.orders.close()
        worker.reports.close()

    def _respawn_due(self, now: float) -> None:
        for slot, when in list(self._respawn_at.items()):
            if now >= when:
                del self._respawn_at[slot]
                self._spawn(slot)

    def _all_beating(self, now: float, interval: float) -> bool:
        """Every worker reported, and its relay loop beat, within the watchdog time
        (`interval` is half of it), else systemd's watchdog restarts the whole service."""
        if len(self.workers) < self.count and not self._respawn_at:
            return False
        limit = 2 * interval
        return all(
            now - w.reported_at < limit and w.beat_age < limit for w in self.workers.values()
        )


# --- a worker ----------------------------------------------------------------------------


class _WorkerNotifier(Notifier):
    """A worker's stand-in for sd_notify: the supervisor alone talks to systemd. The
    relay loop's heartbeat is only noted here; the reports carry its age."""

    def __init__(self, watchdog_interval: float) -> None:
        self.enabled = False
        self._notifier = None
        self.watchdog_interval = watchdog_interval
        self.last_beat = time.monotonic()

    def send(self, *lines: str) -> None:
        pass

    def watchdog(self) -> None:
        self.last_beat = time.monotonic()


def _worker_main(
    config: Config,
    listeners: list[socket.socket],
    orders: Channel,
    reports: Channel,
    beat: float,
) -> int:
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    # systemd signals every process of the unit at a stop: a worker drains on SIGTERM
    # too. SIGINT (a terminal's ^C reaches the whole group) and SIGHUP are the
    # supervisor's to handle.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    notifier = _WorkerNotifier(beat)
    instance = Instance(config, listeners, notifier.watchdog, beat)
    instance.start()

    def report(kind: str, extra: object = None) -> None:
        beat_age = time.monotonic() - notifier.last_beat
        _send(reports, (kind, instance.snapshot(), beat_age, extra))

    signalled = _signal_pipe()[0]
    # Under a watchdog, reports come often enough for the supervisor to ping in time.
    every = min(REPORT_INTERVAL, beat / 2) if beat else REPORT_INTERVAL
    report("ready")
    while not stop:
        kind, payload = "", None
        try:
            for ready in wait([orders, signalled], every):
                if ready is orders:
                    kind, payload = orders.recv()
                else:
                    _drain(signalled)
        except (EOFError, OSError):
            kind = "stop"  # the supervisor is gone: stop as it would have
        if stop:
            break
        if kind == "stop":
            break
        if kind == "config":
            assert isinstance(payload, Config)
            instance.reconfigure(payload)
            report("ready")
        elif kind == "details":
            report("details", (payload, instance.details(LISTED_CONNECTIONS)))
        else:
            report("stats")
    report("stopping")
    instance.stop(instance.config.drain_timeout)
    for sock in listeners:
        sock.close()
    report("exit")
    return 0


def _pin(slot: int, count: int) -> None:
    """With one worker per CPU (as `auto` makes), keep each on its own CPU: a worker that
    migrates loses its caches to the load beside it (measured: bulk throughput -8%)."""
    cpus = sorted(os.sched_getaffinity(0))
    if count == len(cpus) > 1:
        try:
            os.sched_setaffinity(0, {cpus[slot]})
        except OSError as exc:
            # The unit's system-call filter denies it (@resources): the service's workers
            # float, as HAProxy's threads do without cpu-map; only a hand-run one is kept.
            log.debug("worker %d not kept on CPU %d: %s", slot, cpus[slot], exc.strerror)


def _leave_udp(listeners: list[socket.socket]) -> list[socket.socket]:
    """Close this worker's copies of the UDP sockets (another worker serves them); the
    others."""
    for sock in listeners:
        if sock.type == socket.SOCK_DGRAM:
            sock.close()
    return [s for s in listeners if s.type != socket.SOCK_DGRAM]


def _signal_pipe() -> tuple[int, int]:
    """A pipe that every signal writes a byte to: a wait() on it returns at once."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    return read_end, write_end


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _send(conn: Channel, message: object) -> None:
    try:
        conn.send(message)
    except OSError:
        pass  # the other side is gone; it is reaped (or stops) on its own


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _exit(status: int) -> NoReturn:
    """Leave a forked worker without running the supervisor's exit handlers."""
    for handler in logging.getLogger().handlers + log.handlers:
        try:
            handler.flush()
        except Exception:  # nothing left to tell anyone
            pass
    sys.stderr.flush()
    os._exit(status)

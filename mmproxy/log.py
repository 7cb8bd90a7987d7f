"""Logging set-up: the journal (with structured fields) under systemd, else stderr.

Records go through a bounded queue to a logging thread, which alone writes them: the
relay thread, which logs a record per connection, never waits on the journal (a
journald busy or past its rate limit blocks the writer). When the queue is full a
record is dropped and counted, and a warning says how many once there is room again.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import sys
import threading
import time
import weakref

from mmproxy.systemd import journal_handler, under_journald

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
QUEUE_SIZE = 8192  # records waiting for the logging thread at most (a few MiB)
BATCH_DELAY = 0.05  # the logging thread gathers records this long after the first
FLUSH_TIMEOUT = 2.0  # how long an exit waits for the queued records to be written


class LogThread(logging.Handler):
    """Hands records to a logging thread, which writes them to `target`, and never
    waits: a record that finds `size` others waiting is dropped and counted (`dropped`).
    The thread wakes once per batch, not per record (a wake-up per connection cost
    the relay more than the record itself), and sleeps while nothing is logged."""

    def __init__(self, target: logging.Handler, size: int = QUEUE_SIZE) -> None:
        super().__init__()
        self.target = target
        self.size = size
        self.dropped = 0
        self._unreported = 0
        self._start()
        # A fork waits until the logging thread is between two records (it could hold
        # the journal's or stderr's lock, for ever in the child). The child has no
        # logging thread, and the parent's records are the parent's to write: a new
        # queue and thread. Weak references: no handler is kept alive by the hooks.
        ref = weakref.ref(self)
        os.register_at_fork(
            before=functools.partial(_at_fork, ref, "before"),
            after_in_parent=functools.partial(_at_fork, ref, "parent"),
            after_in_child=functools.partial(_at_fork, ref, "child"),
        )

    def _start(self) -> None:
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._queued = self._written = 0
        self._wake = threading.Event()
        self._writing = threading.Lock()
        threading.Thread(target=self._run, name="log", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called under the handler's lock: the counters need no other. The message is
        # made now (its arguments could change later), the rest on the logging thread.
        records = self._records
        if len(records) >= self.size:
            self.dropped += 1
            self._unreported += 1
            return
        was_idle = not records
        if self._unreported and len(records) < self.size // 2:  # not one per free slot
            records.append(self._drop_report())
            self._queued += 1
            self._unreported = 0
        record.msg = record.getMessage()
        record.args = None
        records.append(record)
        self._queued += 1
        if was_idle:
            self._wake.set()

    def _drop_report(self) -> logging.LogRecord:
        return logging.getLogger("mmproxy").makeRecord(
            "mmproxy",
            logging.WARNING,
            __file__,
            0,
            "%d log records dropped: the journal did not keep up (%d since the start)",
            (self._unreported, self.dropped),
            None,
            extra={"DROPPED": self._unreported},
        )

    def _run(self) -> None:
        records, wake, target = self._records, self._wake, self.target
        while True:
            wake.wait()
            wake.clear()
            time.sleep(BATCH_DELAY)
            while records:
                with self._writing:
                    target.handle(records.popleft())  # its errors go to its handleError
                self._written += 1

    def flush(self) -> None:
        """Wait (a while) until the logging thread has written what is queued now."""
        queued = self._queued
        self._wake.set()
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self._written < queued and time.monotonic() < deadline:
            time.sleep(0.005)
        self.target.flush()


def _at_fork(ref: weakref.ref[LogThread], when: str) -> None:
    handler = ref()
    if handler is None:
        return
    if when == "before":
        handler._writing.acquire()
    elif when == "parent":
        handler._writing.release()
    else:
        handler._start()


_log_thread: LogThread | None = None


def setup_logging(level: str, connections: str = "all") -> None:
    # One record per connection: skip what no line shows (the caller's source location is
    # a stack walk, the process and thread lookups are more calls on the hot path).
    global _log_thread
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if under_journald():
        handler = journal_handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        # A terminal wants timestamps; CI logs and pipes add their own or don't need them.
        fmt = "%(levelname)s %(message)s"
        if sys.stderr.isatty():
            fmt = "%(asctime)s " + fmt
        handler.setFormatter(logging.Formatter(fmt))
    _log_thread = LogThread(handler)
    root = logging.getLogger("mmproxy")
    root.handlers[:] = [_log_thread]
    root.setLevel(LEVELS[level])
    root.propagate = False
    set_connection_logging(connections)


def set_level(level: str) -> None:
    logging.getLogger("mmproxy").setLevel(LEVELS[level])


def reconfigure(level: str, connections: str) -> None:
    """Apply a reloaded configuration's log_level and log_connections."""
    set_level(level)
    set_connection_logging(connections)


class _ConnectionRecords(logging.Filter):
    """Drops the records of connections that ended (INFO, with a CLOSE_REASON field:
    TCP connections and UDP flows) unless log_connections is `all`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.INFO or not hasattr(record, "CLOSE_REASON")


_CONNECTION_RECORDS = _ConnectionRecords()


def set_connection_logging(connections: str) -> None:
    """Apply log_connections: `all`, `rejected` (warnings only) or `none`; the
    forwarder itself also skips what would be dropped."""
    logger = logging.getLogger("mmproxy")
    if connections == "all":
        logger.removeFilter(_CONNECTION_RECORDS)
    else:
        logger.addFilter(_CONNECTION_RECORDS)

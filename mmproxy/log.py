"""Logging set-up: the journal (with structured fields) under systemd, else stderr.

Records go through a bounded queue to a logging thread, which alone writes them: the
relay thread, which logs a record per connection, never waits on the journal (a
journald busy or past its rate limit blocks the writer). When the queue is full a
record is dropped and counted, and a warning says how many once there is room again.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import time

from mmproxy.systemd import journal_handler, under_journald

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
QUEUE_SIZE = 8192  # records waiting for the logging thread at most (a few MiB)
FLUSH_TIMEOUT = 2.0  # how long an exit waits for the queued records to be written


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the logging thread and never waits: a record that finds the
    queue full is dropped and counted (`dropped`)."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        super().__init__(queue.Queue(size))
        self.dropped = 0
        self._unreported = 0
        self._listener: logging.handlers.QueueListener | None = None

    def start(self, target: logging.Handler) -> None:
        """Write the queued records to `target` on a thread of this process."""
        self._listener = logging.handlers.QueueListener(self.queue, target)
        self._listener.start()

    def restart_after_fork(self) -> None:
        """A forked child has no logging thread, and the old queue's lock may have been
        held by it at the fork: a new queue and a new thread."""
        if self._listener is None:
            return
        target = self._listener.handlers
        self.queue = queue.Queue(self.queue.maxsize)  # type: ignore[attr-defined]
        self._listener = logging.handlers.QueueListener(self.queue, *target)
        self._listener.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is made now (its arguments could change later); the rest, a
        # traceback included, on the logging thread. No copy: nothing else holds it.
        record.msg = record.getMessage()
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        # Called under the handler's lock: the counters need no other.
        put = self.queue.put_nowait
        if self._unreported:
            try:
                put(self._drop_report())
                self._unreported = 0
            except queue.Full:
                pass
        try:
            put(record)
        except queue.Full:
            self.dropped += 1
            self._unreported += 1

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

    def flush(self) -> None:
        """Wait (a while) until the logging thread has written what is queued."""
        if self._listener is None:
            return
        pending = self.queue
        assert isinstance(pending, queue.Queue)
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


_queue_handler: DroppingQueueHandler | None = None


def queued(target: logging.Handler, size: int = QUEUE_SIZE) -> DroppingQueueHandler:
    """A handler that passes records to `target` through the queue and logging thread
    (restarted in every forked worker)."""
    handler = DroppingQueueHandler(size)
    handler.start(target)
    os.register_at_fork(after_in_child=handler.restart_after_fork)
    return handler


def setup_logging(level: str, connections: str = "all") -> None:
    # One record per connection: skip what no line shows (the caller's source location is
    # a stack walk, the process and thread lookups are more calls on the hot path).
    global _queue_handler
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
    _queue_handler = queued(handler)
    root = logging.getLogger("mmproxy")
    root.handlers[:] = [_queue_handler]
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


def dropped_records() -> int:
    """Log records dropped so far because the logging thread did not keep up."""
    return _queue_handler.dropped if _queue_handler is not None else 0

"""Logging set-up: the journal (with structured fields) under systemd, else stderr."""

from __future__ import annotations

import logging
import sys

from mmproxy.systemd import journal_handler, under_journald

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(level: str) -> None:
    # One record per connection: skip what no line shows (the caller's source location is
    # a stack walk, the process and thread lookups are more calls on the hot path).
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
    root = logging.getLogger("mmproxy")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False


def set_level(level: str) -> None:
    logging.getLogger("mmproxy").setLevel(LEVELS[level])

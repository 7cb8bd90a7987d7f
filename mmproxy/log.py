"""Logging set-up: plain lines on stderr (the systemd journal handler comes with the unit)."""

from __future__ import annotations

import logging
import sys

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # A terminal wants timestamps; journald and CI logs add their own.
    fmt = (
        "%(asctime)s %(levelname)s %(message)s"
        if sys.stderr.isatty()
        else "%(levelname)s %(message)s"
    )
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("mmproxy")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False

"""Warnings at a limited rate: a flood of bad connections or datagrams must not flood
the journal (nor push journald past its own rate limit, which would drop other lines)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

log = logging.getLogger("mmproxy")


class RateLimitedLog:
    """At most `burst` warnings per reason per `window` seconds, then one summary line:
    a flood of bad connections must not flood the journal."""

    def __init__(
        self, burst: int = 10, window: float = 10.0, what: str = "connections rejected"
    ) -> None:
        self._what = what
        self._burst = burst
        self._window = window
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._window_start = time.monotonic()

    def warning(self, reason: str, message: str, extra: dict[str, object]) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self._window:
                self._flush(now)
            self._counts[reason] += 1
            show = self._counts[reason] <= self._burst
        if show:
            log.warning(message, extra=extra)

    def _flush(self, now: float) -> None:
        for reason, count in self._counts.items():
            if count > self._burst:
                log.warning(
                    "%d more %s (%s) in the last %.0f s",
                    count - self._burst,
                    self._what,
                    reason,
                    now - self._window_start,
                    extra={"CLOSE_REASON": reason, "SUPPRESSED": count - self._burst},
                )
        self._counts.clear()
        self._window_start = now

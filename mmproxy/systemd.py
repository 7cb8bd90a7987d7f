"""systemd glue: sockets passed in by socket activation, sd_notify, the journal.

Everything here degrades to a no-op when mmproxy is not run by systemd, so the same
code path serves `mmproxy -c FILE` typed by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

log = logging.getLogger("mmproxy")


LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed descriptor


def listen_sockets() -> list[socket.socket] | None:
    """The listening sockets systemd passed in (LISTEN_FDS), or None when not activated.

    sd_listen_fds(3) by hand (the protocol is three variables): python3-systemd's
    `daemon` module costs the start-up more than this does."""
    if "LISTEN_FDS" not in os.environ:
        return None
    count = _passed_fds()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the processes this one starts
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)  # family and type are read from the fd
        os.set_inheritable(fd, False)
        sockets.append(sock)
    return sockets


def _passed_fds() -> int:
    """How many descriptors were passed to this process: none when LISTEN_PID names
    another (the variables were inherited from a parent)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ["LISTEN_FDS"])
    except ValueError:
        return 0
    return count if pid == os.getpid() and count > 0 else 0


class Notifier:
    """sd_notify messages; silent when NOTIFY_SOCKET is not set."""

    def __init__(self) -> None:
        self.enabled = "NOTIFY_SOCKET" in os.environ
        self._notifier = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = usec / 2e6 if usec and self._watchdog_is_ours() else 0.0

    @staticmethod
    def _watchdog_is_ours() -> bool:
        pid = os.environ.get("WATCHDOG_PID")
        return pid is None or pid == str(os.getpid())

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def journal_handler() -> logging.Handler:
    from systemd.journal import JournalHandler

    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="mmproxy")
    return handler

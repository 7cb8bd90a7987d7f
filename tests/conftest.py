"""Fixtures and hooks for the whole suite (helpers: tests/support.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.support import NOT_RUN, Backend, UdpEcho, echo, prefixed


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Tests skipped for lack of root are said again at the end, in red: not passed."""
    skipped = [
        rep for rep in terminalreporter.stats.get("skipped", []) if NOT_RUN in str(rep.longrepr)
    ]
    if skipped:
        message = f"{len(skipped)} tests {NOT_RUN} they need root; run the tests as root"
        terminalreporter.write_sep("!", message, red=True)


@pytest.fixture
def tcp_echo() -> Iterator[socket.socket]:
    """A TCP echo on 127.0.0.1: its listening socket."""
    backend = Backend(socket.create_server(("127.0.0.1", 0)), echo)
    yield backend.listener
    backend.close()


@pytest.fixture
def udp_echo() -> Iterator[socket.socket]:
    """A UDP echo on 127.0.0.1 that answers "echo " + payload: its socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    server = UdpEcho(sock, prefixed(b"echo "))
    yield sock
    server.close()

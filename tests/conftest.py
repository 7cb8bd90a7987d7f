"""Fixtures and hooks for the whole suite (helpers: tests/support.py)."""

from __future__ import annotations

import pytest

from tests.support import NOT_RUN


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Tests skipped for lack of root are said again at the end, in red: not passed."""
    skipped = [
        rep for rep in terminalreporter.stats.get("skipped", []) if NOT_RUN in str(rep.longrepr)
    ]
    if skipped:
        message = f"{len(skipped)} tests {NOT_RUN} they need root; run the tests as root"
        terminalreporter.write_sep("!", message, red=True)

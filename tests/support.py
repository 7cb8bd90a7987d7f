"""Helpers shared by the unit, integration and system tests, written once: whether this is
CI and the one root check. Fixtures built on them live in tests/conftest.py and the
integration and system conftests."""

from __future__ import annotations

import os

import pytest

NOT_RUN = "NOT RUN:"  # every skip for lack of root starts so; the summary counts them


def in_ci() -> bool:
    """CI sets CI=true; "", "0", "false" and "no" mean a developer's machine."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def needs_root(why: str) -> None:
    """Skip loudly for a developer who is not root; under CI (which runs as root) fail."""
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(f"{why}; CI runs as root, so this is an error")
    pytest.skip(f"{NOT_RUN} {why}; run the tests as root")

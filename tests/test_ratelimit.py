"""Warnings at a limited rate."""

from __future__ import annotations

import logging
import time

import pytest

from mmproxy.ratelimit import RateLimitedLog


def test_rate_limited_log_summarises(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimitedLog(burst=3, window=0.1)
    with caplog.at_level(logging.WARNING, logger="mmproxy"):
        for i in range(10):
            limiter.warning("bad", f"bad {i}", {})
        time.sleep(0.15)
        limiter.warning("bad", "bad again", {})
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["bad 0", "bad 1", "bad 2"]
    assert "7 more connections rejected (bad)" in messages[3]
    assert messages[4] == "bad again"

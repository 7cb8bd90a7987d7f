"""Start-up pieces that need no privileges: binding listeners, the open-file limit."""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Iterator

import pytest

from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.lifecycle import bind_listeners, raise_fd_limit


@pytest.fixture
def restore_fd_limit() -> Iterator[None]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_soft_fd_limit_is_raised_to_the_hard_one(restore_fd_limit: None) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    assert raise_fd_limit(Config(max_connections=100)) == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_a_limit_too_low_for_the_maxima_is_named(
    restore_fd_limit: None, caplog: pytest.LogCaptureFixture
) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    both = (Address("0.0.0.0", 53), Address("0.0.0.0", 53, "udp"))
    config = Config(listen=both, max_connections=hard // 2, udp_max_flows=1000)
    with caplog.at_level(logging.WARNING, logger="mmproxy"):
        raise_fd_limit(config)
    assert f"the open-file limit ({hard}) is below" in caplog.text
    assert "max_connections and udp_max_flows may need" in caplog.text
    assert "LimitNOFILE=" in caplog.text


def test_a_udp_only_instance_counts_no_tcp_connections(
    restore_fd_limit: None, caplog: pytest.LogCaptureFixture
) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    udp_only = Config(listen=(Address("0.0.0.0", 53, "udp"),), max_connections=hard)
    with caplog.at_level(logging.WARNING, logger="mmproxy"):
        raise_fd_limit(udp_only)
    assert caplog.text == ""


def test_udp_and_tcp_listeners_share_a_port() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sockets = bind_listeners([Address("127.0.0.1", port), Address("127.0.0.1", port, "udp")])
    try:
        assert [s.type for s in sockets] == [socket.SOCK_STREAM, socket.SOCK_DGRAM]
        assert all(s.getsockname() == ("127.0.0.1", port) for s in sockets)
    finally:
        for sock in sockets:
            sock.close()

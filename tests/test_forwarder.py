"""The forwarder in-process with the balancer's own (LOCAL) connections, relayed
without spoofing and so without privileges; and its rate-limited log."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmproxy.address import Address
from mmproxy.config import Config, ConfigError, load_config
from mmproxy.forwarder import Forwarder, _handshake_of
from mmproxy.log import LogThread, set_connection_logging
from mmproxy.networks import parse_network
from mmproxy.proxy_protocol import encode_v2

LOCAL = encode_v2("LOCAL", "UNSPEC")  # relayed unspoofed: no privileges needed


@pytest.fixture
def forwarder(tcp_echo: socket.socket) -> Iterator[tuple[Forwarder, tuple[str, int]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    config = Config(
        ipv4=Address(*tcp_echo.getsockname()),
        allowed_networks=(parse_network("127.0.0.0/8"),),
        tcp_keepalive=False,
    )
    running = Forwarder(config, [listener])
    running.start()
    yield running, listener.getsockname()
    running.stop()
    listener.close()


def rejected(fwd: Forwarder, reason: str) -> int:
    deadline = time.monotonic() + 5
    while not fwd.stats.rejected[reason] and time.monotonic() < deadline:
        time.sleep(0.01)
    return fwd.stats.rejected[reason]


def test_header_in_pieces_then_data_both_ways(
    forwarder: tuple[Forwarder, tuple[str, int]],
) -> None:
    _fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        for byte in LOCAL:
            sock.send(bytes([byte]))
            time.sleep(0.001)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_data_in_the_header_segment_arrives_intact(
    forwarder: tuple[Forwarder, tuple[str, int]],
) -> None:
    _fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(LOCAL + b"SSH-2.0-x\r\n")
        assert sock.recv(100) == b"SSH-2.0-x\r\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "invalid-header"),
        (b"PROXY TCP4 1.2", "closed-before-header"),
        (b"", "probe"),
    ],
)
def test_bad_starts_are_rejected(
    forwarder: tuple[Forwarder, tuple[str, int]], data: bytes, reason: str
) -> None:
    fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    assert rejected(fwd, reason) == 1
    assert fwd.stats.total == 1 and fwd.stats.active == 0


def test_an_unexpected_accept_error_is_counted_and_accepting_goes_on(
    tcp_echo: socket.socket,
) -> None:
    """A listener shut down under the loop makes accept() fail with EINVAL, an errno
    nothing expects: the loop logs, counts, pauses that accept a while and carries on
    serving the other listener."""
    broken, working = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    config = Config(
        ipv4=Address(*tcp_echo.getsockname()),
        allowed_networks=(parse_network("127.0.0.0/8"),),
        tcp_keepalive=False,
    )
    fwd = Forwarder(config, [broken, working])
    fwd.start()
    try:
        broken.shutdown(socket.SHUT_RDWR)  # the listener reports EPOLLHUP; accept: EINVAL
        time.sleep(0.2)  # the loop meets the error at once
        assert fwd._relay.alive()
        assert fwd.stats.errors["accept-EINVAL"] >= 1
        assert "internal errors: accept-EINVAL" in fwd.stats.summary()
        with socket.create_connection(working.getsockname(), timeout=5) as sock:
            sock.sendall(LOCAL + b"ping")
            assert sock.recv(4) == b"ping"
    finally:
        fwd.stop()
        broken.close()
        working.close()


# --- journal flooding (security issue 11, item 11) --------------------------------------


def serve_local(address: tuple[str, int], count: int) -> None:
    """`count` health-check connections, one after another, each echoed once."""
    for _ in range(count):
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(LOCAL + b"ping")
            assert sock.recv(4) == b"ping"


def wait_idle(fwd: Forwarder, total: int) -> None:
    deadline = time.monotonic() + 5
    while (fwd.stats.total < total or fwd.stats.active) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["all", "rejected", "none"])
def test_log_connections_chooses_which_connections_leave_a_record(
    tcp_echo: socket.socket, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    config = load_text(f"log_connections: {mode}\n", tcp_echo)
    assert config.log_connections == mode
    listener = socket.create_server(("127.0.0.1", 0))
    fwd = Forwarder(config, [listener])
    fwd.start()
    try:
        with caplog.at_level(logging.INFO, logger="mmproxy"):
            serve_local(listener.getsockname(), 1)
            with socket.create_connection(listener.getsockname(), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n")
                assert sock.recv(1) == b""
            wait_idle(fwd, 2)
    finally:
        fwd.stop()
        listener.close()
    closed = [r for r in caplog.records if r.levelno == logging.INFO]
    rejections = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(closed) == (mode == "all")
    assert len(rejections) == (mode != "none")
    assert fwd.stats.rejected["invalid-header"] == 1  # counted whatever is logged


def load_text(text: str, echo: socket.socket) -> Config:
    host, port = echo.getsockname()
    path = Path(tempfile.mkdtemp()) / "mmproxy.yaml"
    path.write_text(
        f"listen: 127.0.0.1:2222\nipv4: {host}:{port}\nallowed_networks: [127.0.0.0/8]\n"
        f"tcp_keepalive: false\n{text}"
    )
    return load_config(str(path))


def test_a_bad_log_connections_value_names_the_key(tcp_echo: socket.socket) -> None:
    with pytest.raises(ConfigError, match=r"mmproxy\.yaml:5: log_connections: expected one of"):
        load_text("log_connections: some\n", tcp_echo)


def test_records_of_udp_flows_follow_log_connections(caplog: pytest.LogCaptureFixture) -> None:
    """UDP flows' records (INFO with a CLOSE_REASON) are dropped by the logger's filter."""
    logger = logging.getLogger("mmproxy")
    try:
        with caplog.at_level(logging.INFO, logger="mmproxy"):
            set_connection_logging("rejected")
            logger.info("a flow ended", extra={"CLOSE_REASON": "idle"})
            logger.info("not a connection record")
            logger.warning("dropped a datagram", extra={"CLOSE_REASON": "flow-limit"})
            set_connection_logging("all")
            logger.info("another flow ended", extra={"CLOSE_REASON": "idle"})
    finally:
        set_connection_logging("all")
    assert [r.getMessage() for r in caplog.records] == [
        "not a connection record",
        "dropped a datagram",
        "another flow ended",
    ]


def test_the_relay_never_waits_on_a_log_that_does_not_drain(tcp_echo: socket.socket) -> None:
    """The log's reader (journald past its limits; here a pipe nobody reads) stops
    taking records: connections go on being relayed, the records that find the queue
    full are dropped and counted, and a warning says so once the log drains again."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # full after a few dozen lines
    stream = os.fdopen(write_end, "w", buffering=1)
    handler = LogThread(logging.StreamHandler(stream), size=16)
    logger = logging.getLogger("mmproxy")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    config = load_text("", tcp_echo)
    listener = socket.create_server(("127.0.0.1", 0))
    fwd = Forwarder(config, [listener])
    fwd.start()
    lines: list[str] = []
    try:
        serve_local(listener.getsockname(), 300)  # a record each: far more than fit
        wait_idle(fwd, 300)
        assert handler.dropped > 0
        reader = threading.Thread(target=read_lines, args=(read_end, lines), daemon=True)
        reader.start()
        handler.flush()
        serve_local(listener.getsockname(), 1)  # the next record brings the report
        handler.flush()
        time.sleep(0.1)
    finally:
        threading.Thread(target=read_lines, args=(read_end, []), daemon=True).start()
        fwd.stop()
        listener.close()
        logger.handlers[:], level, logger.propagate = saved
        logger.setLevel(level)
    reports = [re.search(r"(\d+) log records dropped: .* \((\d+) since the start\)", line)
               for line in lines if "dropped" in line]  # fmt: skip
    assert reports and all(reports)
    assert sum(int(m[1]) for m in reports if m) == handler.dropped
    assert reports[-1] and int(reports[-1][2]) == handler.dropped
    assert sum("health check via" in line for line in lines) == 301 - handler.dropped


def read_lines(fd: int, lines: list[str]) -> None:
    with os.fdopen(fd, "r") as stream:
        for line in stream:
            lines.append(line.rstrip("\n"))


def test_listeners_defer_accept_until_the_header_is_there(
    forwarder: tuple[Forwarder, tuple[str, int]],
) -> None:
    fwd, _ = forwarder
    for sock in fwd._listeners:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0


def test_a_connection_from_the_c_hand_shake_reads_as_a_handshake() -> None:
    """Its record and its line in `mmproxy status` say what a Python hand-shake's would."""
    hs = _handshake_of(("198.51.100.7", 1, "203.0.113.5", 2, ("127.0.0.1", 22), 1))
    assert (hs.balancer, hs.client, hs.target) == (
        ("198.51.100.7", 1),
        Address("203.0.113.5", 2),
        Address("127.0.0.1", 22),
    )
    assert not hs.health_check and hs.unique_id is None


def test_a_reload_forgets_the_balancers_let_through(
    forwarder: tuple[Forwarder, tuple[str, int]],
) -> None:
    """The C hand-shake serves the balancer addresses Python let through; after a reload
    that no longer allows one, it is checked again, and refused."""
    fwd, address = forwarder
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(LOCAL + b"ping")
        assert sock.recv(4) == b"ping"
    assert "127.0.0.1" in fwd._gate.balancers
    fwd.reconfigure(
        dataclasses.replace(fwd.config, allowed_networks=(parse_network("192.0.2.0/24"),))
    )
    assert not fwd._gate.balancers
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(LOCAL + b"ping")
        try:
            answer = sock.recv(4)
        except ConnectionResetError:  # closed unread: a reset
            answer = b""
        assert answer == b""
    assert rejected(fwd, "untrusted-balancer") == 1

"""The /metrics page (Prometheus text format), its sums across workers, and the status
socket with `mmproxy status`'s output, served in this process."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmproxy import cli, observe
from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.metrics import State, render
from mmproxy.stats import (
    Details,
    OpenConnection,
    Rejection,
    Snapshot,
    TcpStats,
    UdpStats,
    close_label,
    join_details,
    total,
)


def _worker(accepted: int, closed: int, refused: int) -> TcpStats:
    stats = TcpStats(active=accepted - closed - refused, total=accepted, accepted=accepted)
    stats.bytes_in, stats.bytes_out = 10 * closed, 20 * closed
    stats.closed["client-closed"] += closed
    stats.headers[1, "PROXY"] += closed + refused
    stats.rejected["target-unavailable"] += refused
    stats.connect_errors["ECONNREFUSED"] += refused
    return stats


def samples(page: str) -> dict[str, int]:
    """name{labels} -> value, for every sample line."""
    found = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            found[key] = int(value)
    return found


def test_the_page_adds_up_every_worker() -> None:
    udp = UdpStats(flows=2, total=5, packets_in=7, packets_out=6, bytes_in=70, bytes_out=60)
    udp.drop("no-flow")
    summed = total(
        Snapshot(_worker(10, 6, 1).snapshot(), udp.snapshot()),
        Snapshot(_worker(5, 5, 0).snapshot()),
    ).snapshot()
    got = samples(render(summed, State(draining=False, workers=2)))
    assert got["mmproxy_connections_accepted_total"] == 15
    assert got["mmproxy_connections_active"] == 3
    assert got['mmproxy_connections_closed_total{reason="client-closed"}'] == 11
    assert got['mmproxy_connections_rejected_total{reason="target-unavailable"}'] == 1
    assert got['mmproxy_proxy_headers_total{version="1",command="PROXY"}'] == 12
    assert got['mmproxy_target_connect_errors_total{errno="ECONNREFUSED"}'] == 1
    assert got['mmproxy_tcp_bytes_total{direction="in"}'] == 110
    assert got['mmproxy_tcp_bytes_total{direction="out"}'] == 220
    assert got['mmproxy_udp_flows_active{framing="v2"}'] == 2
    assert got['mmproxy_udp_flows_closed_total{framing="v2"}'] == 3
    assert got['mmproxy_udp_datagrams_total{framing="v2",direction="in"}'] == 7
    assert got['mmproxy_udp_bytes_total{framing="v2",direction="out"}'] == 60
    assert got['mmproxy_udp_dropped_total{framing="v2",reason="no-flow"}'] == 1
    assert got["mmproxy_draining"] == 0
    assert got["mmproxy_workers"] == 2
    assert any(k.startswith("mmproxy_build_info{version=") for k in got)


def test_every_metric_has_help_and_type_and_follows_the_conventions() -> None:
    page = render(total(Snapshot(_worker(3, 2, 1).snapshot())).snapshot(), State(True, 1))
    names = {line.split(" ", 3)[2]: line.split(" ")[3] for line in page.splitlines()
             if line.startswith("# TYPE ")}  # fmt: skip
    helps = {line.split(" ")[2] for line in page.splitlines() if line.startswith("# HELP ")}
    assert set(names) == helps
    for name, kind in names.items():
        assert re.fullmatch(r"mmproxy_[a-z0-9_]+", name), name
        assert name.endswith("_total") == (kind == "counter"), name
    for key in samples(page):
        assert key.split("{")[0] in names, key
    assert samples(page)["mmproxy_draining"] == 1


def test_label_values_are_escaped() -> None:
    stats = TcpStats()
    stats.rejected['odd "reason"\\\n'] += 1
    page = render(Snapshot(stats.snapshot()), State())
    assert 'mmproxy_connections_rejected_total{reason="odd \\"reason\\"\\\\\\n"} 1' in page


def test_the_reference_parser_reads_the_page() -> None:
    """Debian's python3-prometheus-client parses what we write by hand."""
    parser = pytest.importorskip("prometheus_client.parser")
    udp = UdpStats(flows=1, total=1, framing="spp")
    page = render(Snapshot(_worker(4, 2, 1).snapshot(), udp.snapshot()), State())
    families = {f.name: f for f in parser.text_string_to_metric_families(page)}
    # The parser names counters without their _total.
    assert families["mmproxy_connections_accepted"].samples[0].value == 4
    assert families["mmproxy_udp_flows_opened"].samples[0].labels == {"framing": "spp"}
    assert families["mmproxy_connections_active"].type == "gauge"


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("client closed first", "client-closed"),
        ("target reset the connection", "target-reset"),
        ("client closed while data was still being sent to it", "write-error"),
        ("read from target failed: No route to host", "read-error"),
        ("idle for more than 30 s", "idle-timeout"),
        ("half-closed by the client for more than 60 s", "half-close-timeout"),
        ("mmproxy is stopping", "drain-timeout"),
        ("something new", "other"),
    ],
)
def test_close_reasons_become_few_labels(reason: str, label: str) -> None:
    assert close_label(reason) == label


def test_details_of_workers_join_oldest_first() -> None:
    def conn(started: float) -> OpenConnection:
        return OpenConnection("203.0.113.7:1", "127.0.0.1:2", "127.0.0.1:22", 1, 2, started)

    def rejection(at: float) -> Rejection:
        return Rejection(at, "127.0.0.1:2", "", "probe", "x")

    one = Details((conn(3.0), conn(1.0)), (rejection(5.0),), more=4)
    two = Details((conn(2.0),), (rejection(1.0), rejection(9.0)))
    joined = join_details([one, two], limit=2)
    assert [c.started for c in joined.connections] == [1.0, 2.0]
    assert [r.at for r in joined.rejections] == [5.0, 9.0]
    assert joined.more == 5  # 4 left out by a worker, 1 here


# --- the servers, in this process --------------------------------------------------------


@pytest.fixture
def observer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[observe.Observer]:
    monkeypatch.setenv("MMPROXY_RUNTIME_DIR", str(tmp_path))
    stats = _worker(3, 1, 1)
    opened = OpenConnection("203.0.113.7:4000", "127.0.0.1:5000", "127.0.0.1:22", 5, 7,
                            time.monotonic() - 65)  # fmt: skip
    refused = Rejection(time.time(), "127.0.0.1:5001", "203.0.113.8:4001", "target-unavailable",
                        "target 127.0.0.1:22 refused the connection")  # fmt: skip
    source = observe.Source(
        lambda: Snapshot(stats.snapshot()),
        lambda: State(False, 1),
        lambda: Details((opened,), (refused,)),
    )
    config = dataclasses.replace(Config(), metrics_listen=Address("127.0.0.1", 0))
    obs = observe.Observer(config, "unit", source)
    obs.start()
    yield obs
    obs.stop()


def _metrics_port(obs: observe.Observer) -> int:
    # The other server is the status socket's (AF_UNIX).
    server = next(s for s in obs._servers if getattr(s, "address_family", 0) != socket.AF_UNIX)
    address = server.server_address
    assert isinstance(address, tuple)
    return int(address[1])


def test_metrics_over_http(observer: observe.Observer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _metrics_port(observer), timeout=5)
    conn.request("GET", "/metrics")
    answer = conn.getresponse()
    assert answer.status == 200
    assert answer.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    assert samples(answer.read().decode())["mmproxy_connections_accepted_total"] == 3
    conn.request("GET", "/other")
    assert conn.getresponse().status == 404


def test_status_socket_and_its_printout(
    observer: observe.Observer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "unit" / "status.sock"
    assert path.stat().st_mode & 0o777 == 0o600
    doc = observe.read_status("unit")
    assert doc["connections"][0]["client"] == "203.0.113.7:4000"
    assert doc["counters"]["tcp"]["headers"] == {"v1 PROXY": 2}
    assert cli.main(["status", "unit"]) == 0
    out = capsys.readouterr().out
    assert "tcp: 1 active, 3 accepted" in out
    assert re.search(
        r"203\.0\.113\.7:4000 +127\.0\.0\.1:5000 +127\.0\.0\.1:22 +5 +7 +1m0[5-6]s", out
    )
    assert "client 203.0.113.8:4001 via 127.0.0.1:5001: target-unavailable: target" in out
    assert cli.main(["status", "unit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instance"] == "unit"


def test_the_status_socket_ignores_what_a_client_sends(observer: observe.Observer) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(observe.status_path("unit")))
        try:
            sock.sendall(b'{"stop": true}\n' * 100)
        except BrokenPipeError:
            pass  # answered and closed already: it never reads
        assert json.loads(sock.makefile("rb").read())["instance"] == "unit"


def test_status_of_an_instance_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MMPROXY_RUNTIME_DIR", str(tmp_path))
    assert cli.main(["status", "nothere"]) == 1
    assert "instance nothere is not running" in capsys.readouterr().err


def test_a_second_instance_of_the_same_name_leaves_the_socket_alone(
    observer: observe.Observer, caplog: pytest.LogCaptureFixture
) -> None:
    second = observe.Observer(Config(), "unit", observer.source)
    second.start()
    assert "instance running already" in caplog.text
    second.stop()
    assert observe.status_path("unit").exists()  # still the first one's
    assert observe.read_status("unit")["pid"] == os.getpid()


def test_a_reload_says_the_metrics_address_waits_for_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mmproxy import lifecycle
    from mmproxy.systemd import Notifier

    old = Config()
    new = dataclasses.replace(old, metrics_listen=Address("127.0.0.1", 9877))
    assert lifecycle.reload(old, lambda: new, Notifier(), lambda: "") is new
    assert "metrics_listen changed: it takes effect at the next restart" in caplog.text

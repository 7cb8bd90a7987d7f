"""Counters, live and as snapshots, and their sums across worker processes."""

from __future__ import annotations

from mmproxy.stats import Snapshot, TcpStats, UdpStats, total


def test_stats_of_several_workers_add_up() -> None:
    one, two, total = TcpStats(), TcpStats(), TcpStats()
    one.active, one.total, one.bytes_in = 1, 5, 100
    one.rejected["probe"] += 2
    two.active, two.total, two.bytes_out = 2, 7, 50
    two.rejected["probe"] += 1
    two.rejected["header-timeout"] += 1
    total.add(one.snapshot())
    total.add(two.snapshot())
    assert total.summary() == (
        "3 active, 12 total, rejected: header-timeout 1, probe 3, 100 bytes in, 50 bytes out"
    )


def test_udp_summary() -> None:
    stats = UdpStats(flows=2, total=5, packets_in=7, packets_out=6, bytes_in=70, bytes_out=60)
    stats.drop("invalid-header")
    stats.drop("invalid-header")
    stats.drop("no-flow")
    stats.evicted = 3
    assert stats.summary() == (
        "udp: 2 flows, 5 total, dropped: invalid-header 2, no-flow 1, "
        "7 packets (70 bytes) in, 6 packets (60 bytes) out, 3 flows evicted"
    )


def test_totals_add_tcp_and_udp_of_several_workers() -> None:
    one, two = TcpStats(active=1, total=4), TcpStats(active=2, total=3)
    udp_one, udp_two = UdpStats(flows=1, total=2), UdpStats(flows=3, total=5)
    udp_two.drop("no-flow")
    totals = total(
        Snapshot(one.snapshot(), udp_one.snapshot()), Snapshot(two.snapshot(), udp_two.snapshot())
    )
    assert totals.summary() == (
        "3 active, 7 total, rejected: none, 0 bytes in, 0 bytes out; "
        "udp: 4 flows, 7 total, dropped: no-flow 1, 0 packets (0 bytes) in, "
        "0 packets (0 bytes) out, 0 flows evicted"
    )


def test_an_ended_worker_keeps_its_totals_and_nothing_open() -> None:
    ended = Snapshot(TcpStats(active=5, total=9).snapshot(), UdpStats(flows=2, total=3).snapshot())
    totals = total(ended.ended())
    assert totals.summary().startswith("0 active, 9 total")
    assert "udp: 0 flows, 3 total" in totals.summary()


def test_a_udp_only_instance_says_udp_only() -> None:
    assert total(Snapshot(None, UdpStats(total=1).snapshot())).summary().startswith("udp: 0 flows")

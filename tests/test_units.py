"""The shipped systemd units: what they grant the daemon."""

from __future__ import annotations

from pathlib import Path

SERVICE = Path(__file__).parent.parent / "units" / "mmproxy@.service"
SOCKET = SERVICE.with_name("mmproxy@.socket")


def _values(key: str, unit: Path = SERVICE) -> list[str]:
    prefix = f"{key}="
    return [
        line[len(prefix) :] for line in unit.read_text().splitlines() if line.startswith(prefix)
    ]


def test_the_daemon_runs_no_routing_tool() -> None:
    """The routing checks (ip, nft, iptables) run in the socket's root ExecStartPre helper;
    the daemon's only netlink use is its own route dump (localaddr)."""
    assert _values("RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"]
    assert all("--no-host-checks" in v for v in _values("ExecStart"))


def test_the_routing_lives_with_the_socket() -> None:
    """Applied when the socket starts, removed when it stops: the service's start (on the
    first connection) runs the daemon alone (issue 15, the cold start)."""
    up = _values("ExecStartPre", SOCKET)
    assert up == ["/usr/bin/mmproxy routing up --instance %i -c /etc/mmproxy/%i.yaml"]
    assert _values("ExecStopPost", SOCKET) == ["/usr/bin/mmproxy routing down --instance %i"]
    assert _values("ExecStartPre") == _values("ExecStopPost") == []

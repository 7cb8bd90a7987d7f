"""The shipped systemd units: what they grant the daemon."""

from __future__ import annotations

from pathlib import Path

SERVICE = Path(__file__).parent.parent / "units" / "mmproxy@.service"


def _values(key: str) -> list[str]:
    prefix = f"{key}="
    return [
        line[len(prefix) :] for line in SERVICE.read_text().splitlines() if line.startswith(prefix)
    ]


def test_the_daemon_runs_no_routing_tool() -> None:
    """The routing checks (ip, nft, iptables) run in the root ExecStartPre helper; the
    daemon's only netlink use is its own route dump (localaddr)."""
    assert _values("RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"]
    assert any(v.startswith("+/usr/bin/mmproxy routing up ") for v in _values("ExecStartPre"))
    assert all("--no-host-checks" in v for v in _values("ExecStart"))

"""This host's addresses as the forged-source check sees them, read in a namespace made
here (issue 11, item 6): AnyIP prefixes, IPv6 local routes and directed broadcasts count;
mmproxy's own `local 0.0.0.0/0` in its routing table does not."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mmproxy.netns import NetNS, apply, link
from mmproxy.routing import lo_commands

# Run in a fresh process inside the namespace: /proc/self/net and netlink both see it.
PROBE = """
import json, sys
from mmproxy.localaddr import LocalAddresses, forbidden_source_reason
local = LocalAddresses()
print(json.dumps({host: forbidden_source_reason(host, local) for host in sys.argv[1:]}))
"""


@pytest.fixture
def ns() -> Iterator[NetNS]:
    with NetNS("mmp-local") as made:
        yield made


def reasons(ns: NetNS, *hosts: str) -> dict[str, str | None]:
    proc = subprocess.run(
        ns.exec_args(sys.executable, "-c", PROBE, *hosts),
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    result: dict[str, str | None] = json.loads(proc.stdout)
    return result


def test_local_route_prefixes_are_this_hosts(ns: NetNS) -> None:
    ns.ip("route", "add", "local", "198.51.100.0/24", "dev", "lo")  # AnyIP
    ns.ip("-6", "route", "add", "local", "2001:db8:5::/64", "dev", "lo")
    ns.ip("route", "add", "local", "203.0.113.64/26", "dev", "lo", "table", "main")
    ns.ip("-6", "addr", "add", "2001:db8:7::1/64", "dev", "lo", "nodad")
    found = reasons(
        ns, "198.51.100.7", "2001:db8:5::99", "203.0.113.70", "2001:db8:7::1",
        "203.0.113.7", "2001:db8:6::1",
    )  # fmt: skip
    assert found == {
        "198.51.100.7": "an address of this host",
        "2001:db8:5::99": "an address of this host",
        "203.0.113.70": "an address of this host",
        "2001:db8:7::1": "an address of this host",
        "203.0.113.7": None,
        "2001:db8:6::1": None,
    }


def test_a_local_subnets_directed_broadcast_is_refused(ns: NetNS) -> None:
    with NetNS("mmp-local-peer") as peer:
        # On a veth, not lo: an address on lo makes its whole subnet local.
        link(ns, peer, ["198.51.100.1/24"], ["198.51.100.2/24"])
        ns.ip("addr", "change", "198.51.100.1/24", "brd", "+", "dev", str(ns.veth))
        found = reasons(ns, "198.51.100.255", "198.51.100.1", "198.51.100.2")
    assert found == {
        "198.51.100.255": "a broadcast address of a local subnet",
        "198.51.100.1": "an address of this host",
        "198.51.100.2": None,
    }


def test_mmproxys_own_table_does_not_make_every_address_local(ns: NetNS) -> None:
    apply(ns, lo_commands(100))  # local 0.0.0.0/0 and ::/0 in table 100
    assert reasons(ns, "203.0.113.7", "2001:db8:6::1") == {
        "203.0.113.7": None,
        "2001:db8:6::1": None,
    }

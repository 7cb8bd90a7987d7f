"""mmproxy doctor's pure parts: reading the log and the journal, telling refused peers
apart, and matching routing rules. The diagnoses against real failures are in
tests/integration/test_doctor.py."""

from __future__ import annotations

import argparse
from ipaddress import ip_network

import pytest

from mmproxy import doctor
from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.doctor import Rejection, catches, from_journal_entry, parse_log_line, parse_since


def config(listen: list[str], allowed: list[str]) -> Config:
    addresses = tuple(Address(h.strip("[]"), int(p)) for h, p in (a.rsplit(":", 1) for a in listen))
    return Config(
        path="/etc/mmproxy/ssh.yaml",
        listen=addresses,
        ipv4=Address("127.0.0.1", 22),
        allowed_networks=tuple(ip_network(n) for n in allowed),
    )


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            "WARNING rejected 198.51.100.9:40110: peer is not in allowed_networks",
            Rejection("untrusted-balancer", "198.51.100.9", "peer is not in allowed_networks"),
        ),
        (
            "2026-12-04 10:00:00,123 WARNING rejected [::ffff:198.51.100.9]:4: peer is not in "
            "allowed_networks",
            Rejection("untrusted-balancer", "198.51.100.9", "peer is not in allowed_networks"),
        ),
        (
            "WARNING rejected [2001:db8::7]:5: no complete PROXY header within 5 s (0 bytes "
            "received)",
            Rejection(
                "header-timeout",
                "2001:db8::7",
                "no complete PROXY header within 5 s (0 bytes received)",
            ),
        ),
        (
            "WARNING rejected client 203.0.113.7:40000 via 127.0.0.1:5: cannot set "
            "IP_TRANSPARENT: the process needs CAP_NET_ADMIN",
            Rejection(
                "target-unavailable",
                "127.0.0.1",
                "cannot set IP_TRANSPARENT: the process needs CAP_NET_ADMIN",
            ),
        ),
        (
            "WARNING dropped a datagram from 198.51.100.7:9: not in allowed_networks",
            Rejection("untrusted-balancer", "198.51.100.7", "not in allowed_networks"),
        ),
        (
            "WARNING 40 more connections rejected (invalid-header) in the last 10 s",
            Rejection(
                "invalid-header",
                "",
                "WARNING 40 more connections rejected (invalid-header) in the last 10 s",
                40,
            ),
        ),
        ("INFO 203.0.113.7:5 via 127.0.0.1:6 -> 127.0.0.1:22: client closed first", None),
        ("[!] FAILED    can set IP_TRANSPARENT: the process needs CAP_NET_ADMIN", None),
    ],
)
def test_parse_log_line(line: str, expected: Rejection | None) -> None:
    assert parse_log_line(line) == expected


def test_journal_entries_give_the_reason_and_balancer_from_their_fields() -> None:
    entry = {
        "MESSAGE": "rejected 198.51.100.9:40110: peer is not in allowed_networks",
        "CLOSE_REASON": "untrusted-balancer",
        "LB_ADDR": "198.51.100.9",
        "LB_PORT": 40110,
    }
    assert from_journal_entry(entry) == Rejection(
        "untrusted-balancer", "198.51.100.9", "peer is not in allowed_networks"
    )
    summary = {"MESSAGE": "12 more ...", "CLOSE_REASON": "header-timeout", "SUPPRESSED": 12}
    assert from_journal_entry(summary) == Rejection("header-timeout", "", "12 more ...", 12)
    served = {"MESSAGE": "203.0.113.7:5 via ...: client closed first", "CLOSE_REASON": "x"}
    assert from_journal_entry(served) is None
    assert from_journal_entry({"MESSAGE": "listening on 0.0.0.0:2222"}) is None


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400)])
def test_parse_since(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


def test_parse_since_refuses_other_text() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="like 30m"):
        parse_since("yesterday")


def refused(*hosts: str) -> list[Rejection]:
    return [Rejection("untrusted-balancer", h, "peer is not in allowed_networks") for h in hosts]


def test_few_refused_peers_are_a_balancer_many_are_clients() -> None:
    cfg = config(["0.0.0.0:2222"], ["192.0.2.10/32"])
    one = doctor.untrusted_peers(cfg, refused("198.51.100.7", "198.51.100.7"))
    assert [f.key for f in one] == ["unknown-balancer"]
    assert "2 connections from 198.51.100.7" in one[0].seen
    many = doctor.untrusted_peers(cfg, refused(*(f"203.0.113.{n}" for n in range(10))))
    assert [f.key for f in many] == ["direct-clients"]
    assert "ip saddr != { 192.0.2.10/32 } drop" in many[0].fix
    assert "and 5 more" in many[0].seen


def test_an_ipv4_peer_on_a_dual_stack_listener_is_the_mapped_case() -> None:
    mapped = config(["[::]:2222"], ["::/0"])
    assert [f.key for f in doctor.mapped_balancers(mapped, refused("198.51.100.7"))] == [
        "ipv4-mapped-balancer"
    ]
    assert doctor.untrusted_peers(mapped, refused("198.51.100.7")) == []
    # With an IPv4 listener on the port, [::] takes IPv6 only: not the mapped case.
    both = config(["[::]:2222", "0.0.0.0:2222"], ["::/0"])
    assert doctor.mapped_balancers(both, refused("198.51.100.7")) == []
    # IPv4 entries exist (and mmproxy matches mapped peers against them): a plain miss.
    v4 = config(["[::]:2222"], ["192.0.2.0/24"])
    assert doctor.mapped_balancers(v4, refused("198.51.100.7")) == []


def test_missing_header_counts_allowed_balancers_only() -> None:
    cfg = config(["0.0.0.0:2222"], ["198.51.100.7/32"])
    rejections = [
        Rejection("invalid-header", "198.51.100.7", "not a PROXY protocol header: looks like HTTP"),
        Rejection("header-timeout", "198.51.100.7", "no complete PROXY header within 5 s"),
        Rejection("invalid-header", "203.0.113.9", "from elsewhere"),
    ]
    found = doctor.missing_header(cfg, rejections)
    assert [f.key for f in found] == ["no-proxy-header"]
    assert "2 connections from the allowed balancer(s) 198.51.100.7" in found[0].seen
    assert doctor.missing_header(cfg, rejections[2:]) == []


@pytest.mark.parametrize(
    "rule, source, mark, expected",
    [
        ({"priority": 100, "src": "all", "table": "main"}, "127.0.0.1", 0, True),
        ({"priority": 100, "src": "127.0.0.1", "srclen": 8, "table": "main"}, "127.0.0.1", 0, True),
        ({"priority": 100, "src": "10.0.0.0", "srclen": 8, "table": "main"}, "127.0.0.1", 0, False),
        ({"priority": 100, "src": "all", "iif": "eth0", "table": "7"}, "127.0.0.1", 0, False),
        ({"priority": 100, "src": "all", "iif": "lo", "table": "7"}, "::1", 0, True),
        ({"priority": 100, "src": "::1", "table": "main"}, "::1", 0, True),  # no srclen: /128
        ({"priority": 100, "src": "127.0.0.1", "table": "main"}, "127.0.0.2", 0, False),
        ({"priority": 100, "src": "all", "fwmark": "0x7b", "table": "7"}, "10.0.0.5", 123, True),
        ({"priority": 100, "src": "all", "fwmark": "0x7b", "table": "7"}, "10.0.0.5", 0, False),
        (
            {"priority": 100, "src": "all", "fwmark": "0x100", "fwmask": "0xff00", "table": "7"},
            "10.0.0.5",
            0x17B,
            True,
        ),
        ({"priority": 100, "not": None, "src": "10.0.0.0", "srclen": 8}, "127.0.0.1", 0, True),
        ({"priority": 100, "src": "all", "uid_start": 0, "uid_end": 9}, "127.0.0.1", 0, None),
    ],
)
def test_which_rules_catch_the_replies(
    rule: dict[str, object], source: str, mark: int, expected: bool | None
) -> None:
    assert catches(rule, source, mark) == expected


def test_mmproxys_rule_is_written_back_as_ip_rule_arguments() -> None:
    lo = {"priority": 32765, "src": "127.0.0.1", "srclen": 8, "iif": "lo", "table": "100"}
    assert doctor.routing_selector(lo) == ["from", "127.0.0.1/8", "iif", "lo", "lookup", "100"]
    six = {"priority": 32765, "src": "::1", "iif": "lo", "table": "100"}
    assert doctor.routing_selector(six) == ["from", "::1/128", "iif", "lo", "lookup", "100"]
    mark = {"priority": 32765, "src": "all", "fwmark": "0x7b", "table": "100"}
    assert doctor.routing_selector(mark) == ["fwmark", "0x7b/0xffffffff", "lookup", "100"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/usr/bin/python3", "/usr/bin/mmproxy", "run", "--instance", "ssh", "-c", "x"], True),
        (["/usr/bin/python3", "-IS", "/usr/bin/mmproxy", "--instance", "ssh"], True),  # the .deb's
        (["/usr/bin/python3", "-m", "mmproxy", "-c", "/etc/mmproxy/ssh.yaml", "-v"], True),
        (["/usr/bin/python3", "-m", "mmproxy", "-c", "/etc/mmproxy/web.yaml"], False),
        (["/usr/bin/python3", "/usr/bin/mmproxy", "doctor", "-c", "/etc/mmproxy/ssh.yaml"], False),
        (["/usr/bin/vim", "/etc/mmproxy/ssh.yaml"], False),
    ],
)
def test_the_running_instance_is_found_by_its_command_line(argv: list[str], expected: bool) -> None:
    cfg = config(["0.0.0.0:2222"], ["192.0.2.10/32"])
    assert doctor._is_instance(argv, cfg, "ssh") == expected

"""Which source a header may claim and which target it gets, for TCP and UDP alike."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.localaddr import LocalAddresses, LocalRoute
from mmproxy.policy import UDP_FAMILIES, Claims, Rejected, route
from mmproxy.proxy_protocol import encode_v1, encode_v2, parse

CONFIG = Config(ipv4=Address("127.0.0.1", 22), ipv6=Address("::1", 22))
LOCAL = LocalAddresses()
BALANCER = ("198.51.100.7", 40001)


def header(family: str, source: str, version: int = 2) -> bytes:
    destination = "2001:db8::2" if ":" in source else "198.51.100.1"
    if version == 1:
        return encode_v1(family, (source, 40000), (destination, 2222))
    return encode_v2("PROXY", family, (source, 40000), (destination, 2222))


@pytest.mark.parametrize(
    ("data", "families", "expected"),
    [
        (header("TCP4", "203.0.113.7"), None, (Address("203.0.113.7", 40000), CONFIG.ipv4)),
        (header("TCP6", "2001:db8::7", 1), None, (Address("2001:db8::7", 40000), CONFIG.ipv6)),
        (header("UDP4", "203.0.113.7"), UDP_FAMILIES, (Address("203.0.113.7", 40000), CONFIG.ipv4)),
        (encode_v2("LOCAL", "UNSPEC"), UDP_FAMILIES, (Address(*BALANCER), CONFIG.ipv4)),
        (encode_v1("UNKNOWN"), None, (Address(*BALANCER), CONFIG.ipv4)),
    ],
    ids=["tcp4", "tcp6-v1", "udp4", "local", "unknown"],
)
def test_route(
    data: bytes, families: tuple[str, str] | None, expected: tuple[Address | None, Address]
) -> None:
    parsed = parse(data)
    args = (parsed, CONFIG, LOCAL, BALANCER)
    assert (route(*args, families) if families else route(*args)) == expected


@pytest.mark.parametrize(
    ("data", "families", "reason", "detail"),
    [
        (
            header("UDP4", "203.0.113.7"),
            None,
            "unsupported-family",
            "UDP4 cannot be forwarded over TCP",
        ),
        (header("TCP4", "203.0.113.7"), UDP_FAMILIES, "unsupported-family", "over UDP"),
        (header("TCP4", "127.0.0.1"), None, "forged-local-source", "which is loopback"),
        (header("TCP6", "::"), None, "forged-local-source", "which is unspecified"),
        (header("UDP4", "224.0.0.1"), UDP_FAMILIES, "forged-local-source", "which is multicast"),
    ],
    ids=["udp-over-tcp", "tcp-over-udp", "loopback", "unspecified", "multicast"],
)
def test_refused(data: bytes, families: tuple[str, str] | None, reason: str, detail: str) -> None:
    with pytest.raises(Rejected) as caught:
        route(parse(data), CONFIG, LOCAL, BALANCER, *([families] if families else []))
    assert caught.value.reason == reason
    assert detail in str(caught.value)


def test_no_target_for_the_family() -> None:
    with pytest.raises(Rejected, match="is ipv6 but no `ipv6` target"):
        route(
            parse(header("UDP6", "2001:db8::7")),
            Config(ipv4=CONFIG.ipv4),
            LOCAL,
            BALANCER,
            UDP_FAMILIES,
        )


def test_follow_destination_port() -> None:
    config = Config(
        ipv4=CONFIG.ipv4, follow_destination_port=True, allowed_destination_ports=((2222, 2222),)
    )
    assert route(parse(header("TCP4", "203.0.113.7")), config, LOCAL, BALANCER)[1] == Address(
        "127.0.0.1", 2222
    )


@pytest.mark.parametrize("data", [encode_v2("LOCAL", "UNSPEC"), encode_v1("UNKNOWN")])
@pytest.mark.parametrize(
    ("balancer", "expected"),
    [
        (("198.51.100.7", 40001), (Address("198.51.100.7", 40001), CONFIG.ipv4)),
        (("::ffff:198.51.100.7", 40001), (Address("198.51.100.7", 40001), CONFIG.ipv4)),
        (("2001:db8::7", 40001), (Address("2001:db8::7", 40001), CONFIG.ipv6)),
        (("127.0.0.1", 40001), (None, CONFIG.ipv4)),
        (("::1", 40001), (None, CONFIG.ipv4)),
    ],
    ids=["remote4", "remote4-mapped", "remote6", "loopback4", "loopback6"],
)
def test_health_checks_speak_as_the_balancer(
    data: bytes, balancer: tuple[str, int], expected: tuple[Address | None, Address]
) -> None:
    """LOCAL / UNKNOWN: the application sees the balancer's own address (the spec's real
    endpoints), never this host's: a remote balancer gets no local identity."""
    assert route(parse(data), CONFIG, LOCAL, balancer) == expected


def test_health_check_from_this_hosts_own_address_is_plain() -> None:
    local = LocalAddresses(reader=lambda: [LocalRoute(ip_network("192.0.2.10/32"), 2)])
    assert route(parse(encode_v1("UNKNOWN")), CONFIG, local, ("192.0.2.10", 1)) == (
        None,
        CONFIG.ipv4,
    )


def test_health_check_is_spoofed_while_local_addresses_cannot_be_read() -> None:
    """Failing closed must not hand out local identity: an unknown balancer is remote."""

    def unreadable() -> list[LocalRoute]:
        raise OSError("netlink refused")

    local = LocalAddresses(reader=unreadable)
    assert route(parse(encode_v1("UNKNOWN")), CONFIG, local, BALANCER) == (
        Address(*BALANCER),
        CONFIG.ipv4,
    )


def test_health_check_needs_a_target_of_the_balancers_family() -> None:
    with pytest.raises(Rejected, match="is ipv6 but no `ipv6` target") as caught:
        route(parse(encode_v1("UNKNOWN")), Config(ipv4=CONFIG.ipv4), LOCAL, ("2001:db8::7", 1))
    assert caught.value.reason == "no-target"


@pytest.mark.parametrize("families", [None, UDP_FAMILIES], ids=["tcp", "udp"])
@pytest.mark.parametrize(
    "source",
    ["::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "::ffff:0:7f00:1", "fe80::1",
     "169.254.169.254"],
)  # fmt: skip
def test_embedded_and_link_local_sources_are_refused(
    source: str, families: tuple[str, str] | None
) -> None:
    """Issue 11, item 7: TCP and UDP both go through route(), so both refuse these."""
    family = ("UDP" if families else "TCP") + ("6" if ":" in source else "4")
    with pytest.raises(Rejected) as caught:
        extra = [families] if families else []
        route(parse(header(family, source)), CONFIG, LOCAL, BALANCER, *extra)
    assert caught.value.reason == "forged-local-source"


@pytest.mark.parametrize("families", [None, UDP_FAMILIES], ids=["tcp", "udp"])
def test_follow_destination_port_only_to_the_listed_ports(
    families: tuple[str, str] | None,
) -> None:
    """Issue 11, item 8: the balancer may not pick any port on the target host."""
    config = Config(
        ipv4=CONFIG.ipv4,
        follow_destination_port=True,
        allowed_destination_ports=((80, 80), (8000, 8099)),
    )
    family = "UDP4" if families else "TCP4"
    extra = [families] if families else []

    def target(port: int) -> Address:
        data = encode_v2("PROXY", family, ("203.0.113.7", 40000), ("198.51.100.1", port))
        return route(parse(data), config, LOCAL, BALANCER, *extra)[1]

    assert target(80) == Address("127.0.0.1", 80)
    assert target(8000) == Address("127.0.0.1", 8000)
    assert target(8099) == Address("127.0.0.1", 8099)
    for port in (22, 79, 8100, 6379, 0):
        with pytest.raises(Rejected) as caught:
            target(port)
        assert caught.value.reason == "destination-port"
        assert f"destination port {port}," in str(caught.value)


# --- Claims: route() remembered per claimed host ------------------------------------------


def test_claims_answer_as_route_does_and_remember_what_they_let_through() -> None:
    local = LocalAddresses(max_age=3600)
    claims = Claims(CONFIG, local)
    for port in (1, 2):
        got = claims.route("PROXY", "TCP4", ("203.0.113.7", port), ("198.51.100.1", 22), BALANCER)
        assert got == (Address("203.0.113.7", port), CONFIG.ipv4)
    assert claims.route("PROXY", "TCP6", ("2001:db8::7", 3), None, BALANCER) == (
        Address("2001:db8::7", 3),
        CONFIG.ipv6,
    )


def test_a_claim_let_through_is_refused_once_the_host_owns_the_address() -> None:
    routes: list[LocalRoute] = []
    local = LocalAddresses(max_age=0.0, reader=lambda: list(routes))
    claims = Claims(CONFIG, local)
    claims.route("PROXY", "TCP4", ("203.0.113.7", 1), None, BALANCER)  # remembered
    routes.append(LocalRoute(ip_network("203.0.113.7/32"), 2))  # now this host's (RTN_LOCAL)
    with pytest.raises(Rejected) as caught:
        claims.route("PROXY", "TCP4", ("203.0.113.7", 2), None, BALANCER)
    assert caught.value.reason == "forged-local-source"


def test_refusals_are_never_remembered_and_keep_their_exact_message() -> None:
    claims = Claims(CONFIG, LocalAddresses(max_age=3600))
    for port in (1, 2):
        with pytest.raises(Rejected, match=f"claims source 127.0.0.1:{port}, which is loopback"):
            claims.route("PROXY", "TCP4", ("127.0.0.1", port), None, BALANCER)


def test_claims_follow_the_destination_port_without_remembering() -> None:
    config = Config(
        ipv4=Address("127.0.0.1", 22),
        follow_destination_port=True,
        allowed_destination_ports=((22, 23),),
    )
    claims = Claims(config, LocalAddresses(max_age=3600))
    for port in (22, 23):
        assert claims.route("PROXY", "TCP4", ("203.0.113.7", 1), ("198.51.100.1", port), BALANCER)[
            1
        ] == Address("127.0.0.1", port)
    with pytest.raises(Rejected, match="destination port 24"):
        claims.route("PROXY", "TCP4", ("203.0.113.7", 1), ("198.51.100.1", 24), BALANCER)

"""What a PROXY header may make mmproxy do: the source it may claim, the target it gets.

Shared by the TCP forwarder and the UDP one, so that both refuse the same forgeries.
"""

from __future__ import annotations

import ipaddress

from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.localaddr import UNREADABLE, LocalAddresses, forbidden_source_reason, unmap
from mmproxy.proxy_protocol import ProxyHeader

TCP_FAMILIES = ("TCP4", "TCP6")
UDP_FAMILIES = ("UDP4", "UDP6")


class Rejected(Exception):
    """A connection or datagram is refused; `reason` is a short key for counters and the
    journal's CLOSE_REASON, str() the detail; `code` the errno name of a failed connect
    to the target (for its counter), else ""."""

    def __init__(self, reason: str, detail: str, code: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.code = code


def route(
    header: ProxyHeader,
    config: Config,
    local: LocalAddresses,
    balancer: tuple[str, int],
    families: tuple[str, str] = TCP_FAMILIES,
) -> tuple[Address | None, Address]:
    """(spoofed source or None, target) for a header; Rejected when it may not be served.

    `balancer` is the real peer (host unmapped, port); `families` are the header families
    this transport forwards (TCP4/TCP6 or UDP4/UDP6). None as the source means a plain
    connection from this host.
    """
    return route_claim(
        header.command, header.family, header.source, header.destination,
        config, local, balancer, families,
    )  # fmt: skip


def route_claim(
    command: str,
    family: str,
    claimed: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    config: Config,
    local: LocalAddresses,
    balancer: tuple[str, int],
    families: tuple[str, str] = TCP_FAMILIES,
) -> tuple[Address | None, Address]:
    """route() from a header's fields, for the forwarder's pre-parsed headers."""
    if command == "LOCAL" or family == "UNKNOWN":
        return balancer_route(config, local, balancer)
    if family not in families or claimed is None:
        over = "UDP" if families == UDP_FAMILIES else "TCP"
        raise Rejected(
            "unsupported-family",
            f"header family {family} cannot be forwarded over {over}",
        )
    host = unmap(claimed[0])
    source = Address(host, claimed[1])
    target = config.ipv6 if ":" in host else config.ipv4
    if target is None:
        version = "ipv6" if ":" in host else "ipv4"
        raise Rejected(
            "no-target",
            f"client {source} is {version} but no `{version}` target is configured",
        )
    if not config.allow_local_sources:
        why = forbidden_source_reason(host, local)
        if why is not None:
            raise Rejected(
                "forged-local-source",
                f"header claims source {source}, which is {why} "
                "(set allow_local_sources: true to permit)",
            )
    if config.follow_destination_port and destination is not None:
        port = destination[1]
        if not config.destination_port_allowed(port):
            raise Rejected(
                "destination-port",
                f"header asks for destination port {port}, which allowed_destination_ports "
                "does not list",
            )
        target = Address(target.host, port)
    return source, target


class Claims:
    """route_claim() for one config, remembering which claimed hosts it let through (and
    their target) until this host's addresses are read again: a connection from a
    client seen before skips the checks' lookups. Refusals are never remembered, so
    their messages stay exact; a new config gets a new Claims."""

    _LIMIT = 65536  # hosts remembered at most; then it starts over

    def __init__(self, config: Config, local: LocalAddresses) -> None:
        self._config = config
        self._local = local
        self._generation = -1
        self._targets: dict[tuple[str, str], Address] = {}
        self._fast: dict[tuple[str, str], tuple[str, int]] = {}  # the same, for C
        # follow_destination_port makes the target depend on more than the host.
        self._enabled = not config.follow_destination_port

    def fresh(self) -> dict[tuple[str, str], tuple[str, int]]:
        """The claims let through, (family, host) -> (target host, port), emptied first
        when this host's addresses were read again: what the C hand-shake may repeat."""
        generation = self._local.generation()
        if generation != self._generation or len(self._targets) >= self._LIMIT:
            self._targets.clear()
            self._fast.clear()
            self._generation = generation
        return self._fast

    def route(
        self,
        command: str,
        family: str,
        claimed: tuple[str, int] | None,
        destination: tuple[str, int] | None,
        balancer: tuple[str, int],
        families: tuple[str, str] = TCP_FAMILIES,
    ) -> tuple[Address | None, Address]:
        if claimed is None or command != "PROXY" or family not in families or not self._enabled:
            return route_claim(
                command, family, claimed, destination, self._config, self._local, balancer,
                families,
            )  # fmt: skip
        self.fresh()
        targets = self._targets
        key = (family, claimed[0])
        target = targets.get(key)
        if target is not None:
            return Address(key[1], claimed[1]), target
        source, target = route_claim(
            command, family, claimed, destination, self._config, self._local, balancer, families
        )
        if source is not None and source.host == claimed[0]:
            targets[key] = target
            self._fast[key] = (target.host, target.port)
        return source, target


def balancer_route(
    config: Config, local: LocalAddresses, balancer: tuple[str, int]
) -> tuple[Address | None, Address]:
    """The route of a header that speaks for the balancer itself (LOCAL, UNKNOWN).

    The spec says to use the real endpoints: the application must see the balancer, never
    this host, or any allowed balancer could reach it "from localhost". Only a balancer
    on this host itself is connected plainly.
    """
    host = unmap(balancer[0])
    if is_this_host(host, local):
        target = config.ipv4 or config.ipv6
        assert target is not None  # the config layer requires one
        return None, target
    version = "ipv6" if ":" in host else "ipv4"
    target = config.ipv6 if version == "ipv6" else config.ipv4
    if target is None:
        raise Rejected(
            "no-target",
            f"the balancer's own connection from {host} is {version} "
            f"but no `{version}` target is configured",
        )
    return Address(host, balancer[1]), target


def is_this_host(host: str, local: LocalAddresses) -> bool:
    """A loopback address or one known to be this host's. Unknown while the addresses
    cannot be read: then the balancer is taken as remote (spoofed from its own address),
    so a read failure never hands out local identity."""
    if ipaddress.ip_address(host).is_loopback:
        return True
    why = local.reason(host)
    return why is not None and why != UNREADABLE

"""What a PROXY header may make mmproxy do: the source it may claim, the target it gets.

Shared by the TCP forwarder and the UDP one, so that both refuse the same forgeries.
"""

from __future__ import annotations

from mmproxy.config import Address, Config
from mmproxy.localaddr import LocalAddresses, forbidden_source_reason, unmap
from mmproxy.proxy_protocol import ProxyHeader

TCP_FAMILIES = ("TCP4", "TCP6")
UDP_FAMILIES = ("UDP4", "UDP6")


class Rejected(Exception):
    """A connection or datagram is refused; `reason` is a short key for counters and the
    journal's CLOSE_REASON, str() the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def route(
    header: ProxyHeader,
    config: Config,
    local: LocalAddresses,
    families: tuple[str, str] = TCP_FAMILIES,
) -> tuple[Address | None, Address]:
    """(spoofed source or None, target) for a header; Rejected when it may not be served.

    `families` are the header families this transport forwards (TCP4/TCP6 or UDP4/UDP6).
    """
    if header.command == "LOCAL" or header.family == "UNKNOWN":
        # The balancer's own health check: it speaks for itself, not for a client.
        target = config.ipv4 or config.ipv6
        assert target is not None  # the config layer requires one
        return None, target
    if header.family not in families or header.source is None:
        over = "UDP" if families == UDP_FAMILIES else "TCP"
        raise Rejected(
            "unsupported-family",
            f"header family {header.family} cannot be forwarded over {over}",
        )
    host = unmap(header.source[0])
    source = Address(host, header.source[1])
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
    if config.follow_destination_port and header.destination is not None:
        port = header.destination[1]
        if not config.destination_port_allowed(port):
            raise Rejected(
                "destination-port",
                f"header asks for destination port {port}, which allowed_destination_ports "
                "does not list",
            )
        target = Address(target.host, port)
    return source, target

"""The network: a gateway namespace (gateway + application) and a client namespace (the
load generator, standing in for the balancer), joined by a veth pair, with IPv4 and IPv6.
Nothing leaves them.

    client ns 198.51.100.7 (+ .10-.41)  ──veth── 198.51.100.1 gateway ns
              2001:db8:100::7 (+ ::10-::2f)       2001:db8:100::1
                                  gateway :800x ──> backend 127.0.0.1:9000 or [::1]:9000
                                  direct:  client ──> backend on the veth address :9000
"""

from __future__ import annotations

from dataclasses import dataclass

from mmproxy.netns import NetNS, apply, link
from mmproxy.routing import lo_commands

MARK, TABLE = 123, 100
GW4, PEER4 = "198.51.100.1", "198.51.100.7"
GW6, PEER6 = "2001:db8:100::1", "2001:db8:100::7"
BACKEND_PORT = 9000
# Extra client-side addresses: many source addresses keep the client's ephemeral ports
# (and their TIME_WAIT) from running out in the rate test.
SOURCES = [PEER4] + [f"198.51.100.{i}" for i in range(10, 42)]
SOURCES6 = [PEER6] + [f"2001:db8:100::{i:x}" for i in range(0x10, 0x30)]
ALLOWED_NETWORK = "198.51.100.0/24"
ALLOWED_NETWORK6 = "2001:db8:100::/64"
ALLOWED_NETWORKS = (ALLOWED_NETWORK, ALLOWED_NETWORK6)


@dataclass(frozen=True)
class Family:
    """One address family of the test bed: where the gateway listens, the client's
    source addresses, where the application listens behind a gateway."""

    key: str  # "ipv4" / "ipv6": in metric names and JSON
    name: str  # shown in tables
    gateway: str  # the gateway namespace's veth address
    sources: tuple[str, ...]
    backend: str  # the application's address behind a gateway (loopback)
    target_flag: str  # mmproxy's and go-mmproxy's target option for it

    def endpoint(self, host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


IPV4 = Family("ipv4", "IPv4", GW4, tuple(SOURCES), "127.0.0.1", "-4")
IPV6 = Family("ipv6", "IPv6", GW6, tuple(SOURCES6), "::1", "-6")
FAMILIES = {f.key: f for f in (IPV4, IPV6)}


class Testbed:
    """The two namespaces with addresses, sysctls and mmproxy's lo routing applied."""

    def __init__(self) -> None:
        self.gw = NetNS("mmb-gw")
        try:
            self.peer = NetNS("mmb-cl")
        except BaseException:
            self.gw.delete()
            raise
        try:
            self._configure()
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        link(self.gw, self.peer, [f"{GW4}/24", f"{GW6}/64"], [f"{PEER4}/24", f"{PEER6}/64"])
        assert self.peer.veth is not None
        for addr in SOURCES[1:]:
            self.peer.ip("addr", "add", f"{addr}/24", "dev", self.peer.veth)
        for addr in SOURCES6[1:]:
            self.peer.ip("addr", "add", f"{addr}/64", "dev", self.peer.veth, "nodad")
        self.peer.sysctl("net.ipv4.ip_local_port_range", "1024 65000")  # IPv6's too
        self.peer.sysctl("net.ipv4.tcp_tw_reuse", "1")
        # The loopback variant of mmproxy's routing, IPv4 and IPv6 (from ::1/128 iif lo);
        # HAProxy's usesrc and go-mmproxy rely on the same rules (replies from the
        # loopback to a spoofed client go back to lo).
        apply(self.gw, lo_commands(TABLE))

    def close(self) -> None:
        self.gw.delete()
        self.peer.delete()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

"""The network: a gateway namespace (gateway + application) and a client namespace (the
load generator, standing in for the balancer), joined by a veth pair. Nothing leaves them.

    client ns 198.51.100.7 (+ .10-.41) ──veth── 198.51.100.1 gateway ns
                                                  gateway :800x ──> backend 127.0.0.1:9000
                                                  direct:  client ──> backend 198.51.100.1:9000
"""

from __future__ import annotations

from mmproxy.netns import NetNS, apply, link
from mmproxy.routing import lo_commands

MARK, TABLE = 123, 100
GW4, PEER4 = "198.51.100.1", "198.51.100.7"
BACKEND_PORT = 9000
# Extra client-side addresses: many source addresses keep the client's ephemeral ports
# (and their TIME_WAIT) from running out in the rate test.
SOURCES = [PEER4] + [f"198.51.100.{i}" for i in range(10, 42)]
ALLOWED_NETWORK = "198.51.100.0/24"


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
        link(self.gw, self.peer, [f"{GW4}/24"], [f"{PEER4}/24"])
        assert self.peer.veth is not None
        for addr in SOURCES[1:]:
            self.peer.ip("addr", "add", f"{addr}/24", "dev", self.peer.veth)
        self.peer.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        self.peer.sysctl("net.ipv4.tcp_tw_reuse", "1")
        # The loopback variant of mmproxy's routing; HAProxy's usesrc and go-mmproxy rely
        # on the same rules (replies from 127.0.0.1 to a spoofed client go back to lo).
        apply(self.gw, lo_commands(TABLE))

    def close(self) -> None:
        self.gw.delete()
        self.peer.delete()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

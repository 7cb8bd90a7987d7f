"""A `listen:` port range under a real systemd: the generator writes one ListenStream=
per port, systemd passes every socket, and with follow_destination_port each port of
the range reaches the same port on the target (issue 13)."""

from __future__ import annotations

from mmproxy.proxy_protocol import encode_v2

from .test_service import CLIENT4, GW4, World, install_tree, world  # noqa: F401

INSTANCE = """\
listen: "198.51.100.1:9100-9102"
ipv4: "127.0.0.1:9100"
allowed_networks: ["198.51.100.0/24"]
follow_destination_port: true
allowed_destination_ports: ["9100-9102"]
"""


def test_a_range_is_socket_activated_port_by_port(world: World) -> None:  # noqa: F811
    box = world.box
    for port in (9100, 9101, 9102):
        # On 127.0.0.1: a listener on 0.0.0.0 of the same port would clash with them.
        box.systemctl("start", f"backend@{port}.service")
    box.write("/etc/mmproxy/game.yaml", INSTANCE)
    world.enable("game")
    listens = box.sh("systemctl", "show", "-p", "Listen", "mmproxy@game.socket").stdout
    for port in (9100, 9101, 9102):
        assert f"{GW4}:{port} (Stream)" in listens, listens
    for port in (9102, 9100, 9101):
        header = encode_v2("PROXY", "TCP4", (CLIENT4, 40000 + port % 100), (GW4, port))
        with world.peer.connect((GW4, port), timeout=20) as sock:
            sock.sendall(header)
            line = sock.makefile("rb").readline().decode().strip()
        assert line == f"{CLIENT4} {40000 + port % 100}"
    for port in (9100, 9101, 9102):  # records come from the logging thread, a moment later
        box.wait_journal("mmproxy@game", f"-> 127.0.0.1:{port}")

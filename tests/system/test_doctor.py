"""`mmproxy doctor` on an installed instance under a real systemd: it reads the refusals
from the instance's journal (CLOSE_REASON and LB_ADDR fields), not from a log file."""

from __future__ import annotations

from .test_service import GW4, PEER4, World, install_tree, instance_yaml, world  # noqa: F401


def test_doctor_reads_the_instances_journal(world: World) -> None:  # noqa: F811
    yaml = instance_yaml(2222, 9000).replace("198.51.100.0/24", "192.0.2.10/32")
    world.box.write("/etc/mmproxy/ssh.yaml", yaml)
    world.enable("ssh")
    with world.peer.connect((GW4, 2222), timeout=10) as sock:  # the balancer, not allowed
        sock.settimeout(10)
        assert sock.recv(100) == b""
    world.box.wait_journal("mmproxy@ssh", "peer is not in allowed_networks")
    out = world.box.sh("mmproxy", "doctor", "-c", "/etc/mmproxy/ssh.yaml", check=False)
    print(f"\n$ mmproxy doctor -c /etc/mmproxy/ssh.yaml\n{out.stdout}")  # shown with -s
    assert "(journal of mmproxy@ssh.service: 1 refusal)" in out.stdout, out.stdout + out.stderr
    assert f"DIAGNOSIS unknown-balancer: 1 connection from {PEER4} refused" in out.stdout
    assert "0 failed, 1 diagnoses" in out.stdout
    assert out.returncode == 1

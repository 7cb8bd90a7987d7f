"""Managed routing (`mmproxy routing up|down`) and the self-checks, in namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mmproxy.netns import NetNS, link

from .conftest import GW4, GW6, PEER4, PEER6, Net, start_backend


@pytest.fixture
def bare() -> Iterator[Net]:
    """Namespaces with addresses and default routes but no mmproxy routing at all."""
    gw, peer = NetNS("mmp-gw"), NetNS("mmp-peer")
    link(gw, peer, [f"{GW4}/24", f"{GW6}/64"], [f"{PEER4}/24", f"{PEER6}/64"])
    gw.ip("route", "add", "default", "via", PEER4)
    gw.ip("-6", "route", "add", "default", "via", PEER6)
    assert gw.veth is not None
    gw.sysctl(f"net.ipv4.conf.{gw.veth}.route_localnet", "1")
    yield Net(gw, peer, "none")
    gw.delete()
    peer.delete()


def mmproxy(net: Net, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MMPROXY_RUNTIME_DIR": str(tmp_path / "run")}
    return subprocess.run(
        net.gw.exec_args(sys.executable, "-m", "mmproxy", *args),
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def write_config(tmp_path: Path, name: str, **keys: object) -> Path:
    config: dict[str, object] = {
        "listen": "127.0.0.1:2222",
        "allowed_networks": ["127.0.0.0/8"],
        "connect_timeout": 1,
    }
    config.update(keys)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rules(net: Net, family: int = 4) -> str:
    return net.gw.sh("ip", f"-{family}", "rule", "show").stdout


def test_check_fails_with_the_fix_then_passes_after_routing_up(bare: Net, tmp_path: Path) -> None:
    app4, app6 = start_backend(bare.gw, "127.0.0.1"), start_backend(bare.gw, "::1")
    config = write_config(tmp_path, "ssh", ipv4=app4.address, ipv6=app6.address)
    before = mmproxy(bare, tmp_path, "check", "-c", str(config))
    assert before.returncode == 1
    assert "[!] FAILED    ip -4 rule add from 127.0.0.1/8 iif lo table 100" in before.stdout
    assert f"mmproxy routing up --instance ssh -c {config}" in before.stdout
    assert "[+] VERIFIED  can set IP_TRANSPARENT" in before.stdout

    up = mmproxy(bare, tmp_path, "routing", "up", "-c", str(config))
    assert up.returncode == 0, up.stderr
    after = mmproxy(bare, tmp_path, "check", "-c", str(config))
    assert after.returncode == 0, after.stdout
    assert "answers a spoofed connection from 192.0.2.1" in after.stdout
    assert "answers a spoofed connection from 2001:db8::1" in after.stdout
    assert "0 failed" in after.stdout
    # The target checks never reach the application: each connection is reset before it
    # can be accepted (sshd forks and re-executes itself for every connection it
    # accepts, at every start; issue 15).
    time.sleep(0.3)  # past the delayed-ACK time: nothing may arrive late either
    assert app4.seen == [] and app6.seen == []


def test_routing_up_is_idempotent_and_shared_rules_outlive_one_instance(
    bare: Net, tmp_path: Path
) -> None:
    one = write_config(tmp_path, "one", ipv4="127.0.0.1:22")
    two = write_config(tmp_path, "two", ipv4="127.0.0.1:23")
    for config in (one, one, two):
        assert mmproxy(bare, tmp_path, "routing", "up", "-c", str(config)).returncode == 0
    assert rules(bare).count("iif lo lookup 100") == 1
    mmproxy(bare, tmp_path, "routing", "down", "--instance", "one")
    assert rules(bare).count("iif lo lookup 100") == 1  # "two" still needs it
    mmproxy(bare, tmp_path, "routing", "down", "--instance", "two")
    assert "lookup 100" not in rules(bare)
    assert bare.gw.sh("ip", "route", "show", "table", "100").stdout == ""


def test_routing_up_refuses_a_table_with_routes_it_did_not_add(bare: Net, tmp_path: Path) -> None:
    """`local 0.0.0.0/0` in a table someone else uses would hijack its traffic."""
    bare.gw.ip("route", "add", "192.0.2.0/24", "via", PEER4, "table", "100")
    config = write_config(tmp_path, "ssh", ipv4="127.0.0.1:22")
    refused = mmproxy(bare, tmp_path, "routing", "up", "-c", str(config))
    assert refused.returncode == 1
    assert "routing table 100 already holds IPv4 routes that mmproxy did not add" in refused.stderr
    assert "192.0.2.0/24" in refused.stderr and "share_table: true" in refused.stderr
    assert "lookup 100" not in rules(bare)
    shared = write_config(tmp_path, "ssh", ipv4="127.0.0.1:22", share_table=True)
    assert mmproxy(bare, tmp_path, "routing", "up", "-c", str(shared)).returncode == 0
    assert "iif lo lookup 100" in rules(bare)


def test_fwmark_rules_carry_an_explicit_full_mask(bare: Net, tmp_path: Path) -> None:
    config = write_config(tmp_path, "fw", ipv4="127.0.0.1:22", routing="fwmark", mark=1)
    assert mmproxy(bare, tmp_path, "routing", "up", "-c", str(config)).returncode == 0
    assert "fwmark 0x1 lookup 100" in rules(bare)
    # The rule matches mark 1 exactly: an unmarked packet is not sent to table 100.
    assert "table 100" not in bare.gw.sh("ip", "route", "get", "192.0.2.9").stdout
    assert "local" in bare.gw.sh("ip", "route", "get", "192.0.2.9", "mark", "1").stdout
    mmproxy(bare, tmp_path, "routing", "down", "--instance", "fw")
    assert "lookup 100" not in rules(bare)


def test_mark_zero_is_refused_before_touching_the_routing(bare: Net, tmp_path: Path) -> None:
    config = write_config(tmp_path, "z", ipv4="127.0.0.1:22", routing="fwmark", mark=0)
    refused = mmproxy(bare, tmp_path, "routing", "up", "-c", str(config))
    assert refused.returncode == 78
    assert "mark 0 would match every packet" in refused.stderr
    assert "100" not in rules(bare)


def test_routing_up_runs_the_host_checks_and_fails_when_they_fail(
    bare: Net, tmp_path: Path
) -> None:
    """Under systemd the root helper runs the checks that read netlink, so the daemon
    needs no AF_NETLINK; a failure there must still stop the start, with the fix."""
    config = write_config(tmp_path, "ssh", ipv4="127.0.0.1:22", manage_routing=False)
    failed = mmproxy(bare, tmp_path, "routing", "up", "-c", str(config))
    assert failed.returncode == 1
    assert "[!] FAILED    ip -4 rule add from 127.0.0.1/8 iif lo table 100" in failed.stdout
    assert "[+] VERIFIED  routing to 127.0.0.1 points to this host" in failed.stdout
    assert "host checks failed; not starting" in failed.stderr
    managed = write_config(tmp_path, "ssh", ipv4="127.0.0.1:22")
    done = mmproxy(bare, tmp_path, "routing", "up", "-c", str(managed))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[+] VERIFIED  ip -4 rule add from 127.0.0.1/8 iif lo table 100" in done.stdout


def test_routing_tools_are_run_by_absolute_path(bare: Net, tmp_path: Path) -> None:
    """The helper runs as root: an `ip` earlier on $PATH must never be the one run."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    for tool in ("ip", "nft", "iptables", "ip6tables"):
        (evil / tool).write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        (evil / tool).chmod(0o755)
    config = write_config(tmp_path, "ssh", ipv4="127.0.0.1:22", routing="fwmark")
    env = {
        **os.environ,
        "MMPROXY_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": f"{evil}:{os.environ['PATH']}",
    }
    argv = bare.gw.exec_args(sys.executable, "-m", "mmproxy", "routing", "up", "-c", str(config))
    argv[0] = shutil.which("ip", path="/usr/sbin:/usr/bin") or "/usr/bin/ip"  # the test's own
    up = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert up.returncode == 0, up.stdout + up.stderr
    assert not marker.exists()
    assert "fwmark 0x7b lookup 100" in rules(bare)


def test_a_corrupt_state_file_does_not_stop_up_or_down(bare: Net, tmp_path: Path) -> None:
    run = tmp_path / "run" / "routing"
    run.mkdir(parents=True)
    (run / "broken.json").write_text('{"variant": "lo", "mark"')
    (run / "odd.json").write_text("[1, 2]")
    config = write_config(tmp_path, "ssh", ipv4="127.0.0.1:22")
    up = mmproxy(bare, tmp_path, "routing", "up", "-c", str(config))
    assert up.returncode == 0, up.stderr
    assert f"ignoring corrupt state file {run / 'broken.json'}" in up.stderr
    assert "iif lo lookup 100" in rules(bare)
    down = mmproxy(bare, tmp_path, "routing", "down", "--instance", "ssh")
    assert down.returncode == 0, down.stderr
    assert "lookup 100" not in rules(bare)
    down = mmproxy(bare, tmp_path, "routing", "down", "--instance", "broken")
    assert down.returncode == 0, down.stderr
    assert not (run / "broken.json").exists()


def test_instances_going_up_and_down_at_once_leave_nothing_behind(
    bare: Net, tmp_path: Path
) -> None:
    # systemd stops every instance in parallel (apt remove, shutdown): each one's
    # `routing down` must see the others' state, or a shared rule outlives them all.
    configs = [write_config(tmp_path, f"i{n}", ipv4=f"127.0.0.1:{100 + n}") for n in range(6)]
    env = {**os.environ, "MMPROXY_RUNTIME_DIR": str(tmp_path / "run")}

    def all_at_once(*args_each: list[str]) -> None:
        pipe = subprocess.PIPE
        argvs = [bare.gw.exec_args(sys.executable, "-m", "mmproxy", *args) for args in args_each]
        procs = [subprocess.Popen(a, stdout=pipe, stderr=pipe, text=True, env=env) for a in argvs]
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, out + err

    for _ in range(3):
        all_at_once(*(["routing", "up", "-c", str(c)] for c in configs))
        assert rules(bare).count("iif lo lookup 100") == 1
        all_at_once(*(["routing", "down", "--instance", c.stem] for c in configs))
        assert "lookup 100" not in rules(bare)
        assert bare.gw.sh("ip", "route", "show", "table", "100").stdout == ""


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_fwmark_variant_applied_by_mmproxy_carries_real_traffic(
    bare: Net, tmp_path: Path, firewall: str
) -> None:
    app4, app6 = start_backend(bare.gw, GW4), start_backend(bare.gw, GW6)
    config = write_config(tmp_path, "web", ipv4=app4.address, ipv6=app6.address, firewall=firewall)
    assert mmproxy(bare, tmp_path, "check", "-c", str(config)).returncode == 1
    up = mmproxy(bare, tmp_path, "routing", "up", "-c", str(config))
    assert up.returncode == 0, up.stderr
    check = mmproxy(bare, tmp_path, "check", "-c", str(config))
    assert check.returncode == 0, check.stdout
    assert "fwmark 0x7b lookup 100" in rules(bare) and "fwmark 0x7b lookup 100" in rules(bare, 6)
    assert mmproxy(bare, tmp_path, "routing", "down", "--instance", "web").returncode == 0
    assert "lookup 100" not in rules(bare) + rules(bare, 6)
    assert "mmproxy" not in bare.gw.sh("nft", "list", "ruleset").stdout
    assert "mmproxy" not in bare.gw.sh("iptables-save").stdout

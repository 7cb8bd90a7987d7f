"""System-test fixtures: a cached Debian 12 root (`base`) and a fresh container per test
(`container`), see harness.py. Every test here is marked `system` and needs root."""

from __future__ import annotations

import shlex
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmproxy.netns import NetNS, link
from tests.support import needs_root
from tests.system.harness import Container, ContainerError, base_rootfs

HERE = Path(__file__).parent

# The container's end of the veth (net fixture), and the peer's (a client, a balancer).
SERVER4, PEER4 = "192.0.2.10", "192.0.2.20"
SERVER6, PEER6 = "2001:db8:7::10", "2001:db8:7::20"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session", autouse=True)
def _needs_root() -> None:
    needs_root("system tests need root (they boot systemd in systemd-nspawn containers)")


@pytest.fixture(scope="session")
def base(_needs_root: None) -> Path:
    """The cached Debian 12 root (built by debootstrap on first use, a few minutes)."""
    return base_rootfs()


@pytest.fixture
def container(base: Path) -> Iterator[Container]:
    """A fresh, not yet booted container; powered off and removed after the test."""
    with Container(base) as c:
        yield c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """When a test fails, add the end of its container's journal to the report."""
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    c = funcargs.get("container")
    if report.when != "call" or not report.failed or not isinstance(c, Container) or not c.pid:
        return
    cmd = "journalctl -b --no-pager | tail -n 80"
    try:
        text = c.sh("sh", "-c", cmd, check=False, timeout=10).stdout
    except ContainerError as exc:
        text = str(exc)
    report.sections.append((f"container {c.name}: {shlex.quote(cmd)}", text))


@dataclass
class Net:
    """Two namespaces joined by a veth: `server` (boot a container in it) and `peer`."""

    server: NetNS
    peer: NetNS


@pytest.fixture
def net(_needs_root: None) -> Iterator[Net]:
    """server: SERVER4/24, SERVER6/64; peer: PEER4/24, PEER6/64, on one veth pair."""
    server, peer = NetNS("mmp-srv"), NetNS("mmp-peer")
    try:
        link(server, peer, [f"{SERVER4}/24", f"{SERVER6}/64"], [f"{PEER4}/24", f"{PEER6}/64"])
        yield Net(server, peer)
    finally:
        server.delete()
        peer.delete()

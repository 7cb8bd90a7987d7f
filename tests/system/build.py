"""`make deb` on the release a package is for, in a clean container of that release, the
way Debian's build daemons build: the build dependencies are installed first (with the
network), then the build runs with networking off (a network namespace with only `lo`).
Then the release's own lintian on what it made, source and binary."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.system.harness import Container, base_rootfs

REPO = Path(__file__).resolve().parents[2]
SRC = "/var/tmp/src"  # not /tmp: nspawn mounts an empty tmpfs there
# What a source checkout has that is not source.
NOT_SOURCE = (".git", ".venv", "build", "dist", "__pycache__", "*.egg-info", "*.so", ".*cache")


@dataclass
class Build:
    suite: str
    dist: Path  # everything `make deb` made: .deb, .dsc, tarballs, .changes, .buildinfo
    version: str
    lintian: str  # lintian's output, and its exit status
    lintian_status: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def deb(self) -> Path:
        (deb,) = self.dist.glob(f"mmproxy_{self.version.split(':')[-1]}_*.deb")
        return deb


def changelog_version(changelog: Path) -> str:
    match = re.match(r"mmproxy \(([^)]+)\)", changelog.read_text())
    assert match, f"{changelog}: no version on the first line"
    return match.group(1)


def copy_tree(tree: Path, dest: Path) -> None:
    shutil.copytree(tree, dest, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)


def build_on(suite: str, tree: Path, dist: Path) -> Build:
    """`make deb` of `tree` on `suite` (bookworm, trixie) offline; its output in `dist`."""
    seconds: dict[str, float] = {}
    with Container(base_rootfs(suite=suite)) as c:
        t0 = time.monotonic()
        copy_tree(tree, c.host_path(SRC))
        c.install(["make", "lintian"])
        c.run_offline("make", "-C", SRC, "deb-deps", timeout=900)
        seconds["build dependencies"] = time.monotonic() - t0
        t1 = time.monotonic()
        c.run_offline("make", "-C", SRC, "deb", network=False, timeout=900)
        seconds["offline build"] = time.monotonic() - t1
        script = f"lintian --fail-on error,warning --info {SRC}/dist/mmproxy_*.changes 2>&1"
        proc = c.run_offline("sh", "-c", script, network=False, check=False, timeout=600)
        # "running with root privileges is not recommended": the container is root's alone.
        lines = [line for line in proc.stdout.splitlines() if "root privileges" not in line]
        dist.mkdir(parents=True, exist_ok=True)
        for made in c.host_path(f"{SRC}/dist").iterdir():
            shutil.copy(made, dist / made.name)
    version = changelog_version(tree / "debian/changelog")
    return Build(suite, dist, version, "\n".join(lines), proc.returncode, seconds)

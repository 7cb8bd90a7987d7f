"""`make deb` on the release a package is for, in a clean container of that release, the
way Debian's build daemons build: the build dependencies are installed first (with the
network), then the build runs with networking off (a network namespace with only `lo`).
Then the release's own lintian on what it made, source and binary."""

from __future__ import annotations

import email.utils
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
    upgrade: Path | None = None  # the same tree with a higher version, when asked for
    upgrade_version: str = ""
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


def bump_version(tree: Path, suite: str) -> str:
    """A new changelog entry, version `<current>+test1` (higher for dpkg), in `tree`."""
    changelog = tree / "debian/changelog"
    text = changelog.read_text()
    version = changelog_version(changelog)
    trailer = re.search(r"^ -- (.+?)  ", text, re.M)
    assert trailer, f"{changelog}: no trailer line"
    new = f"{version}+test1"
    entry = (
        f"mmproxy ({new}) {suite}; urgency=medium\n\n"
        "  * Test build: the same tree with a higher version, to test upgrades.\n\n"
        f" -- {trailer.group(1)}  {email.utils.formatdate(usegmt=False)}\n\n"
    )
    changelog.write_text(entry + text)
    return new


def build_on(suite: str, tree: Path, dist: Path, upgrade_dist: Path | None = None) -> Build:
    """`make deb` of `tree` on `suite` (bookworm, trixie) offline; its output in `dist`.
    With `upgrade_dist`, then again with a higher version (bump_version), into that."""
    seconds: dict[str, float] = {}
    with Container(base_rootfs(suite=suite)) as c:
        t0 = time.monotonic()
        src = c.host_path(SRC)
        copy_tree(tree, src)
        c.install(["make", "lintian"])
        c.run_offline("make", "-C", SRC, "deb-deps", timeout=900)
        seconds["build dependencies"] = time.monotonic() - t0
        t1 = time.monotonic()
        c.run_offline("make", "-C", SRC, "deb", network=False, timeout=900)
        seconds["offline build"] = time.monotonic() - t1
        t2 = time.monotonic()
        script = f"lintian --fail-on error,warning --info {SRC}/dist/mmproxy_*.changes 2>&1"
        proc = c.run_offline("sh", "-c", script, network=False, check=False, timeout=600)
        seconds["lintian"] = time.monotonic() - t2
        # "running with root privileges is not recommended": the container is root's alone.
        lines = [line for line in proc.stdout.splitlines() if "root privileges" not in line]
        _copy_dir(src / "dist", dist)
        upgrade, upgrade_version = None, ""
        if upgrade_dist is not None:
            upgrade_version = bump_version(src, suite)
            c.run_offline("make", "-C", SRC, "deb", network=False, timeout=900)
            _copy_dir(src / "dist", upgrade_dist)
            (upgrade,) = upgrade_dist.glob(f"mmproxy_{upgrade_version.split(':')[-1]}_*.deb")
    version = changelog_version(tree / "debian/changelog")
    build = Build(suite, dist, version, "\n".join(lines), proc.returncode, seconds=seconds)
    build.upgrade, build.upgrade_version = upgrade, upgrade_version
    return build


def _copy_dir(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for made in src.iterdir():
        shutil.copy(made, dest / made.name)

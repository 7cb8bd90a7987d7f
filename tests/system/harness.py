"""Boot a real systemd in a throw-away container (recipes: ../shared/notes/testbed.md).

    root = base_rootfs()                   # debootstrap'd Debian 12, cached outside the checkout
                                           # (base_rootfs(suite="trixie"): Debian 13)
    with Container(root) as c:             # a clean copy (overlayfs) of it
        c.install(["haproxy"], debs=[deb]) # apt, before boot, on the host's network
        c.write("/etc/mmproxy/ssh.yaml", text)
        c.boot(netns=server_ns)            # or boot() for a private network (lo only)
        c.systemctl("enable", "--now", "mmproxy@ssh.socket")
        c.sh("python3", "-c", "...")       # any command inside the container
        c.journal("mmproxy@ssh", json=True)
    # powered off, unmounted and removed, also when the test failed

Needs root, `debootstrap` and `systemd-nspawn` (installed with apt when missing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json as jsonlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from mmproxy.netns import NetNS

SUITE = "bookworm"
# The releases the package is built and tested on (Debian 12 and 13).
SUITES = ("bookworm", "trixie")
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "iptables",
    "nftables",
    "python3",
    "python3-systemd",
    # Every real Debian system has these: /bin/kill for ExecReload=, man for
    # `systemd-analyze verify` to find the units' Documentation= pages.
    "procps",
    "man-db",
    "python3-yaml",
    "python3-sdnotify",
)
# Outside the checkout, kept between runs (CI may point it at a persistent volume).
CACHE_DIR = Path(os.environ.get("MMPROXY_TEST_CACHE", "/var/cache/mmproxy-tests"))
# Part of the cache key: bump it when _finish_base() changes, so old roots are not reused.
RECIPE_VERSION = 1
SOURCES_DIR = Path("/etc/apt/sources.list.d")
# Timers that would start apt or housekeeping in the middle of a test.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
)
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(Exception):
    """A rootfs could not be built or a container could not be used; the message says
    which command failed and what it printed."""


def _run(
    cmd: Sequence[str], *, timeout: float | None = None, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"`{shlex.join(cmd)}` timed out after {timeout} s") from exc
    if check and proc.returncode != 0:
        raise ContainerError(_failure(cmd, proc))
    return proc


def _failure(cmd: Sequence[str], proc: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    out = "\n".join(f"{proc.stdout or ''}{proc.stderr or ''}".splitlines()[-lines:])
    return f"`{shlex.join(cmd)}` failed ({proc.returncode}):\n{out}"


# --------------------------------------------------------------------------- base rootfs


def base_rootfs(
    packages: Sequence[str] = BASE_PACKAGES, suite: str = SUITE, cache_dir: Path = CACHE_DIR
) -> Path:
    """A minbase Debian root with `packages`, made once by debootstrap and then reused.

    It lives in `cache_dir/<suite>-<hash of suite, package list and recipe>`. It is built in
    a temporary directory beside it and renamed when complete, under an flock, so a
    half-built root is never used and two test processes never build it twice. Treat it as
    read-only: Container works on a copy."""
    key = "\n".join([suite, f"recipe {RECIPE_VERSION}", *sorted(packages)])
    final = cache_dir / f"{suite}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if final.is_dir():  # the rename is atomic: if it is there, it is complete
        return final
    ensure_host_tools()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{final.name}.lock") as lock_fd:
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in cache_dir.glob(f".{final.name}.build-*"):
            _remove_tree(stale)  # left by a build that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=cache_dir))
        try:
            tmp.chmod(0o755)  # it becomes the container's "/": mkdtemp made it 0700
            mirror, sources_file = apt_mirror(suite)
            log = cache_dir / f"{final.name}.log"
            cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}"]
            cmd += [suite, str(tmp), mirror]
            with log.open("w") as out:
                # debootstrap inherits the lock: if this process is killed, the next one
                # waits for the orphaned debootstrap before removing its tree.
                proc = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, check=False, pass_fds=(lock_fd,)
                )
            if proc.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise ContainerError(f"`{shlex.join(cmd)}` failed ({proc.returncode}):\n{tail}")
            _finish_base(tmp, sources_file)
            tmp.rename(final)
        except BaseException:
            _remove_tree(tmp)
            raise
    return final


def _finish_base(root: Path, sources_file: Path | None) -> None:
    """Make the fresh root behave like the host for apt, and quiet for tests."""
    if sources_file is not None:  # the host's own apt sources (updates, security too)
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        shutil.copy(sources_file, root / "etc/apt/sources.list.d" / sources_file.name)
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # Package lists in the base, so install() usually needs no `apt-get update`.
    script = "apt-get update -q && apt-get clean"
    cmd = [*_nspawn_args(root), "sh", "-c", script]
    _run(cmd, timeout=600)


def ensure_host_tools() -> None:
    """Install debootstrap and systemd-nspawn on the host if they are missing."""
    if shutil.which("debootstrap") and shutil.which("systemd-nspawn"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "debootstrap", "systemd-container"]
    if _run(install, check=False, env=env, timeout=600).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        _run(install, env=env, timeout=600)


def apt_mirror(suite: str = SUITE) -> tuple[str, Path | None]:
    """The host's Debian mirror for `suite` and the file that names it, read from the apt
    sources at run time (deb822 `*.sources` or one-line `*.list`). The environment variable
    MMPROXY_TEST_MIRROR overrides it (then the file is None). For a release the host does
    not use (trixie on a Debian 12 host), the host's mirror of its own release, and a
    sources file for `suite` written beside the cached roots."""
    if override := os.environ.get("MMPROXY_TEST_MIRROR"):
        return override, None
    found = _host_source(suite)
    if found is not None:
        return found
    host = _host_source(SUITE) or next(
        (f for f in (_host_source(s) for s in SUITES) if f is not None), None
    )
    if host is None:
        raise ContainerError(f"no apt source for {suite} in {SOURCES_DIR.parent}")
    uri = host[0]
    return uri, _sources_for(suite, uri)


def _host_source(suite: str) -> tuple[str, Path] | None:
    files = sorted(SOURCES_DIR.glob("*.sources")) + sorted(SOURCES_DIR.glob("*.list"))
    files.insert(0, SOURCES_DIR.parent / "sources.list")
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        uri = _deb822_uri(text, suite) if path.suffix == ".sources" else _one_line_uri(text, suite)
        if uri:
            return uri, path
    return None


def _sources_for(suite: str, uri: str) -> Path:
    """A deb822 sources file for `suite`, its updates and (on the same host, as Debian's
    mirrors lay them out) its security archive."""
    stanzas = [f"Types: deb\nURIs: {uri}\nSuites: {suite} {suite}-updates\n"]
    if uri.rstrip("/").endswith("/debian"):
        stanzas.append(f"Types: deb\nURIs: {uri.rstrip('/')}-security\nSuites: {suite}-security\n")
    keyring = "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    text = "\n".join(f"{s}Components: main\n{keyring}" for s in stanzas)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{suite}.sources"
    path.write_text(text)
    return path


def _deb822_uri(text: str, suite: str) -> str | None:
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if (
            "deb" in fields.get("types", "").split()
            and suite in fields.get("suites", "").split()
            and fields.get("enabled", "yes").lower() != "no"
            and fields.get("uris")
        ):
            return fields["uris"].split()[0]
    return None


def _one_line_uri(text: str, suite: str) -> str | None:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [ options ]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2 and words[1] == suite:
            return words[0]
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """flock(LOCK_EX) on `path` while in the block; yields the locked file descriptor."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f.fileno()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf that never descends into a mount (debootstrap mounts /proc, /sys)."""
    for point in _mounts_below(path):
        _run(["umount", "-l", point], check=False)
    if _mounts_below(path):
        raise ContainerError(f"{path}: still mounted, not removed")
    shutil.rmtree(path, ignore_errors=True)


def _nspawn_args(root: Path, *, machine: str | None = None) -> list[str]:
    """systemd-nspawn without -b: the command runs on the host's network (apt works)."""
    args = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit"]
    args += ["--settings=no", "--as-pid2", "--pipe", "-E", "DEBIAN_FRONTEND=noninteractive"]
    if machine:
        args.append(f"--machine={machine}")
    return args


# --------------------------------------------------------------------------- container


class Container:
    """A clean copy of a base rootfs that systemd-nspawn boots with a real systemd.

    The copy is an overlayfs (lower: the base, upper: a temporary directory), or a
    `cp -a --reflink=auto` copy where overlayfs cannot be mounted. cleanup() (also on
    leaving a `with` block) powers it off, unmounts and removes everything."""

    def __init__(self, base: Path | None = None, name: str | None = None) -> None:
        self.base = base if base is not None else base_rootfs()
        self.name = name or f"mmp-{uuid.uuid4().hex[:8]}"  # also its hostname
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.root = self.tmp / "root"
        self.console_log = self.tmp / "console.log"
        self.overlay = False
        self.netns: NetNS | None = None
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the container's systemd (PID 1 inside)
        self.boot_state = ""  # what `systemctl is-system-running` said at boot
        self._cgroups: list[Path] = []
        self._make_root()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *_: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<Container {self.name} {self.root} pid={self.pid}>"

    def _make_root(self) -> None:
        upper, work = self.tmp / "upper", self.tmp / "work"
        for d in (self.root, upper, work):
            d.mkdir()
        upper.chmod(0o755)  # the overlay's "/" takes the upper directory's mode
        opts = f"lowerdir={self.base},upperdir={upper},workdir={work}"
        mount = ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)]
        if _run(mount, check=False).returncode == 0:
            self.overlay = True
        else:
            self.root.rmdir()
            _run(["cp", "-a", "--reflink=auto", str(self.base), str(self.root)], timeout=600)
        self.write("/etc/hostname", f"{self.name}\n")  # not the host's name

    # -- before boot ------------------------------------------------------------------

    def host_path(self, path_in_container: str) -> Path:
        """The host path of a path in the container, with symlinks resolved inside the
        container (an absolute link such as /etc/resolv.conf never leads to the host)."""
        parts = [p for p in path_in_container.split("/") if p not in ("", ".")]
        resolved: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.root.joinpath(*resolved, part)
            if candidate.is_symlink():
                hops += 1
                if hops > 40:
                    raise ContainerError(f"{path_in_container}: too many symlinks")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            else:
                resolved.append(part)
        return self.root.joinpath(*resolved)

    def write(self, path_in_container: str, text: str, mode: int = 0o644) -> None:
        """Write a file (root-owned; parent directories made). After boot, a unit file
        written here needs `systemctl("daemon-reload")`."""
        path = self.host_path(path_in_container)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    def copy_in(self, src: Path, dest_in_container: str) -> None:
        """Copy a file, or merge a directory tree, to `dest_in_container` (the destination
        itself, not its parent: copy_in(DESTDIR, "/") installs a staged tree). Copies are
        owned by root and keep their modes; directories that exist keep theirs (so "/" or
        /usr never take a temporary directory's mode); symlinks are copied as links and
        existing files or links are replaced, never written through."""
        if not src.is_dir():
            dest = self.host_path(dest_in_container)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _replace_with_copy(src, dest)
            return
        top = dest_in_container.rstrip("/")
        for dirpath, dirnames, filenames in os.walk(src):
            rel = Path(dirpath).relative_to(src).as_posix()
            here = self.host_path(top if rel == "." else f"{top}/{rel}")
            if not here.is_dir():
                here.mkdir(parents=True)
                shutil.copymode(dirpath, here)
            for name in [*filenames, *(d for d in dirnames if Path(dirpath, d).is_symlink())]:
                _replace_with_copy(Path(dirpath, name), here / name)

    def run_offline(
        self, *cmd: str, timeout: float = 600, check: bool = True, network: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the root without booting it (systemd-nspawn without -b), on the
        host's network so apt reaches the archive, or with network=False in a network
        namespace of its own with only `lo`, as Debian's build daemons build. Only before
        boot()."""
        if self.nspawn is not None:
            raise ContainerError("run_offline() is for a container that is not booted")
        argv = [*_nspawn_args(self.root, machine=self.name)]
        if not network:
            argv.append("--private-network")
        return _run([*argv, *cmd], timeout=timeout, check=check)

    def install(
        self,
        apt_packages: Sequence[str] = (),
        debs: Sequence[Path] = (),
        *,
        recommends: bool = False,
        timeout: float = 900,
    ) -> None:
        """apt-get install Debian packages and local .deb files, before boot(). The base
        root has package lists; they are refreshed only if the install fails without."""
        staged = "/var/tmp/mmproxy-debs"
        local = []
        for deb in debs:
            self.copy_in(deb, f"{staged}/{deb.name}")
            local.append(f"{staged}/{deb.name}")
        apt = ["apt-get", "install", "-y", "-q", "-o", "Dpkg::Use-Pty=0"]
        if not recommends:
            apt.append("--no-install-recommends")
        line = shlex.join([*apt, *apt_packages, *local])
        script = f"{line} || {{ apt-get update -q && {line}; }}; rc=$?; rm -rf {staged}; exit $rc"
        self.run_offline("sh", "-c", script, timeout=timeout)

    # -- boot and use -----------------------------------------------------------------

    def boot(self, netns: NetNS | None = None, timeout: float = 60) -> None:
        """Boot systemd; return once `systemctl is-system-running` says running or degraded.

        With `netns`, the container lives in that namespace (its veth, addresses and routes
        as the test made them); without, in a private one with only `lo`."""
        if self.nspawn is not None:
            raise ContainerError(f"{self.name} is already booted")
        self._cgroups = _own_cgroups(self.name)
        for d in self._cgroups:
            d.mkdir(parents=True, exist_ok=True)
        # Enter those cgroups, then become nspawn (same pid).
        enter = 'for d in $MMPROXY_CGROUPS; do echo $$ > "$d/cgroup.procs" || exit 125; done'
        cmd = ["sh", "-c", f'{enter}; exec "$@"', "sh"]
        cmd += ["systemd-nspawn", "-q", "-D", str(self.root), f"--machine={self.name}"]
        cmd += ["--register=no", "--keep-unit", "--settings=no", "--console=read-only"]
        if netns is not None:
            # --private-network keeps CAP_NET_ADMIN in the container's bounding set, a
            # given namespace does not: without it no unit could set a rule or route there.
            cmd.append(f"--network-namespace-path=/run/netns/{netns.name}")
            cmd.append("--capability=CAP_NET_ADMIN")
        else:
            cmd.append("--private-network")
        cmd.append("-b")
        self.netns = netns
        with self.console_log.open("wb") as log:
            # Its own session: a Ctrl-C reaches pytest only, which then powers off cleanly.
            self.nspawn = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "MMPROXY_CGROUPS": " ".join(map(str, self._cgroups))},
            )
        deadline = time.monotonic() + timeout
        self.pid = self._find_init(deadline)
        state = ""
        while time.monotonic() < deadline:
            proc = self.sh("systemctl", "is-system-running", check=False, timeout=10)
            state = proc.stdout.strip() or proc.stderr.strip()
            if state in ("running", "degraded"):
                self.boot_state = state
                return
            if self.nspawn.poll() is not None:
                break
            time.sleep(0.1)
        raise ContainerError(
            f"{self.name} did not boot within {timeout} s (is-system-running: {state!r})\n"
            + self._diagnostics()
        )

    def _find_init(self, deadline: float) -> int:
        """The container's PID 1: nspawn's child that runs systemd in another PID
        namespace (nspawn is a subreaper; its intermediate child exits early)."""
        assert self.nspawn is not None
        own_ns = os.readlink("/proc/self/ns/pid")
        while time.monotonic() < deadline:
            for pid in _children(self.nspawn.pid):
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    ns = os.readlink(f"/proc/{pid}/ns/pid")
                except OSError:
                    continue
                if comm == "systemd" and ns != own_ns:
                    return pid
            if self.nspawn.poll() is not None:
                break
            time.sleep(0.02)
        raise ContainerError(f"{self.name}: systemd did not start\n" + self._console_tail())

    def sh(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv `cmd` inside the booted container (all its namespaces, as root, with a
        clean environment plus `env`); use ("sh", "-c", "...") for a shell line."""
        if self.pid is None:
            raise ContainerError(f"{self.name} is not booted")
        variables = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "cat"}
        variables.update(env or {})
        argv = ["nsenter", "-t", str(self.pid), "-a", "env", "-i"]
        argv += [f"{k}={v}" for k, v in variables.items()]
        argv += list(cmd)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"{self.name}: `{shlex.join(cmd)}` timed out") from exc
        if check and proc.returncode != 0:
            raise ContainerError(f"{self.name}: " + _failure(cmd, proc))
        return proc

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.sh("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    @overload
    def journal(self, unit: str, json: Literal[False] = False) -> str: ...

    @overload
    def journal(self, unit: str, json: Literal[True]) -> list[dict[str, Any]]: ...

    def journal(self, unit: str, json: bool = False) -> str | list[dict[str, Any]]:
        """This boot's journal of `unit`: text (journalctl's short format), or with
        json=True a list of records (dicts of journal fields, as `journalctl -o json`)."""
        args = ["journalctl", "--no-pager", "-b", "-u", unit]
        if not json:
            return self.sh(*args).stdout
        out = self.sh(*args, "-o", "json").stdout
        return [jsonlib.loads(line) for line in out.splitlines() if line.strip()]

    def wait_journal(self, unit: str, text: str, timeout: float = 10) -> str:
        """Wait until `text` appears in the journal of `unit`; return the journal."""
        deadline = time.monotonic() + timeout
        while True:
            journal = self.journal(unit)
            if text in journal:
                return journal
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the journal of {unit}:\n{journal}")
            time.sleep(0.1)

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-network-namespace sysctl of the container from outside (its /proc/sys
        is read-only inside)."""
        if self.pid is None:
            raise ContainerError(f"{self.name} is not booted")
        _run(["nsenter", "-t", str(self.pid), "-n", "sysctl", "-q", "-w", f"{key}={value}"])

    # -- stop and clean up ------------------------------------------------------------

    def poweroff(self, timeout: float = 30) -> None:
        """Shut systemd down cleanly; kill the container if it does not stop in time."""
        nspawn, pid = self.nspawn, self.pid
        if nspawn is None:
            return
        if nspawn.poll() is None and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGRTMIN + 4)  # systemd: start poweroff.target
        try:
            nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            if pid is not None:  # SIGKILL to a PID namespace's init ends the namespace
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                nspawn.wait(5)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait()
        self.nspawn = self.pid = None
        for d in self._cgroups:
            for dirpath, _, _ in os.walk(d, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            with contextlib.suppress(OSError):  # the shared parent, when no one else uses it
                d.parent.rmdir()
        self._cgroups = []

    def cleanup(self) -> None:
        """Power off, unmount and remove the copy. Safe to call more than once."""
        try:
            self.poweroff()
        finally:
            mounted = self.overlay and _mounts_below(self.root)
            if mounted and _run(["umount", str(self.root)], check=False).returncode != 0:
                _run(["umount", "-l", str(self.root)], check=False)
            self.overlay = False
            if self.tmp.exists():
                _remove_tree(self.tmp)

    def _console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "console:\n" + "\n".join(text.splitlines()[-lines:])

    def _diagnostics(self) -> str:
        parts = []
        if self.pid is not None and self.nspawn is not None and self.nspawn.poll() is None:
            for cmd in (
                ("systemctl", "--no-pager", "--failed"),
                ("sh", "-c", "journalctl -b --no-pager | tail -n 40"),
            ):
                proc = self.sh(*cmd, check=False, timeout=10)
                parts.append(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
        parts.append(self._console_tail())
        return "\n".join(parts)


def _replace_with_copy(src: Path, dest: Path) -> None:
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    shutil.copy2(src, dest, follow_symlinks=False)


def _own_cgroups(name: str) -> list[Path]:
    """Fresh cgroups for one container, below ours, in the hierarchies systemd tracks units
    in (v1 name=systemd, and the unified one of a hybrid host). Without them every nspawn
    started from this process nests its systemd in the same `payload` cgroup, and
    containers running at the same time would share (and clean up) each other's cgroups.
    On a pure cgroup v2 host, nothing: nspawn is left to its default."""
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            mount = Path("/sys/fs/cgroup/systemd")
        elif hierarchy == "0" and Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
            mount = Path("/sys/fs/cgroup/unified")
        else:
            continue
        if (mount / "cgroup.procs").exists():
            found.append(mount / path.lstrip("/") / "mmproxy-tests" / name)
    return found


def _children(ppid: int) -> list[int]:
    """pgrep -P: the processes whose parent is `ppid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            found.append(int(entry.name))
    return found

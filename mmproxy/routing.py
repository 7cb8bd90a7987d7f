"""The routing that makes spoofed connections work: the commands, and applying them.

Replies from the application go to the client's address; these rules send them back to
`lo`, where the transparent socket picks them up. Two variants, as in the original
mmproxy's README: a loopback target needs only the `lo` rules; a target on another
interface needs the fwmark + connmark rules (nftables or iptables).

Several instances may share a mark and table. Each instance that applies routing leaves
a state file in the runtime directory; removing an instance's routing removes only what
no remaining state file still needs. systemd stops instances in parallel (apt remove,
shutdown), so each `up` and `down` holds a lock on the directory: otherwise two instances
going down at once could each see the other's state file and both leave a shared rule.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

Command = list[str]
NFT_TABLE = "mmproxy"  # `table inet mmproxy`: ours alone, removed whole when unused
# Where ip, nft and iptables are looked for, in order. This runs as root: never $PATH.
TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")

# The configuration keys `mmproxy routing up` reads, as root: no other, so that it never
# opens a file another key names (allowed_networks_file: /etc/shadow) nor quotes its lines.
CONFIG_KEYS = (
    "manage_routing", "share_table", "check_failure", "routing", "firewall", "mark", "table",
    "ipv4", "ipv6",
)  # fmt: skip


class RoutingError(Exception):
    """A routing command failed; the message has the command and its error."""


@dataclass(frozen=True)
class Plan:
    """What one instance needs: its variant, mark, table and IP families (4 and/or 6)."""

    variant: str  # "lo" or "fwmark"
    mark: int
    table: int
    families: tuple[int, ...]
    firewall: str = "nftables"

    def needs(self) -> set[tuple[object, ...]]:
        """Hashable items, so that what several instances need can be compared."""
        items: set[tuple[object, ...]] = set()
        for family in self.families:
            items.add(("route", family, self.table))
            if self.variant == "lo":
                items.add(("lo-rule", family, self.table))
            else:
                items.add(("mark-rule", family, self.mark, self.table))
                items.add((self.firewall, family, self.mark))
        return items


def _ip(family: int) -> Command:
    return ["ip", f"-{family}"]


def lo_rule(family: int, table: int) -> Command:
    source = "127.0.0.1/8" if family == 4 else "::1/128"
    return [*_ip(family), "rule", "add", "from", source, "iif", "lo", "table", str(table)]


def mark_rule(family: int, mark: int, table: int) -> Command:
    # An explicit full mask: a bare `fwmark 0` would mean "every packet".
    selector = f"{mark}/0xffffffff"
    return [*_ip(family), "rule", "add", "fwmark", selector, "lookup", str(table)]


def local_route(family: int, table: int) -> Command:
    everything = "0.0.0.0/0" if family == 4 else "::/0"
    return [*_ip(family), "route", "add", "local", everything, "dev", "lo", "table", str(table)]


def iptables_rules(family: int, mark: int) -> list[Command]:
    tool = "iptables" if family == 4 else "ip6tables"
    tag = ["-m", "comment", "--comment", "mmproxy"]
    return [
        [tool, "-t", "mangle", "-I", "PREROUTING", "-m", "mark", "--mark", str(mark), *tag,
         "-j", "CONNMARK", "--save-mark"],
        [tool, "-t", "mangle", "-I", "OUTPUT", "-m", "connmark", "--mark", str(mark), *tag,
         "-j", "CONNMARK", "--restore-mark"],
    ]  # fmt: skip


def nft_script(mark: int) -> str:
    """One prerouting and one output chain per mark in `table inet mmproxy`: flushed and
    refilled in one transaction, so applying twice leaves one copy."""
    pre, out = f"pre_{mark}", f"out_{mark}"
    return "\n".join(
        [
            f"add table inet {NFT_TABLE}",
            f"add chain inet {NFT_TABLE} {pre} {{ type filter hook prerouting priority mangle; }}",
            f"flush chain inet {NFT_TABLE} {pre}",
            f"add rule inet {NFT_TABLE} {pre} meta mark {mark} ct mark set meta mark",
            f"add chain inet {NFT_TABLE} {out} {{ type route hook output priority mangle; }}",
            f"flush chain inet {NFT_TABLE} {out}",
            f"add rule inet {NFT_TABLE} {out} ct mark {mark} meta mark set ct mark",
            "",
        ]
    )


def commands(plan: Plan) -> list[Command]:
    """The commands an admin would run by hand for `plan` (nftables ones as `nft -f`)."""
    result: list[Command] = []
    for family in plan.families:
        if plan.variant == "lo":
            result.append(lo_rule(family, plan.table))
        else:
            if plan.firewall == "iptables":
                result += iptables_rules(family, plan.mark)
            result.append(mark_rule(family, plan.mark, plan.table))
        result.append(local_route(family, plan.table))
    return result


def lo_commands(table: int) -> list[Command]:
    """Target on loopback (127.0.0.1 / ::1): the usual case."""
    return commands(Plan("lo", 0, table, (4, 6)))


def mark_commands(mark: int, table: int) -> list[Command]:
    """Target on another interface, with the original README's iptables rules."""
    return commands(Plan("fwmark", mark, table, (4, 6), "iptables"))


# --- applying and removing -----------------------------------------------------------


def executable(name: str) -> str | None:
    """The absolute path of a tool in TOOL_DIRS, or None when none has it."""
    for directory in TOOL_DIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _absolute(cmd: Command) -> Command:
    """`cmd` with its tool by absolute path (commands stay short where they are shown)."""
    path = executable(cmd[0])
    if path is None:
        raise FileNotFoundError(cmd[0])
    return [path, *cmd[1:]]


def run(cmd: Command, stdin: str | None = None, check: bool = True) -> str:
    import subprocess  # here: the daemon imports this module but runs no tool

    try:
        proc = subprocess.run(
            _absolute(cmd), input=stdin, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise RoutingError(f"`{cmd[0]}` is not installed (needed for `{' '.join(cmd)}`)") from exc
    if check and proc.returncode != 0:
        raise RoutingError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout if proc.returncode == 0 else ""


def succeeds(cmd: Command) -> bool:
    import subprocess

    try:
        return subprocess.run(_absolute(cmd), capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


def _as_query(add: Command) -> Command:
    """`ip -4 rule add SELECTOR` -> `ip -4 rule show SELECTOR` (empty output: absent)."""
    return [add[0], add[1], add[2], "show", *add[4:]]


def _routes(family: int, table: int) -> list[dict[str, object]]:
    listing = run([*_ip(family), "-j", "route", "show", "table", str(table)], check=False)
    routes = json.loads(listing or "[]")  # a table that does not exist yet: empty
    return [r for r in routes if isinstance(r, dict)]


def _is_ours(route: dict[str, object]) -> bool:
    """The one route mmproxy adds to its table: `local default dev lo`."""
    return (
        route.get("type") == "local"
        and route.get("dst") == "default"
        and (route.get("dev") == "lo")
    )


def foreign_routes(family: int, table: int) -> list[str]:
    """Routes in `table` that mmproxy did not put there, as `ip route` would show them."""
    return [
        " ".join(str(v) for v in (r.get("type", "unicast"), r.get("dst"), "dev", r.get("dev")))
        for r in _routes(family, table)
        if not _is_ours(r)
    ]


def check_table(plan: Plan) -> None:
    """Refuse a table that already routes other things: `local 0.0.0.0/0` added to it
    would hijack them (and what uses the table would hijack mmproxy's replies)."""
    for family in plan.families:
        found = foreign_routes(family, plan.table)
        if found:
            raise RoutingError(
                f"routing table {plan.table} already holds IPv{family} routes that mmproxy "
                f"did not add ({'; '.join(found[:3])}): pick a table of mmproxy's own "
                "(`table:`), or set `share_table: true` if sharing it is intended"
            )


def present(add: Command) -> bool:
    if add[2] == "route":
        family, table = int(add[1][1:]), int(add[-1])
        dst = "default" if add[5] in ("0.0.0.0/0", "::/0") else add[5]
        return any(r.get("type") == "local" and r.get("dst") == dst for r in _routes(family, table))
    return bool(run(_as_query(add), check=False).strip())


def ensure(item: tuple[object, ...]) -> None:
    """Make one needed item exist; adding twice is harmless."""
    kind, family = item[0], int(str(item[1]))
    if kind == "nftables":
        run(["nft", "-f", "-"], stdin=nft_script(int(str(item[2]))))
        return
    if kind == "iptables":
        for add in iptables_rules(family, int(str(item[2]))):
            if not succeeds([*add[:3], "-C", *add[4:]]):
                run(add)
        return
    add = _item_command(item)
    if not present(add):
        run(add)


def withdraw(item: tuple[object, ...]) -> None:
    """Remove one item that no instance needs any more; absent is fine."""
    kind, family = item[0], int(str(item[1]))
    if kind == "nftables":
        mark = int(str(item[2]))
        for chain in (f"pre_{mark}", f"out_{mark}"):
            run(["nft", "delete", "chain", "inet", NFT_TABLE, chain], check=False)
        listing = run(["nft", "list", "table", "inet", NFT_TABLE], check=False)
        if listing and "chain" not in listing:
            run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
        return
    if kind == "iptables":
        for add in iptables_rules(family, int(str(item[2]))):
            run([*add[:3], "-D", *add[4:]], check=False)
        return
    add = _item_command(item)
    run([*add[:3], "del", *add[4:]], check=False)


def _item_command(item: tuple[object, ...]) -> Command:
    kind, family = item[0], int(str(item[1]))
    numbers = [int(str(x)) for x in item[2:]]
    if kind == "route":
        return local_route(family, numbers[0])
    if kind == "lo-rule":
        return lo_rule(family, numbers[0])
    return mark_rule(family, numbers[0], numbers[1])


class RoutingState:
    """The per-instance state files under `directory` (normally /run/mmproxy/routing)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, instance: str) -> Path:
        if "/" in instance or instance.startswith("."):
            raise RoutingError(f"bad instance name {instance!r}")
        return self.directory / f"{instance}.json"

    def plans(self, excluding: str | None = None) -> dict[str, Plan]:
        found: dict[str, Plan] = {}
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.glob("*.json")):
            if path.stem == excluding:
                continue
            plan = _read_plan(path)
            if plan is not None:
                found[path.stem] = plan
        return found

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def up(self, instance: str, plan: Plan, share_table: bool = False) -> None:
        """Apply `plan` for `instance`, dropping what its previous plan needed alone.

        Unless `share_table`, a table holding routes mmproxy did not add is refused."""
        with self._locked():
            if not share_table:
                check_table(plan)
            path = self._path(instance)
            previous = self.plans().get(instance)
            # Written whole then renamed, so no reader ever sees half a state file.
            staging = self.directory / f".{instance}.json.new"
            staging.write_text(json.dumps(asdict(plan)))
            staging.replace(path)
            for item in sorted(plan.needs(), key=str):
                ensure(item)
            if previous is not None:
                self._withdraw_unneeded(previous.needs() - plan.needs())

    def down(self, instance: str) -> None:
        if not self._path(instance).exists():
            return
        with self._locked():
            path = self._path(instance)
            if not path.exists():
                return
            plan = _read_plan(path)  # None when corrupt: the file goes, nothing is withdrawn
            path.unlink()
            if plan is not None:
                self._withdraw_unneeded(plan.needs())

    def _withdraw_unneeded(self, items: Iterable[tuple[object, ...]]) -> None:
        still = set().union(*(p.needs() for p in self.plans().values()))
        for item in sorted(set(items) - still, key=str):
            withdraw(item)


def _read_plan(path: Path) -> Plan | None:
    """One state file's plan; None (with a warning) when it is unreadable or corrupt, so
    that one bad file cannot stop up/down for every instance."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        plan = Plan(
            variant=str(data["variant"]),
            mark=int(data["mark"]),
            table=int(data["table"]),
            families=tuple(int(f) for f in data["families"]),
            firewall=str(data.get("firewall", "nftables")),
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"mmproxy routing: ignoring corrupt state file {path}: {exc!r}", file=sys.stderr)
        return None
    return plan


def runtime_base() -> Path:
    """mmproxy's runtime directory (/run/mmproxy; tests point it elsewhere)."""
    return Path(os.environ.get("MMPROXY_RUNTIME_DIR", "/run/mmproxy"))


def runtime_dir() -> Path:
    return runtime_base() / "routing"

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
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

Command = list[str]
NFT_TABLE = "mmproxy"  # `table inet mmproxy`: ours alone, removed whole when unused

# The configuration keys `mmproxy routing up` reads, as root: no other, so that it never
# opens a file another key names (allowed_networks_file: /etc/shadow) nor quotes its lines.
CONFIG_KEYS = ("manage_routing", "routing", "firewall", "mark", "table", "ipv4", "ipv6")


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
    return [*_ip(family), "rule", "add", "fwmark", str(mark), "lookup", str(table)]


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


def run(cmd: Command, stdin: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise RoutingError(f"`{cmd[0]}` is not installed (needed for `{' '.join(cmd)}`)") from exc
    if check and proc.returncode != 0:
        raise RoutingError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout if proc.returncode == 0 else ""


def succeeds(cmd: Command) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


def _as_query(add: Command) -> Command:
    """`ip -4 rule add SELECTOR` -> `ip -4 rule show SELECTOR` (empty output: absent)."""
    return [add[0], add[1], add[2], "show", *add[4:]]


def present(add: Command) -> bool:
    if add[2] == "route":
        table = add[-1]
        dst = "default" if add[5] in ("0.0.0.0/0", "::/0") else add[5]
        listing = run([*add[:2], "-j", "route", "show", "table", table], check=False)
        routes = json.loads(listing or "[]")  # a table that does not exist yet: empty
        return any(r.get("type") == "local" and r.get("dst") == dst for r in routes)
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
            data = json.loads(path.read_text())
            data["families"] = tuple(data["families"])
            found[path.stem] = Plan(**data)
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

    def up(self, instance: str, plan: Plan) -> None:
        """Apply `plan` for `instance`, dropping what its previous plan needed alone."""
        with self._locked():
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
            plan = self.plans().get(instance)
            if plan is None:
                return
            self._path(instance).unlink()
            self._withdraw_unneeded(plan.needs())

    def _withdraw_unneeded(self, items: Iterable[tuple[object, ...]]) -> None:
        still = set().union(*(p.needs() for p in self.plans().values()))
        for item in sorted(set(items) - still, key=str):
            withdraw(item)


def runtime_dir() -> Path:
    return Path(os.environ.get("MMPROXY_RUNTIME_DIR", "/run/mmproxy")) / "routing"

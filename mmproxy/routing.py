"""The routing that makes spoofed connections work, as the commands an admin runs.

Replies from the application go to the client's address; these rules send them back to
`lo`, where the transparent socket picks them up. Two variants, as in the original
mmproxy's README: traffic to a loopback target needs only the `lo` rules; a target on
another local interface needs the fwmark + CONNMARK rules.
"""

from __future__ import annotations

Command = list[str]


def lo_commands(table: int) -> list[Command]:
    """Target on loopback (127.0.0.1 / ::1): the usual case."""
    return [
        ["ip", "-4", "rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", str(table)],
        ["ip", "-6", "rule", "add", "from", "::1/128", "iif", "lo", "table", str(table)],
        *_local_routes(table),
    ]


def mark_commands(mark: int, table: int) -> list[Command]:
    """Target on another interface: marked connections' replies are routed to `lo`."""
    commands: list[Command] = []
    for tool in ("iptables", "ip6tables"):
        commands += [
            [tool, "-t", "mangle", "-I", "PREROUTING", "-m", "mark", "--mark", str(mark),
             "-m", "comment", "--comment", "mmproxy", "-j", "CONNMARK", "--save-mark"],
            [tool, "-t", "mangle", "-I", "OUTPUT", "-m", "connmark", "--mark", str(mark),
             "-m", "comment", "--comment", "mmproxy", "-j", "CONNMARK", "--restore-mark"],
        ]  # fmt: skip
    commands += [
        ["ip", "-4", "rule", "add", "fwmark", str(mark), "lookup", str(table)],
        ["ip", "-6", "rule", "add", "fwmark", str(mark), "lookup", str(table)],
        *_local_routes(table),
    ]
    return commands


def _local_routes(table: int) -> list[Command]:
    return [
        ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(table)],
        ["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", str(table)],
    ]


def hint(mark: int, table: int) -> str:
    """The start-up reminder the original prints (until the self-checks verify it)."""
    lines = ["Spoofed connections need this routing (run once as root, e.g. at boot):"]
    lines += ["  " + " ".join(c) for c in lo_commands(table)]
    lines.append("or, for a target on an interface other than lo (needs a default route):")
    lines += ["  " + " ".join(c) for c in mark_commands(mark, table)[:4]]
    lines.append("  sysctl -w net.ipv4.conf.<interface>.route_localnet=1")
    lines += ["  " + " ".join(c) for c in mark_commands(mark, table)[4:6]]
    return "\n".join(lines)

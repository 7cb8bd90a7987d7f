"""`mmproxy doctor -c FILE`: the self-checks, then the usual failures named in plain words.

Each diagnosis is one small function that returns Findings (none when all is well): what
was seen, what it means, and the exact fix. Doctor only reads (/proc, the routing rules,
sysctls, mmproxy's log or journal): it never changes the host.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import itertools
import json
import os
import re
import socket
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mmproxy import routing
from mmproxy.address import Address
from mmproxy.checks import (
    CAP_NET_ADMIN,
    TEST_SOURCES,
    Result,
    check_routing,
    report,
    run_checks,
)
from mmproxy.checks import _proc_address as proc_address
from mmproxy.config import Config
from mmproxy.localaddr import unmap

# This many distinct refused peers look like clients, not a balancer (balancers come
# alone or in pairs).
DIRECT_PEERS = 3
NO_HEADER = ("invalid-header", "header-timeout", "closed-before-header")
DEFAULT_SINCE = 3600.0


class DoctorError(Exception):
    """A source doctor needs cannot be read; the message says which and what to do."""


@dataclass(frozen=True)
class Finding:
    key: str  # short name of the diagnosis
    seen: str  # what was observed
    means: str  # what it means, in plain words
    fix: str  # the exact change to make

    def text(self) -> str:
        return (
            f"[!] DIAGNOSIS {self.key}: {self.seen}\n"
            f"              means: {self.means}\n"
            f"              fix: {self.fix}"
        )


@dataclass(frozen=True)
class Rejection:
    """One refused connection or dropped datagram from mmproxy's log."""

    reason: str  # CLOSE_REASON: untrusted-balancer, invalid-header, ...
    balancer: str  # the peer's host, unmapped; "" for a summary line
    detail: str
    count: int = 1


# --- the log: stderr lines from a file, or the journal ---------------------------------

_REJECTED = re.compile(r"(?:rejected (?:client \S+ via )?|dropped a datagram from )(\S+): (.*)$")
_SUMMARY = re.compile(r"(\d+) more (?:connections rejected|datagrams dropped) \(([\w-]+)\)")
# The detail texts the forwarder writes, for lines that do not carry CLOSE_REASON.
_REASONS = (
    ("not in allowed_networks", "untrusted-balancer"),
    ("invalid PROXY header", "invalid-header"),
    ("not a PROXY protocol header", "invalid-header"),
    ("no complete PROXY header within", "header-timeout"),
    ("before a full header", "closed-before-header"),
    ("needs CAP_NET_ADMIN", "target-unavailable"),
    ("did not answer within", "target-unavailable"),
    ("refused the connection", "target-unavailable"),
)


def _peer_host(text: str) -> str:
    """'198.51.100.7:4000' or '[2001:db8::7]:4000' -> the host, unmapped."""
    host = text[1 : text.rindex("]")] if text.startswith("[") else text.rpartition(":")[0]
    return unmap(host)


def _reason_of(detail: str) -> str:
    return next((reason for text, reason in _REASONS if text in detail), "other")


def parse_log_line(line: str) -> Rejection | None:
    """A Rejection from one line mmproxy wrote to stderr, or None for other lines."""
    summary = _SUMMARY.search(line)
    if summary:
        return Rejection(summary.group(2), "", line.strip(), int(summary.group(1)))
    match = _REJECTED.search(line)
    if not match:
        return None
    detail = match.group(2)
    return Rejection(_reason_of(detail), _peer_host(match.group(1)), detail)


def read_log(path: str) -> list[Rejection]:
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            found = [parse_log_line(line) for line in lines]
    except OSError as exc:
        raise DoctorError(f"cannot read the log file {path}: {exc.strerror or exc}") from exc
    return [r for r in found if r is not None]


def from_journal_entry(entry: Mapping[str, object]) -> Rejection | None:
    """A Rejection from one journal entry of mmproxy's unit (fields as _record_fields
    writes them), or None for entries that are not a refusal."""
    reason = entry.get("CLOSE_REASON")
    message = str(entry.get("MESSAGE", ""))
    if not reason:
        return None
    if "SUPPRESSED" in entry:
        return Rejection(str(reason), "", message, int(str(entry["SUPPRESSED"])))
    if not message.startswith(("rejected ", "dropped a datagram", "accept failed")):
        return None  # the record of a connection that was served
    detail = message.partition(": ")[2] or message
    return Rejection(str(reason), unmap(str(entry.get("LB_ADDR", ""))), detail)


def read_journal(instance: str, since: float) -> list[Rejection]:
    """Refusals logged by mmproxy@INSTANCE.service in the last `since` seconds."""
    try:
        from systemd import journal
    except ImportError as exc:
        raise DoctorError(
            "python3-systemd is not installed: apt install python3-systemd, "
            "or give the log with --log FILE"
        ) from exc
    reader = journal.Reader()
    reader.add_match(_SYSTEMD_UNIT=f"mmproxy@{instance}.service")
    reader.seek_realtime(time.time() - since)
    found = [from_journal_entry(entry) for entry in reader]
    reader.close()
    return [r for r in found if r is not None]


def parse_since(text: str) -> float:
    """'90', '30m', '2h', '1d' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 2h or 1d, got {text!r}")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale


# --- diagnoses from the log --------------------------------------------------------------


def _peers(rejections: Iterable[Rejection], reasons: tuple[str, ...]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for r in rejections:
        if r.reason in reasons and r.balancer:
            counts[r.balancer] += r.count
    return counts


def _connections(count: int) -> str:
    return f"{count} connection" + ("" if count == 1 else "s")


def _listed(peers: Iterable[str], limit: int = 5) -> str:
    peers = list(peers)
    more = f" and {len(peers) - limit} more" if len(peers) > limit else ""
    return ", ".join(peers[:limit]) + more


def dual_stack_listeners(config: Config) -> list[Address]:
    """`[::]` listeners with no IPv4 listener on their port: IPv4 peers reach them too,
    as ::ffff:a.b.c.d."""
    v4 = {(a.transport, a.port) for a in config.listen if a.family == socket.AF_INET}
    return [a for a in config.listen if a.host == "::" and (a.transport, a.port) not in v4]


def _mapped_misses(config: Config, host: str) -> bool:
    """An IPv4 peer on a dual-stack listener that allowed_networks cannot cover: no IPv4
    entry at all, or an IPv6 entry that would hold its ::ffff: form."""
    if ":" in host or not dual_stack_listeners(config):
        return False
    v4 = [n for n in config.allowed().networks if n.version == 4]
    mapped = ipaddress.ip_address(f"::ffff:{host}")
    return not v4 or any(mapped in n for n in config.allowed().networks if n.version == 6)


def mapped_balancers(config: Config, rejections: Iterable[Rejection]) -> list[Finding]:
    refused = _peers(rejections, ("untrusted-balancer",))
    hosts = [h for h in refused if _mapped_misses(config, h)]
    if not hosts:
        return []
    listener = dual_stack_listeners(config)[0]
    allowed = ", ".join(str(n) for n in config.allowed().networks) or "nothing"
    return [
        Finding(
            "ipv4-mapped-balancer",
            f"{_connections(sum(refused[h] for h in hosts))} from IPv4 peer(s) {_listed(hosts)} "
            f"on the dual-stack listener {listener} refused as untrusted "
            f"(allowed_networks: {allowed})",
            f"{listener} receives IPv4 peers as ::ffff:a.b.c.d addresses; mmproxy compares "
            "those with the IPv4 entries of allowed_networks, and none covers them (an IPv6 "
            "entry such as ::/0 never does)",
            "if that is your balancer, add its IPv4 address or network to allowed_networks, "
            f"e.g. `- {hosts[0]}/32`, then `systemctl reload mmproxy@{_name(config)}`",
        )
    ]


def _name(config: Config) -> str:
    return Path(config.path).stem if config.path else "NAME"


def untrusted_peers(config: Config, rejections: Iterable[Rejection]) -> list[Finding]:
    """Peers refused as untrusted: many of them are clients reaching the port directly;
    one or two are a balancer missing from allowed_networks."""
    refused = _peers(rejections, ("untrusted-balancer",))
    for host in [h for h in refused if _mapped_misses(config, h)]:
        del refused[host]  # mapped_balancers explains these
    if not refused:
        return []
    total = sum(refused.values())
    peers = [h for h, _ in refused.most_common()]
    ports = sorted({str(a.port) for a in config.listen})
    allowed = ", ".join(str(n) for n in config.allowed().networks)
    if len(refused) >= DIRECT_PEERS:
        families = {"ip6" if ":" in str(n) else "ip" for n in config.allowed().networks}
        rules = "; ".join(
            f"nft add rule inet filter input {proto} dport {{ {', '.join(ports)} }} "
            f"{fam} saddr != {{ {', '.join(_family_nets(config, fam))} }} drop"
            for fam in sorted(families)
            for proto in sorted({a.transport for a in config.listen})
        )
        return [
            Finding(
                "direct-clients",
                f"{_connections(total)} from {len(refused)} different addresses "
                f"({_listed(peers)}) refused: not in allowed_networks ({allowed})",
                f"clients reach port {', '.join(ports)} directly instead of through the "
                "balancer; mmproxy must refuse them (they cannot be trusted to say who "
                "they are), so they see their connections closed",
                "let only the balancer reach the port, and point clients at the balancer: "
                f"`{rules}` (or the same in your firewall / security group)",
            )
        ]
    return [
        Finding(
            "unknown-balancer",
            f"{_connections(total)} from {_listed(peers)} refused: not in "
            f"allowed_networks ({allowed})",
            f"{_listed(peers)} sends to mmproxy but is not listed as a balancer",
            f"if it is your balancer, add it to allowed_networks (e.g. `- {peers[0]}/"
            f"{128 if ':' in peers[0] else 32}`); if not, firewall it off the port",
        )
    ]


def _family_nets(config: Config, fam: str) -> list[str]:
    want = 6 if fam == "ip6" else 4
    return [str(n) for n in config.allowed().networks if n.version == want]


def missing_header(config: Config, rejections: Iterable[Rejection]) -> list[Finding]:
    """Connections from an allowed balancer without a PROXY header: its PROXY protocol
    is off, so it forwards the clients' bytes as they are."""
    allowed = config.allowed()
    counts: Counter[str] = Counter()
    details: dict[str, set[str]] = defaultdict(set)
    for r in rejections:
        if r.reason in NO_HEADER and r.balancer and r.balancer in allowed:
            counts[r.balancer] += r.count
            details[r.balancer].add(r.detail)
    if not counts:
        return []
    peers = [h for h, _ in counts.most_common()]
    said = "; ".join(sorted({d for h in peers for d in details[h]})[:3])
    return [
        Finding(
            "no-proxy-header",
            f"{_connections(sum(counts.values()))} from the allowed balancer(s) "
            f"{_listed(peers)} came without a PROXY header ({said})",
            "the balancer forwards the clients' bytes as they are, without the PROXY "
            "header first: its PROXY protocol is switched off (or it speaks a version "
            "this listener does not take)",
            "switch the PROXY protocol on towards mmproxy: HAProxy `send-proxy-v2` on the "
            "`server` line; nginx `proxy_protocol on;` in the stream `server` block; AWS "
            "NLB target-group attribute proxy_protocol_v2.enabled=true",
        )
    ]


# --- processes and sockets (/proc) -----------------------------------------------------


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    exe: str  # "" when unreadable

    def names(self) -> set[str]:
        return {self.comm, os.path.basename(self.exe)}

    def __str__(self) -> str:
        return f"pid {self.pid} {self.comm}"


def _process(pid: int) -> Process | None:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    return Process(pid, comm, exe)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def socket_holders(inode: int) -> list[tuple[Process, int]]:
    """The processes holding socket `inode` open, each with its fd number for it."""
    link = f"socket:[{inode}]"
    found = []
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    process = _process(pid)
                    if process is not None:
                        found.append((process, int(fd)))
                    break
            except OSError:
                continue
    return found


def socket_owners(inode: int) -> list[Process]:
    return [process for process, _ in socket_holders(inode)]


_PIDFD_GETFD = 438  # the same number on every architecture (Linux 5.6)
IP_PKTINFO, IPV6_RECVPKTINFO = 8, 49


def asks_destination(pid: int, fd: int) -> bool | None:
    """Whether another process's UDP socket asks for each datagram's destination address
    (IP_PKTINFO / IPV6_RECVPKTINFO), which a server needs to reply from the address asked.
    Read with getsockopt() on a duplicate of the fd (pidfd_getfd): nothing is changed.
    None when it cannot be read."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        copy = libc.syscall(_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if copy < 0:
        return None
    with socket.socket(fileno=copy) as sock:
        options = [(socket.SOL_IP, IP_PKTINFO)]
        if sock.family == socket.AF_INET6:
            options.append((socket.IPPROTO_IPV6, IPV6_RECVPKTINFO))
        try:
            return any(sock.getsockopt(level, option) for level, option in options)
        except OSError:
            return None


@dataclass(frozen=True)
class Bound:
    """A socket of this network namespace, from /proc/self/net/{tcp,udp}[6]."""

    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    listening: bool
    inode: int


def bound_sockets(proto: str) -> list[Bound]:
    found = []
    for table in (f"/proc/self/net/{proto}", f"/proc/self/net/{proto}6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    host_hex, port_hex = fields[1].split(":")
                    # TCP 0A: LISTEN; UDP 07: unconnected (a server's socket)
                    listening = fields[3] == ("0A" if proto == "tcp" else "07")
                    found.append(
                        Bound(proc_address(host_hex), int(port_hex, 16), listening, int(fields[9]))
                    )
        except OSError:
            continue
    return found


def _serving(target: Address, proto: str) -> list[Bound]:
    """Listening sockets that take connections to `target` (its address or a wildcard)."""
    exact = ipaddress.ip_address(target.host)
    wild = {ipaddress.ip_address("::")} | (
        set() if exact.version == 6 else {ipaddress.ip_address("0.0.0.0")}
    )
    return [
        b
        for b in bound_sockets(proto)
        if b.listening and b.port == target.port and (b.host == exact or b.host in wild)
    ]


def docker_proxy(config: Config) -> list[Finding]:
    """A target served by Docker's userland proxy: it connects onward from its own
    address, so the container sees the proxy, never the client."""
    findings = []
    for target in config.targets():
        for bound in _serving(target, "tcp"):
            owners = [p for p in socket_owners(bound.inode) if "docker-proxy" in p.names()]
            if not owners:
                continue
            findings.append(
                Finding(
                    "docker-proxy",
                    f"target {target} is served by docker-proxy ({owners[0]}): a port "
                    "Docker publishes for a container",
                    "docker-proxy accepts the spoofed connection and opens a new one to the "
                    "container from its own address, so the application sees Docker's "
                    "address instead of the client's (and Docker's DNAT, with the userland "
                    "proxy off, sends the replies away from mmproxy)",
                    "run the container with host networking (`docker run --network host`, "
                    "compose `network_mode: host`) so the application itself listens on "
                    f"{target}, or run the application outside Docker",
                )
            )
    return findings


def udp_wildcard(config: Config) -> list[Finding]:
    """A UDP application bound to 0.0.0.0 / [::]: its replies take the source address the
    kernel picks from the route to the client, not the target's."""
    if not any(a.transport == "udp" for a in config.listen):
        return []
    findings = []
    sockets = bound_sockets("udp")
    for target in config.targets():
        exact = ipaddress.ip_address(target.host)
        on_port = [b for b in sockets if b.port == target.port and b.listening]
        if not on_port or any(b.host == exact for b in on_port):
            continue
        if not any(b.host.is_unspecified for b in on_port):
            continue
        holders = [h for b in on_port if b.host.is_unspecified for h in socket_holders(b.inode)]
        if any(asks_destination(p.pid, fd) for p, fd in holders):
            continue  # it learns each request's address, and can answer from it
        who = f" ({holders[0][0]})" if holders else ""
        findings.append(
            Finding(
                "udp-reply-source",
                f"the UDP application on port {target.port}{who} is bound to every address "
                f"(0.0.0.0 / [::]), not to the target {target.host}",
                "its reply to a client leaves from the address the kernel picks by the "
                f"route to the client{_route_source(target)}, not from {target.host}: "
                f"mmproxy's flow socket, connected to {target}, never receives it (the "
                "socket does not ask for each request's address with IP_PKTINFO, so the "
                "application cannot answer from it)",
                f"bind the application to {target} (e.g. dnsmasq `listen-address="
                f"{target.host}` with `bind-interfaces`), or make it answer from the "
                "address asked",
            )
        )
    return findings


def _route_source(target: Address) -> str:
    family = 6 if ":" in target.host else 4
    routes, _ = ip_json(["-" + str(family), "route", "get", TEST_SOURCES[family]])
    source = routes[0].get("prefsrc") if routes else None
    return f" (here {source})" if source else ""


# --- routing ---------------------------------------------------------------------------


def ip_json(args: list[str]) -> tuple[list[dict[str, object]], str]:
    """(the parsed output of `ip -j ARGS`, its error text when it failed)."""
    path = routing.executable("ip")
    if path is None:
        return [], "`ip` is not installed (apt install iproute2)"
    proc = subprocess.run(
        [path, "-j", "-d", *args], capture_output=True, text=True, check=False, timeout=10
    )
    if proc.returncode != 0:
        return [], proc.stderr.strip() or f"ip {' '.join(args)} failed"
    try:
        data = json.loads(proc.stdout or "[]")
    except ValueError:
        return [], f"ip {' '.join(args)} printed no JSON"
    return [d for d in data if isinstance(d, dict)], ""


def _prefix(rule: Mapping[str, object], key: str) -> str:
    """A rule's src or dst as a prefix; `ip -j` leaves out the length of a single host."""
    host = str(rule[key])
    return f"{host}/{rule.get(key + 'len', 128 if ':' in host else 32)}"


def _rule_text(rule: Mapping[str, object]) -> str:
    parts = [f"pref {rule.get('priority')}"]
    if "not" in rule:
        parts.append("not")
    parts.append("from " + (_prefix(rule, "src") if rule.get("src", "all") != "all" else "all"))
    if "dst" in rule:
        parts.append(f"to {_prefix(rule, 'dst')}")
    for key in ("iif", "oif", "fwmark"):
        if key in rule:
            parts.append(f"{key} {rule[key]}")
    if "table" in rule:
        parts.append(f"lookup {rule['table']}")
    if "action" in rule:
        parts.append(str(rule["action"]))
    return " ".join(parts)


def _is_ours(rule: Mapping[str, object], config: Config, family: int) -> bool:
    if str(rule.get("table")) != str(config.table) or "not" in rule:
        return False
    if config.routing_variant() == "lo":
        src = "127.0.0.1" if family == 4 else "::1"
        return rule.get("src") == src and rule.get("iif") == "lo"
    try:
        return int(str(rule.get("fwmark", "-1")), 16) == config.mark
    except ValueError:
        return False


# Selectors a reply can be matched on without knowing the application (its uid, its
# ports, an interface it bound to): a rule with others is left out rather than guessed.
_UNKNOWN = ("oif", "uid_start", "sport", "dport", "ipproto", "tos", "l3mdev")


def catches(rule: Mapping[str, object], source: str, mark: int) -> bool | None:
    """Whether `rule` matches replies from `source` with fwmark `mark` to any client
    (None: depends on things doctor cannot know)."""
    if any(key in rule for key in _UNKNOWN):
        return None
    address = ipaddress.ip_address(source)
    match = True
    if rule.get("src", "all") != "all":
        match = address in ipaddress.ip_network(_prefix(rule, "src"), strict=False)
    if "iif" in rule and rule["iif"] != "lo":
        match = False  # a reply is sent by this host: its lookups are made with iif lo
    if "fwmark" in rule:
        mask = int(str(rule.get("fwmask", "0xffffffff")), 16)
        match = match and (mark & mask) == int(str(rule["fwmark"]), 16)
    return not match if "not" in rule else match


def diverted(rule: Mapping[str, object], family: int, table: int) -> str | None:
    """Which replies a matching rule sends somewhere other than mmproxy's table ("every
    client", "clients in 10.0.0.0/8"), or None when the lookup falls through to it."""
    action = rule.get("action")
    if action in ("blackhole", "unreachable", "prohibit"):
        return "every client"
    if action is not None or "goto" in rule or "suppress_prefixlen" in rule:
        return None  # nop, goto, or a lookup that lets default routes fall through
    name = str(rule.get("table", ""))
    if name in ("local", str(table)):
        return None  # local: replies are not to this host's addresses
    routes, _ = ip_json([f"-{family}", "route", "show", "table", name])
    destinations = [str(r.get("dst")) for r in routes]
    if not destinations:
        return None  # an empty table: the lookup goes on to the next rule
    if "default" in destinations:
        return "every client"
    return f"clients in {_listed(destinations, 3)}"


def _reply(target: Address, config: Config) -> tuple[int, str, int]:
    family = 6 if ":" in target.host else 4
    mark = config.mark if config.routing_variant() == "fwmark" else 0
    return family, target.host, mark


def routing_rules(
    config: Config, instance: str | None = None, checked: list[Result] | None = None
) -> list[Finding]:
    """The reply rules are missing, or a rule with a lower priority number catches the
    replies first and sends them elsewhere. `checked`: check_routing's results, if run."""
    if checked is None:
        checked = check_routing(config, instance)
    missing = [r for r in checked if not r.ok]
    if missing:
        return [
            Finding(
                "routing-missing",
                "missing: " + "; ".join(r.what for r in missing),
                "replies from the application to the clients' addresses leave by the "
                "normal route (out of the host, or nowhere) instead of coming back to "
                "mmproxy: connections fail with 'did not answer' (go-mmproxy: 'failed to "
                "establish upstream connection')",
                _routing_fix(config, instance, missing),
            )
        ]
    findings: list[Finding] = []
    for target in config.targets():
        finding = _shadowed(target, config)
        if finding is not None:
            findings.append(finding)
    return findings


def _routing_fix(config: Config, instance: str | None, missing: list[Result]) -> str:
    by_hand = "; ".join(dict.fromkeys(r.fix.partition("   (or:")[0] for r in missing))
    if not config.path:
        return by_hand
    name = f" --instance {instance}" if instance else ""
    return f"mmproxy routing up{name} -c {config.path}   (or by hand: {by_hand})"


def _shadowed(target: Address, config: Config) -> Finding | None:
    family, source, mark = _reply(target, config)
    rules, _ = ip_json([f"-{family}", "rule", "show"])
    ours = next((r for r in rules if _is_ours(r, config, family)), None)
    if ours is None:
        return None  # check_routing reports it
    prio = int(str(ours.get("priority", 0)))
    for rule in rules:
        if int(str(rule.get("priority", 0))) >= prio:
            break
        if not catches(rule, source, mark):
            continue
        whom = diverted(rule, family, config.table)
        if whom is not None:
            return _shadow_finding(rule, ours, family, source, mark, whom)
    return None


def _shadow_finding(
    rule: Mapping[str, object],
    ours: Mapping[str, object],
    family: int,
    source: str,
    mark: int,
    whom: str,
) -> Finding:
    probe = [f"-{family}", "route", "get", TEST_SOURCES[family], "from", source]
    probe += ["mark", str(mark)] if mark else []
    routes, error = ip_json(probe)
    got = error or " ".join(
        f"{k} {v}" for k, v in routes[0].items() if k in ("type", "dev", "table")
    )
    theirs, mine = int(str(rule["priority"])), int(str(ours["priority"]))
    selector = " ".join(routing_selector(ours))
    return Finding(
        "routing-shadowed",
        f"rule `{_rule_text(rule)}` comes before mmproxy's `{_rule_text(ours)}` and catches "
        f"the replies from {source} to {whom} (`ip route get {' '.join(probe[3:])}`: {got})",
        "the kernel tries rules in order of priority (lowest number first); this one sends "
        "the application's replies elsewhere before mmproxy's rule is reached, so spoofed "
        "connections never complete",
        f"give mmproxy's rule a lower number: `ip -{family} rule add {selector} pref "
        f"{max(theirs - 1, 1)}` then `ip -{family} rule del pref {mine}`; or remove or "
        f"narrow the other rule (`ip -{family} rule del pref {theirs}`)",
    )


def routing_selector(rule: Mapping[str, object]) -> list[str]:
    """mmproxy's rule as `ip rule add` arguments (without the priority)."""
    words = []
    if rule.get("src", "all") != "all":
        words += ["from", _prefix(rule, "src")]
    if "iif" in rule:
        words += ["iif", str(rule["iif"])]
    if "fwmark" in rule:
        words += ["fwmark", f"{rule['fwmark']}/{rule.get('fwmask', '0xffffffff')}"]
    return [*words, "lookup", str(rule.get("table"))]


def _sysctl(path: str) -> int | None:
    try:
        return int(Path("/proc/sys/net", path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def fwmark_sysctls(config: Config) -> list[Finding]:
    """The fwmark variant with a loopback target: the reply is first routed unmarked, by
    the route to the client, before the firewall restores its mark; that route must exist
    and its device must accept a 127.0.0.0/8 source (route_localnet).

    (rp_filter is not checked: the replies are delivered over lo with their route already
    set, so reverse-path filtering never sees them; the namespace test shows it.)"""
    if config.routing_variant() != "fwmark":
        return []
    loopback = [t for t in config.targets() if ":" not in t.host and t.host.startswith("127.")]
    if not loopback:
        return []
    client = TEST_SOURCES[4]
    routes, error = ip_json(["-4", "route", "get", client])
    if not routes:
        return [
            Finding(
                "fwmark-no-route",
                f"no IPv4 route to clients (`ip route get {client}`: {error})",
                "in the fwmark variant a reply is routed by the normal table before the "
                "firewall gives it mmproxy's mark; without a route to the client it is "
                "dropped there",
                "add a default route (`ip route add default via GATEWAY`)",
            )
        ]
    dev = str(routes[0].get("dev", ""))
    allowed = max(
        _sysctl("ipv4/conf/all/route_localnet") or 0,
        _sysctl(f"ipv4/conf/{dev}/route_localnet") or 0,
    )
    if allowed:
        return []
    source = loopback[0].host
    _, probe = ip_json(["-4", "route", "get", client, "from", source])
    return [
        Finding(
            "fwmark-route-localnet",
            f"net.ipv4.conf.{dev}.route_localnet is 0 and the target {loopback[0]} is on "
            f"127.0.0.0/8 (`ip route get {client} from {source}`: {probe or 'ok'})",
            f"a reply from {source} is first routed, unmarked, towards {dev}; the kernel "
            "drops a 127.0.0.0/8 source on a real device unless route_localnet allows it, "
            "before the firewall can restore mmproxy's mark and send it back over lo",
            f"sysctl -w net.ipv4.conf.{dev}.route_localnet=1 (and keep it in "
            f"/etc/sysctl.d/mmproxy.conf), or use routing: lo (loopback targets need no "
            "fwmark)",
        )
    ]


# --- the running daemon's privileges -----------------------------------------------------


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_instance(argv: list[str], config: Config, instance: str | None) -> bool:
    names = [i for i, a in enumerate(argv) if a == "mmproxy" or a.endswith("/mmproxy")]
    if not names:
        return False
    rest = argv[names[0] + 1 :]
    if rest and rest[0] in ("check", "doctor", "routing"):
        return False
    wanted = os.path.realpath(config.path) if config.path else None
    for flag, value in itertools.pairwise(rest):
        if flag in ("-c", "--config") and os.path.realpath(value) == wanted:
            return True
        if flag == "--instance" and value == instance:
            return True
    return False


def daemons(config: Config, instance: str | None) -> list[int]:
    """The pids of the running mmproxy processes serving this config (main processes:
    their workers are forks with the same privileges)."""
    me = os.getpid()
    found = [p for p in _pids() if p != me and _is_instance(_argv(p), config, instance)]
    return [p for p in found if _status(p).get("PPid") not in {str(f) for f in found}]


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _capabilities(pid: int) -> int | None:
    try:
        return int(_status(pid)["CapEff"], 16)
    except (KeyError, ValueError):
        return None


def capabilities(
    config: Config, instance: str | None, rejections: Iterable[Rejection] = ()
) -> list[Finding]:
    """The running mmproxy lacks CAP_NET_ADMIN: every spoofed connect fails (EPERM)."""
    lacking = [
        pid
        for pid in daemons(config, instance)
        if (caps := _capabilities(pid)) is not None and not caps >> CAP_NET_ADMIN & 1
    ]
    denied = sum(r.count for r in rejections if "needs CAP_NET_ADMIN" in r.detail)
    if not lacking and not denied:
        return []
    seen = []
    if lacking:
        seen.append(f"the running mmproxy (pid {_listed(map(str, lacking))}) lacks CAP_NET_ADMIN")
    if denied:
        seen.append(f"{_connections(denied)} failed with 'the process needs CAP_NET_ADMIN'")
    return [
        Finding(
            "capabilities",
            "; ".join(seen),
            "without CAP_NET_ADMIN the kernel refuses IP_TRANSPARENT and SO_MARK (EPERM), "
            "so mmproxy cannot connect with the client's address: every connection fails "
            "(go-mmproxy: 'failed to establish upstream connection')",
            "run it from the packaged unit (mmproxy@NAME.service grants "
            "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE), or as root, or by "
            "hand with the capability: `setpriv --reuid=nobody --regid=nogroup "
            "--clear-groups --inh-caps=+net_admin --ambient-caps=+net_admin mmproxy -c FILE`",
        )
    ]


def own_privileges() -> list[Finding]:
    caps = _capabilities(os.getpid())
    if caps is None or caps >> CAP_NET_ADMIN & 1:
        return []
    return [
        Finding(
            "doctor-unprivileged",
            "mmproxy doctor runs without CAP_NET_ADMIN",
            "it cannot read the firewall rules or try a spoofed connection, so some checks "
            "fail for that reason alone",
            "run it as root: sudo mmproxy doctor -c FILE",
        )
    ]


# --- all together ----------------------------------------------------------------------


def diagnose(
    config: Config,
    instance: str | None,
    rejections: list[Rejection],
    routing: list[Result] | None = None,
) -> list[Finding]:
    return [
        *own_privileges(),
        *untrusted_peers(config, rejections),
        *mapped_balancers(config, rejections),
        *missing_header(config, rejections),
        *capabilities(config, instance, rejections),
        *routing_rules(config, instance, routing),
        *fwmark_sysctls(config),
        *docker_proxy(config),
        *udp_wildcard(config),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log", metavar="FILE",
        help="read mmproxy's log lines (its stderr) from FILE instead of the journal",
    )  # fmt: skip
    parser.add_argument(
        "--since", type=parse_since, default=DEFAULT_SINCE, metavar="AGE",
        help="how far back to read the journal, e.g. 30m, 2h, 1d (default 1h)",
    )  # fmt: skip


def _rejections(args: argparse.Namespace, instance: str | None) -> tuple[list[Rejection], str]:
    if args.log:
        return read_log(args.log), f"log {args.log}"
    if instance is None:
        return [], "no log (give -c FILE, --instance NAME or --log FILE)"
    try:
        return read_journal(instance, args.since), f"journal of mmproxy@{instance}.service"
    except DoctorError as exc:
        return [], f"no log: {exc}"


def main(config: Config, args: argparse.Namespace, instance: str | None) -> int:
    """Print the self-checks, then the diagnoses; 0 only when nothing is wrong."""
    routing = check_routing(config, instance)  # once: the diagnoses read it too
    results = run_checks(config, instance, routing=routing)
    print("self-checks:")
    print(report(results))
    try:
        rejections, source = _rejections(args, instance)
    except DoctorError as exc:
        print(f"mmproxy doctor: {exc}")
        return 2
    refused = sum(r.count for r in rejections)
    print(f"diagnoses ({source}: {refused} refusal{'' if refused == 1 else 's'}):")
    findings = diagnose(config, instance, rejections, routing)
    for finding in findings:
        print(finding.text())
    if not findings:
        print("[+] no known problem found")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} verified, {failed} failed, {len(findings)} diagnoses")
    return 1 if failed or findings else 0

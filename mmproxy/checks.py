"""Self-checks: is this host set up so that spoofed connections work?

Run before the daemon reports ready, and by hand with `mmproxy check -c FILE`. Each check
says VERIFIED or FAILED, and a failure carries the exact command or change that fixes it.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from mmproxy import routing
from mmproxy.address import Address
from mmproxy.config import Config
from mmproxy.transparent import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    SO_MARK,
    UpstreamError,
    open_datagram,
    probe_upstream,
)

# Sources for the spoofed test connection: documentation addresses, as the original uses.
TEST_SOURCES = {4: "192.0.2.1", 6: "2001:db8::1"}
CAP_NET_ADMIN = 12  # bit of the capability masks (linux/capability.h)
CAPS_FIX = (
    "run mmproxy as root, or give it CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
)


@dataclass(frozen=True)
class Result:
    ok: bool
    what: str  # the command or fact checked
    detail: str = ""  # why it failed
    fix: str = ""  # what to run or change

    def line(self) -> str:
        if self.ok:
            return f"[+] VERIFIED  {self.what}"
        text = f"[!] FAILED    {self.what}"
        if self.detail:
            text += f": {self.detail}"
        if self.fix:
            text += f"\n              fix: {self.fix}"
        return text


def _family(address: Address) -> int:
    return 6 if address.family == socket.AF_INET6 else 4


def _effective_capabilities() -> int | None:
    """The CapEff mask of this process (None if /proc does not say)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def check_capabilities(config: Config, host: bool = True) -> list[Result]:
    """`host`: the host checks run in this process too (the fwmark one needs the right
    to read firewall rules)."""
    # CAP_NET_ADMIN is all mmproxy needs: IP_TRANSPARENT, IPV6_TRANSPARENT and SO_MARK
    # accept it on every kernel, and reading the fwmark variant's firewall rules needs it.
    # (The kernel also accepts CAP_NET_RAW for the socket options, for SO_MARK only since
    # Linux 5.17, but not for the firewall rules: it is never the one to ask for.)
    caps = _effective_capabilities()
    lacks_admin = caps is not None and not caps >> CAP_NET_ADMIN & 1
    results = []
    for family, level, option in (
        (socket.AF_INET, socket.SOL_IP, IP_TRANSPARENT),
        (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_TRANSPARENT),
    ):
        name = "IP_TRANSPARENT" if family == socket.AF_INET else "IPV6_TRANSPARENT"
        results.append(_sockopt_check(f"can set {name}", family, level, option, 1, CAPS_FIX))
    if config.mark:
        results.append(
            _sockopt_check(
                f"can set SO_MARK {config.mark}",
                socket.AF_INET,
                socket.SOL_SOCKET,
                SO_MARK,
                config.mark,
                CAPS_FIX,
            )
        )
    if lacks_admin:  # name what is missing
        results = [
            r if r.ok else replace(r, detail=f"{r.detail} (the process lacks CAP_NET_ADMIN)")
            for r in results
        ]
    if host and config.routing_variant() == "fwmark" and lacks_admin:
        results.append(
            Result(
                False,
                "has CAP_NET_ADMIN (needed to read the firewall rules of the fwmark routing)",
                "missing CAP_NET_ADMIN",
                CAPS_FIX,
            )
        )
    return results


def _sockopt_check(what: str, family: int, level: int, option: int, value: int, fix: str) -> Result:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(level, option, value)
    except OSError as exc:
        return Result(False, what, exc.strerror or str(exc), fix)
    return Result(True, what)


def _show(cmd: list[str]) -> str:
    return shlex.join(cmd)


def check_routing(config: Config, instance: str | None) -> list[Result]:
    plan = plan_for(config)
    results: list[Result] = []
    how = (
        f"mmproxy routing up --instance {instance} -c {config.path}"
        if instance and config.path
        else None
    )
    for family in plan.families:
        if plan.variant == "lo":
            rule = routing.lo_rule(family, plan.table)
        else:
            rule = routing.mark_rule(family, plan.mark, plan.table)
            results += _firewall_checks(plan, family, how)
        route = routing.local_route(family, plan.table)
        for cmd in (rule, route):
            try:
                present = routing.present(cmd)
            except routing.RoutingError as exc:
                results.append(Result(False, _show(cmd), str(exc), "apt install iproute2"))
                continue
            fix = _show(cmd) + (f"   (or: {how})" if how else "")
            results.append(Result(present, _show(cmd), "" if present else "missing", fix))
    return results


def _firewall_checks(plan: routing.Plan, family: int, how: str | None) -> list[Result]:
    if plan.firewall == "iptables":
        out = []
        for add in routing.iptables_rules(family, plan.mark):
            ok = routing.succeeds([*add[:3], "-C", *add[4:]])
            out.append(Result(ok, _show(add), "" if ok else "missing", _show(add)))
        return out
    if family == 6:
        return []  # the inet table serves both families: checked once
    ok = True
    for chain in (f"pre_{plan.mark}", f"out_{plan.mark}"):
        listing = routing.run(
            ["nft", "list", "chain", "inet", routing.NFT_TABLE, chain], check=False
        )
        ok = ok and f"mark {plan.mark}" in listing.replace(f"0x{plan.mark:08x}", str(plan.mark))
    script = routing.nft_script(plan.mark).strip().replace("\n", "; ")
    fix = f"nft '{script}'" + (f"   (or: {how})" if how else "")
    what = f"nftables connmark rules for mark {plan.mark} in table inet {routing.NFT_TABLE}"
    return [Result(ok, what, "" if ok else "missing", fix)]


def plan_for(config: Config) -> routing.Plan:
    families = tuple(sorted({_family(t) for t in config.targets()}))
    return routing.Plan(
        config.routing_variant(), config.mark, config.table, families, config.firewall
    )


def check_target(config: Config, target: Address) -> list[Result]:
    """Does the target answer a plain connection, and a spoofed one? The spoofed one is
    tried first: when it is answered, so is a plain one. Only when it fails is the plain
    one tried, to tell a target that is down (then only that is reported, with its fix)
    from replies that do not come back. Each is reset before the application accepts it
    (transparent.probe_upstream): the checks never reach it."""
    source = Address(TEST_SOURCES[_family(target)], 0)
    plain_what = f"target {target} answers a plain connection"
    spoofed = _connect_check(
        f"target {target} answers a spoofed connection from {source.host}",
        lambda: probe_upstream(target, source, config.mark, config.connect_timeout),
        "the replies do not come back: apply the routing above",
        denied_fix=CAPS_FIX,
    )
    if spoofed.ok:
        return [Result(True, plain_what), spoofed]
    plain = _connect_check(
        plain_what,
        lambda: probe_upstream(target, None, 0, config.connect_timeout),
        f"start the application on {target} (see: ss -tlnp 'sport = :{target.port}')",
    )
    return [plain, spoofed] if plain.ok else [plain]


def _routes_locally(target: Address) -> Result:
    what = f"routing to {target.host} points to this host"
    try:
        listing = routing.run(["ip", "-j", "route", "get", target.host], check=False)
        routes = json.loads(listing or "[]")
    except (routing.RoutingError, ValueError) as exc:
        return Result(False, what, str(exc), "apt install iproute2")
    if routes and routes[0].get("type") == "local":
        return Result(True, what)
    return Result(
        False,
        what,
        "it is not a local address",
        "mmproxy relays over loopback: use 127.0.0.1 / ::1 or an address of this host",
    )


def _connect_check(
    what: str, connect: Callable[[], None], fix: str, denied_fix: str = ""
) -> Result:
    """`denied_fix` replaces `fix` when the kernel refused for want of a privilege."""
    try:
        connect()
    except UpstreamError as exc:
        return Result(False, what, str(exc), denied_fix if exc.denied and denied_fix else fix)
    return Result(True, what)


def check_udp_target(config: Config, target: Address) -> list[Result]:
    """UDP has no hand-shake to try without speaking the application's protocol, so:
    is a socket bound to the target's port, and can a transparent one be bound?"""
    results = [_udp_application(target)]
    source = Address(TEST_SOURCES[_family(target)], 0)
    what = f"a UDP socket towards {target} can be bound to {source.host} (spoofed)"
    try:
        open_datagram(target, source, config.mark).close()
    except UpstreamError as exc:
        results.append(Result(False, what, str(exc), CAPS_FIX))
    else:
        results.append(Result(True, what))
    return results


def _udp_application(target: Address) -> Result:
    bound = _udp_bound(target)
    if bound == "exact":
        return Result(True, f"a UDP socket is bound to {target} (the application)")
    if bound == "wildcard":
        # Its replies find their way back only if they leave from the target address: a
        # reply whose source the kernel picks from the route to the client does not.
        return Result(
            True,
            f"a UDP socket is bound to port {target.port} on every address (the application;"
            f" it must reply from {target.host}, as servers that answer from the address "
            f"asked do, or be bound to {target})",
        )
    return Result(
        False,
        f"a UDP socket is bound to {target} (the application)",
        "nothing is bound there",
        f"start the application on udp {target} (see: ss -ulnp 'sport = :{target.port}')",
    )


def _udp_bound(target: Address) -> str | None:
    """ "exact" or "wildcard" when /proc/self/net/udp[6] lists a socket on the target's port
    bound to its address or to every address (in this network namespace), else None."""
    v6 = target.family == socket.AF_INET6
    exact = ipaddress.ip_address(target.host)
    wildcards = {ipaddress.ip_address(w) for w in (("::",) if v6 else ("::", "0.0.0.0"))}
    tables = ["/proc/self/net/udp6"] if v6 else ["/proc/self/net/udp", "/proc/self/net/udp6"]
    found = None
    for table in tables:
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # the column names
                for line in lines:
                    host_hex, port_hex = line.split()[1].split(":")
                    if int(port_hex, 16) != target.port:
                        continue
                    host = _proc_address(host_hex)
                    if host == exact:
                        return "exact"
                    if host in wildcards:
                        found = "wildcard"
        except OSError:
            continue
    return found


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints each 32-bit word of the address as a host-order integer.
    words = [int(text[i : i + 8], 16) for i in range(0, len(text), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    return ipaddress.ip_address(packed)


def host_checks(
    config: Config, instance: str | None = None, routing: list[Result] | None = None
) -> list[Result]:
    """The checks that read the host's routing and firewall (netlink): under systemd the
    root helper (`mmproxy routing up`) runs them, so the daemon needs no netlink socket.
    `routing`: check_routing's results when the caller has them already."""
    if routing is None:
        routing = check_routing(config, instance)
    return routing + [_routes_locally(t) for t in config.targets()]


def run_checks(
    config: Config,
    instance: str | None = None,
    host: bool = True,
    routing: list[Result] | None = None,
) -> list[Result]:
    """Every self-check; `host=False` leaves out host_checks (already run as root)."""
    results = check_capabilities(config, host)
    if host:
        results += host_checks(config, instance, routing)
    transports = {address.transport for address in config.listen}
    for target in config.targets():
        if "tcp" in transports:
            results += check_target(config, target)
        if "udp" in transports:
            results += check_udp_target(config, target)
    return results


def report(results: list[Result]) -> str:
    return "\n".join(r.line() for r in results)

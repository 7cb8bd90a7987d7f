"""systemd generator: listen addresses of socket units from /etc/mmproxy/*.yaml.

systemd cannot read a socket's address from a file, so at every daemon-reload (and
`systemctl enable` reloads) this writes, for each /etc/mmproxy/NAME.yaml, a drop-in
mmproxy@NAME.socket.d/50-listen.conf with the `listen:` addresses (a port range expanded
to one line per port), and mmproxy@NAME.service.d/50-limits.conf with the service's
memory and task ceilings, sized from `max_connections` and `workers`. A generator must
never fail the boot: a file it cannot read is reported and skipped.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmproxy.address import Address
from mmproxy.config import ConfigError, load_config

CONFIG_DIR = "/etc/mmproxy"
EXAMPLE = "example.yaml"
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")

# Ceilings against a leak or a flood, far above what is used (about 25 MiB per process
# and 1 KiB per idle connection, docs/performance.md): socket buffers and pipes of busy
# connections are charged to the service too. An admin's drop-in overrides them.
MEMORY_PER_PROCESS = 64 << 20
MEMORY_PER_CONNECTION = 256 << 10
TASKS_PER_PROCESS = 16  # threads: main, relay, UDP, logging, with room to spare
TASKS_EXTRA = 16  # the routing helper and the tools it runs


@dataclass(frozen=True)
class Limits:
    memory_max: int  # bytes
    tasks_max: int


def service_limits(path: Path) -> Limits:
    """The service's ceilings for the instance in `path`. A bad value here falls back to
    the default: the service itself reports it, with its line, when it starts."""
    max_connections = _setting(path, "max_connections", 10000)
    workers = _setting(path, "workers", 0) or len(os.sched_getaffinity(0))
    processes = workers + 1 if workers > 1 else 1  # the supervisor above the workers
    return Limits(
        memory_max=processes * MEMORY_PER_PROCESS + max_connections * MEMORY_PER_CONNECTION,
        tasks_max=processes * TASKS_PER_PROCESS + TASKS_EXTRA,
    )


def _setting(path: Path, key: str, default: int) -> int:
    """One integer key of the file, or `default` when it (or the file) is bad."""
    try:
        value = getattr(load_config(str(path), only=(key,)), key)
    except ConfigError:
        return default
    return value if isinstance(value, int) else default


def limits_dropin(path: Path, limits: Limits) -> str:
    return "\n".join(
        [
            f"# Written by mmproxy-generator from {path} (max_connections, workers);",
            "# override with a drop-in of your own: systemctl edit mmproxy@NAME.service",
            "[Service]",
            f"MemoryMax={limits.memory_max}",
            f"TasksMax={limits.tasks_max}",
            "",
        ]
    )


def listen_addresses(path: Path) -> list[Address]:
    """Only the `listen:` key: a mistake elsewhere must not take the socket away (the
    service reports that one, with its line, when it starts). Read as the daemon reads
    it (no aliases, at most 1 MiB, a regular file), with the same checks."""
    listen = load_config(str(path), only=("listen",)).listen
    if not listen:
        raise ConfigError("no `listen:` addresses", path=str(path), key="listen")
    return list(listen)


def dropin(path: Path, addresses: Sequence[Address]) -> str:
    instance = path.stem
    lines = [
        f"# Written by mmproxy-generator from {path}: edit that file, then run",
        f"#   systemctl daemon-reload && systemctl restart mmproxy@{instance}.socket",
        "[Socket]",
        *(
            f"{'ListenDatagram' if a.transport == 'udp' else 'ListenStream'}={a.endpoint}"
            for a in addresses
        ),
    ]
    v4_ports = {(a.transport, a.port) for a in addresses if ":" not in a.host}
    if any(":" in a.host and (a.transport, a.port) in v4_ports for a in addresses):
        # [::]:P beside 0.0.0.0:P: the IPv6 socket must leave IPv4 to the other one.
        lines.append("BindIPv6Only=ipv6-only")
    return "\n".join(lines) + "\n"


def generate(config_dir: Path, unit_dir: Path) -> list[str]:
    """Write the drop-ins; return the problems found (one line each)."""
    problems = []
    for path in sorted(config_dir.glob("*.yaml")):
        if path.name == EXAMPLE:
            continue  # the documented template the package ships, not an instance
        if not INSTANCE_NAME.fullmatch(path.stem):
            problems.append(f"{path}: not a usable instance name, skipped")
            continue
        try:
            write_dropin(path, unit_dir)
        except ConfigError as exc:
            problems.append(f"{exc} (mmproxy@{path.stem}.socket gets no listen address)")
        except Exception as exc:  # one file's failure must not stop the others
            problems.append(
                f"{path}: {type(exc).__name__}: {exc} "
                f"(mmproxy@{path.stem}.socket gets no listen address)"
            )
    return problems


def write_dropin(path: Path, unit_dir: Path) -> None:
    addresses = listen_addresses(path)
    target = unit_dir / f"mmproxy@{path.stem}.socket.d"
    target.mkdir(parents=True, exist_ok=True)
    (target / "50-listen.conf").write_text(dropin(path, addresses))
    service = unit_dir / f"mmproxy@{path.stem}.service.d"
    service.mkdir(parents=True, exist_ok=True)
    (service / "50-limits.conf").write_text(limits_dropin(path, service_limits(path)))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: mmproxy-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 2
    config_dir = Path(os.environ.get("MMPROXY_CONFIG_DIR", CONFIG_DIR))
    for problem in generate(config_dir, Path(args[0])):
        print(f"mmproxy-generator: {problem}", file=sys.stderr)
    return 0

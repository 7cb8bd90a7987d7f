"""Command line: builds a Config from the file and the flags, then runs the server.

The original mmproxy's flags work verbatim:
    mmproxy --allowed-networks FILE -l 0.0.0.0:2222 -4 127.0.0.1:22 -6 [::1]:22
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mmproxy import __version__
from mmproxy.config import ConfigError, Override, load_config
from mmproxy.log import setup_logging
from mmproxy.routing import hint
from mmproxy.server import Server, ServerError

EX_CONFIG = 78  # sysexits.h: systemd shows it as "status=78/CONFIG"

log = logging.getLogger("mmproxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmproxy",
        description="Accept PROXY-protocol connections from a load balancer and connect to "
        "the application with the real client's address as the source.",
        epilog="Example: mmproxy --allowed-networks networks.txt -l 0.0.0.0:2222 "
        "-4 127.0.0.1:22 -6 [::1]:22   (flags override the --config file)",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "-a", "--allowed-networks", "--allowed-subnets", dest="allowed_networks_file",
        metavar="FILE", help="file of allowed balancer networks, one CIDR per line",
    )  # fmt: skip
    parser.add_argument(
        "-l", "--listen", action="append", metavar="ADDR",
        help="address to listen on, e.g. 0.0.0.0:2222 or [::]:2222 (repeatable)",
    )  # fmt: skip
    parser.add_argument("-4", "--ipv4", metavar="ADDR", help="IPv4 target, e.g. 127.0.0.1:22")
    parser.add_argument("-6", "--ipv6", metavar="ADDR", help="IPv6 target, e.g. [::1]:22")
    parser.add_argument("--mark", type=int, help="SO_MARK for spoofed connections (123)")
    parser.add_argument("--table", type=int, help="routing table in the printed rules (100)")
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="don't print the routing reminder; log warnings and errors only",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action="version", version=f"mmproxy {__version__}")
    return parser


def overrides_from(args: argparse.Namespace) -> list[Override]:
    """The flags that were given, as overrides of the file's keys."""
    flags = {
        "allowed_networks_file": "--allowed-networks",
        "listen": "--listen",
        "ipv4": "-4",
        "ipv6": "-6",
        "mark": "--mark",
        "table": "--table",
    }
    found = [
        Override(key, getattr(args, key), f"option {flag}")
        for key, flag in flags.items()
        if getattr(args, key) is not None
    ]
    if args.verbose:
        found.append(Override("log_level", "debug", "option --verbose"))
    elif args.quiet:
        found.append(Override("log_level", "warning", "option --quiet"))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, overrides_from(args))
    except ConfigError as exc:
        print(f"mmproxy: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.log_level)
    if not args.quiet:
        log.info("%s", hint(config.mark, config.table))
    server = Server(config)
    try:
        server.run()
    except ServerError as exc:
        log.error("%s", exc)
        return 1
    return 0

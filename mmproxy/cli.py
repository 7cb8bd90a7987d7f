"""Command line: builds a Config from the file and the flags, then runs a command.

    mmproxy [run] [options]          the gateway (the default command)
    mmproxy check [options]          the self-checks; exit status 0 only if all pass
    mmproxy doctor [options]         the self-checks, then known problems in plain words
    mmproxy routing up|down [options] --instance NAME
                                     apply / remove the routing (systemd runs these)
    mmproxy status NAME [--json]     a running instance's counters, open connections
                                     and last rejections (root, or status_group:)

The original mmproxy's flags work verbatim:
    mmproxy --allowed-networks FILE -l 0.0.0.0:2222 -4 127.0.0.1:22 -6 [::1]:22
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mmproxy import __version__
from mmproxy.config import Config, ConfigError, Override, load_config
from mmproxy.log import setup_logging
from mmproxy.routing import CONFIG_KEYS as ROUTING_KEYS
from mmproxy.routing import RoutingError, RoutingState, runtime_dir

# The modules that need the C part (mmproxy._splice) are imported by the commands that use
# them: --version, --help and the configuration check work where it failed to build.
NATIVE = "mmproxy._splice"

EX_CONFIG = 78  # sysexits.h: systemd shows it as "status=78/CONFIG"
COMMANDS = ("run", "check", "routing", "doctor", "status")

log = logging.getLogger("mmproxy")


def build_parser(command: str = "run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmproxy" if command == "run" else f"mmproxy {command}",
        description="Accept PROXY-protocol connections from a load balancer and connect to "
        "the application with the real client's address as the source. "
        "Other commands: `mmproxy check`, `mmproxy doctor`, `mmproxy routing up|down`, "
        "`mmproxy status NAME`.",
        epilog="Example: mmproxy --allowed-networks networks.txt -l 0.0.0.0:2222 "
        "-4 127.0.0.1:22 -6 [::1]:22   (flags override the --config file)",
    )
    if command == "routing":
        parser.add_argument("action", choices=("up", "down"))
    if command == "doctor" and not native_missing():  # else main() says what is missing
        from mmproxy import doctor

        doctor.add_arguments(parser)
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "--instance", metavar="NAME",
        help="instance name (default: the config file's name without .yaml)",
    )  # fmt: skip
    parser.add_argument(
        "-a", "--allowed-networks", "--allowed-subnets", dest="allowed_networks_file",
        metavar="FILE", help="file of allowed balancer networks, one CIDR per line",
    )  # fmt: skip
    parser.add_argument(
        "-l", "--listen", action="append", metavar="ADDR",
        help="address to listen on, e.g. 0.0.0.0:2222, [::]:2222 or a port range "
        "0.0.0.0:27015-27030 (repeatable)",
    )  # fmt: skip
    parser.add_argument("-4", "--ipv4", metavar="ADDR", help="IPv4 target, e.g. 127.0.0.1:22")
    parser.add_argument("-6", "--ipv6", metavar="ADDR", help="IPv6 target, e.g. [::1]:22")
    parser.add_argument("--mark", type=int, help="SO_MARK for spoofed connections (123)")
    parser.add_argument("--table", type=int, help="routing table of the reply rules (100)")
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="don't print the routing reminder; log warnings and errors only",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    if command == "run":
        parser.add_argument(
            "--no-host-checks", action="store_true",
            help="leave out the routing checks: `mmproxy routing up` ran them as root "
            "(the systemd unit does this, so the daemon needs no netlink socket)",
        )  # fmt: skip
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


def instance_name(args: argparse.Namespace) -> str | None:
    if args.instance:
        return str(args.instance)
    return Path(args.config).stem if args.config else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command != "run":
        gc.enable()  # the installed script disables it for the start-up (Makefile)
    if command == "status":
        return status(argv)
    args = build_parser(command).parse_args(argv)
    if command == "routing" and args.action == "down":
        return routing_down(args)
    only = ROUTING_KEYS if command == "routing" else None
    try:
        config = load_config(args.config, overrides_from(args), only)
    except ConfigError as exc:
        print(f"mmproxy: {exc}", file=sys.stderr)
        return EX_CONFIG
    if command == "check":
        return check(config, args)
    if command == "doctor":
        if why := native_missing():
            return explain_native("doctor", why)
        from mmproxy import doctor

        return doctor.main(config, args, instance_name(args))
    if command == "routing":
        return routing_up(config, args)
    return run(config, args)


def status(argv: list[str]) -> int:
    """`mmproxy status NAME`: reads the running instance's status socket; changes nothing."""
    from mmproxy import observe

    parser = argparse.ArgumentParser(
        prog="mmproxy status",
        description="Show a running instance's counters, open connections and last "
        "rejections, read from its status socket (root only, or status_group:).",
    )
    parser.add_argument("name", metavar="NAME", help="the instance (as in --instance), e.g. ssh")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    args = parser.parse_args(argv)
    return observe.main(args.name, args.json)


def native_missing() -> str | None:
    """Why the C part cannot be loaded, in one line; None when it can."""
    try:
        if importlib.util.find_spec(NATIVE) is None:
            return f"the C extension {NATIVE} is not installed (it did not build)"
        importlib.import_module(NATIVE)
    except (ImportError, ValueError) as exc:  # ValueError: a None entry in sys.modules
        return f"the C extension {NATIVE} cannot be loaded: {exc}"
    return None


def explain_native(command: str, why: str) -> int:
    print(f"mmproxy {command}: cannot run: {why}", file=sys.stderr)
    print(
        "fix: install mmproxy's Debian package, or reinstall with pip where a C compiler "
        "and the Python headers are present (Debian: gcc python3-dev)",
        file=sys.stderr,
    )
    return 1


def run(config: Config, args: argparse.Namespace) -> int:
    """Check, then run the instance: in this process, or under a supervisor of worker
    processes when `workers` asks for more than one."""
    if why := native_missing():
        return explain_native("run", why)
    from mmproxy import lifecycle
    from mmproxy.runner import Runner
    from mmproxy.supervisor import Supervisor, worker_count
    from mmproxy.systemd import Notifier

    setup_logging(config.log_level)
    notifier = Notifier()
    if not lifecycle.self_check(config, instance_name(args), not args.no_host_checks, notifier):
        return 1
    workers = worker_count(config)
    lifecycle.raise_fd_limit(config, workers)

    def reload_config() -> Config:
        return load_config(args.config, overrides_from(args))

    runner = Supervisor if workers > 1 else Runner
    # The start-up's imports are done: the collector the installed script disabled for
    # them (a tenth of their time, issue 15) runs from here on.
    gc.enable()
    try:
        return runner(config, reload_config, notifier, instance_name(args)).run()
    except lifecycle.StartError as exc:
        log.error("%s", exc)
        return 1


def check(config: Config, args: argparse.Namespace) -> int:
    if why := native_missing():
        # The configuration was read and is valid; only the live self-checks need C.
        print(f"configuration {args.config or '(from the options)'}: valid")
        return explain_native("check", f"the self-checks need it: {why}")
    from mmproxy.checks import report, run_checks

    results = run_checks(config, instance_name(args))
    print(report(results))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} verified, {failed} failed")
    return 1 if failed else 0


def routing_up(config: Config, args: argparse.Namespace) -> int:
    """Apply the routing (unless manage_routing is false), then run the host checks: under
    systemd this root helper runs them, so the daemon needs no netlink socket."""
    instance = instance_name(args)
    if instance is None:
        print("mmproxy routing: give --instance NAME or -c FILE", file=sys.stderr)
        return 2
    if why := native_missing():
        return explain_native("routing", why)
    from mmproxy.checks import host_checks, plan_for, report

    if not config.manage_routing:
        print(f"mmproxy: manage_routing is false for {instance}: routing left as it is")
    else:
        try:
            RoutingState(runtime_dir()).up(instance, plan_for(config), config.share_table)
        except RoutingError as exc:
            print(f"mmproxy routing: {exc}", file=sys.stderr)
            return 1
    results = host_checks(config, instance)
    print(report(results))
    failed = sum(not r.ok for r in results)
    if failed and config.check_failure == "fail":
        print(
            f"mmproxy routing: {failed} host checks failed; not starting "
            "(set check_failure: warn to start anyway)",
            file=sys.stderr,
        )
        return 1
    return 0


def routing_down(args: argparse.Namespace) -> int:
    instance = instance_name(args)
    if instance is None:
        print("mmproxy routing: give --instance NAME or -c FILE", file=sys.stderr)
        return 2
    RoutingState(runtime_dir()).down(instance)
    return 0

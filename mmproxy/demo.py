"""`make demo`: mmproxy doing its job, end to end, without touching the host.

It makes a throw-away network namespace, applies the routing from the README there,
starts a demo application on the config's target address, starts the real `mmproxy`
command on the config file, sends a PROXY header claiming a documentation-range client,
and prints the address the application saw. Needs root (namespaces) and iproute2.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from mmproxy.address import Address
from mmproxy.config import Config, load_config
from mmproxy.netns import NetNS, apply
from mmproxy.proxy_protocol import encode_v1, encode_v2
from mmproxy.routing import lo_commands

CLIENTS = {socket.AF_INET: ("203.0.113.7", 51234), socket.AF_INET6: ("2001:db8::7", 51235)}


def serve_demo_app(listener: socket.socket, seen: list[str]) -> None:
    """The 'application': answers every connection with the peer address it sees."""
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        with conn:
            request = conn.recv(1024)
            if not request:
                continue  # mmproxy's start-up self-check: it connects, then hangs up
            seen.append(str(Address(peer[0], peer[1])))
            conn.sendall(b"application saw " + seen[-1].encode() + b", got " + request + b"\n")


def wait_listening(ns: NetNS, address: Address, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    host = _connectable(address)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mmproxy exited with status {proc.returncode}")
        try:
            ns.connect((host, address.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"mmproxy is not listening on {address} after 10 s")


def _connectable(address: Address) -> str:
    if address.host in ("0.0.0.0", "::"):
        return "::1" if address.host == "::" else "127.0.0.1"
    return address.host


def send_through(ns: NetNS, config: Config, family: socket.AddressFamily, version: int) -> str:
    listen = config.listen[0]
    client = CLIENTS[family]
    destination = ("198.51.100.1" if family == socket.AF_INET else "2001:db8::1", listen.port)
    proto = "TCP4" if family == socket.AF_INET else "TCP6"
    if version == 1:
        header = encode_v1(proto, client, destination)
    else:
        header = encode_v2("PROXY", proto, client, destination)
    with ns.connect((_connectable(listen), listen.port)) as sock:
        sock.sendall(header + b"hello")
        line: bytes = sock.makefile("rb").readline()
        return line.decode().strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmproxy-demo", description=__doc__)
    parser.add_argument("config", nargs="?", default="etc/mmproxy/example.yaml")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo makes a network namespace: run it as root", file=sys.stderr)
        return 1
    config = load_config(args.config)
    with NetNS("mmproxy-demo") as ns:
        print(f"network namespace {ns.name}: applying the routing")
        for cmd in lo_commands(config.table):
            print("  " + " ".join(cmd))
        apply(ns, lo_commands(config.table))
        seen: list[str] = []
        targets = [t for t in (config.ipv4, config.ipv6) if t is not None]
        for target in targets:
            app = ns.listen((target.host, target.port))
            threading.Thread(target=serve_demo_app, args=(app, seen), daemon=True).start()
            print(f"demo application listening on {target}")
        cmd = ns.exec_args(sys.executable, "-m", "mmproxy", "-c", args.config, "--quiet")
        print("starting: " + " ".join(cmd[4:]))
        proc = subprocess.Popen(cmd)
        try:
            wait_listening(ns, config.listen[0], proc)
            for target in targets:
                for version in (1, 2):
                    client = CLIENTS[target.family]
                    print(
                        f"client {Address(*client)} via PROXY v{version} -> mmproxy "
                        f"{config.listen[0]} -> {target}:"
                    )
                    print("  " + send_through(ns, config, target.family, version))
        finally:
            proc.terminate()
            proc.wait(10)
    ok = len(seen) == 2 * len(targets) and all(
        s.startswith(("203.0.113.7", "[2001:db8::7]")) for s in seen
    )
    print("demo OK: the application saw the clients' real addresses" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

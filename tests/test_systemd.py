"""mmproxy.systemd: the sockets systemd passes (sd_listen_fds(3), done by hand), in a real
child process that gets real listening sockets as fds 3 and 4, as systemd passes them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The child: what listen_sockets() gives, and what it leaves in the environment.
CHILD = """\
import os, sys
from mmproxy.systemd import listen_sockets
found = listen_sockets()
if found is None:
    print("none")
else:
    print(" ".join(f"{s.family.name}:{s.type.name}:{s.getsockname()[1]}:{s.get_inheritable()}"
                   for s in found))
print(sorted(k for k in os.environ if k.startswith("LISTEN_")))
"""


def _run_with(fds: list[socket.socket], env: dict[str, str]) -> list[str]:
    """Run CHILD with `fds` as 3, 4, ... and `env`; LISTEN_PID=self is the child's own
    pid (a shell sets it to $$, then execs Python in the same process)."""
    wanted = [s.fileno() for s in fds]

    def place() -> None:  # in the child, before exec: dup them to 3, 4, ...
        moved = [os.dup(fd) for fd in wanted]  # out of the way of 3, 4 first
        for i, fd in enumerate(moved):
            os.dup2(fd, 3 + i)

    variables = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    variables.update({k: v for k, v in env.items() if k != "LISTEN_PID" or v != "self"})
    variables["PYTHONPATH"] = str(REPO)
    own_pid = "export LISTEN_PID=$$; " if env.get("LISTEN_PID") == "self" else ""
    script = f'{own_pid}exec "$0" -c "$1"'
    out = subprocess.run(
        ["sh", "-c", script, sys.executable, CHILD],
        env=variables, preexec_fn=place, pass_fds=tuple(range(3, 3 + len(fds))),
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return out.stdout.splitlines()


def _listeners() -> list[socket.socket]:
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    return [tcp, udp]


def test_passed_sockets_are_taken_and_the_variables_cleared() -> None:
    socks = _listeners()
    try:
        env = {"LISTEN_PID": "self", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        found, left = _run_with(socks, env)
        ports = [s.getsockname()[1] for s in socks]
        assert found == f"AF_INET:SOCK_STREAM:{ports[0]}:False AF_INET6:SOCK_DGRAM:{ports[1]}:False"
        assert left == "[]"
    finally:
        for s in socks:
            s.close()


def test_variables_meant_for_another_process_pass_nothing() -> None:
    socks = _listeners()
    try:
        found, left = _run_with(socks, {"LISTEN_PID": "1", "LISTEN_FDS": "2"})
        assert (found, left) == ("", "[]")  # activated, but nothing is ours
    finally:
        for s in socks:
            s.close()


def test_not_activated() -> None:
    assert _run_with([], {}) == ["none", "[]"]

"""Running out of file descriptors (EMFILE) makes mmproxy back off and recover, never
exit; connections that could not be served wait in the backlog or are closed with a
reason."""

from __future__ import annotations

import signal
import subprocess
import time

from mmproxy.proxy_protocol import encode_v1

from .conftest import CLIENT4, Net, StartMmproxy, process_tree, start_backend

FD_LIMIT = 64  # mmproxy needs ~10 of its own; each connection takes 2


def test_emfile_backs_off_and_recovers(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    proc = run_mmproxy(lo_net, ipv4=app.address)
    for pid in process_tree(proc.proc.pid):  # the supervisor and its worker processes
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={FD_LIMIT}"], check=True)
    held = []
    for i in range(60):  # far more than FD_LIMIT allows at once
        sock = lo_net.gw.connect(("127.0.0.1", 2222), timeout=20)
        sock.sendall(encode_v1("TCP4", (CLIENT4, 44000 + i), ("198.51.100.1", 2222)))
        held.append(sock)
    proc.wait_for(r"(accept failed: Too many open files; pausing|cannot open a socket)")
    assert proc.proc.poll() is None  # still running
    for sock in held:
        sock.close()
    # Once mmproxy has closed its side of those (asynchronously), new clients are served.
    deadline = time.monotonic() + 15
    answer = b""
    while not answer and time.monotonic() < deadline:
        with lo_net.gw.connect(("127.0.0.1", 2222), timeout=20) as sock:
            sock.sendall(encode_v1("TCP4", (CLIENT4, 44999), ("198.51.100.1", 2222)))
            answer = sock.makefile("rb").readline()  # b"": closed for lack of fds, retry
        time.sleep(0.1)
    assert answer == f"{CLIENT4} 44999\n".encode()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0

"""Load generator of the soak test (test_soak.py): clients and an application that
agree, connection by connection, on what to send and in which order to close.

Run as `python -m tests.integration.soak client|backend ...` inside the gateway's
network namespace (several processes of each, so that the load is not held back by one
GIL). Every connection has a number; its plan (sizes, close order, PROXY version,
address family) follows from the seed and that number alone, so the client and the
application derive the same plan without talking. The application learns the number
from the spoofed source address mmproxy connected from: 203.0.113.<1 + n // 50000> (or
2001:db8:99::<1 + n // 50000>), port 10000 + n % 50000. Each side writes one record per
direction it sent or received: `number direction role bytes sha256 how-it-ended`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass

from mmproxy.proxy_protocol import encode_v1, encode_v2

KiB, MiB = 1024, 1024 * 1024
BLOCK_SIZE = 8 * MiB  # payloads are slices of one random block, the same in every process
PER_ADDRESS = 50_000
FIRST_PORT = 10_000
LINGER_RESET = struct.pack("ii", 1, 0)
# Close orders. "clean" ones must deliver every byte both ways; after a reset, what
# arrived must be a prefix of what was sent, and the other side must see the end.
KINDS = (
    "client-closes-first",  # client sends, reads the whole answer, closes; then the backend
    "backend-closes-first",  # backend reads the request, answers, closes; then the client
    "client-half-closes",  # client sends, SHUT_WR, then reads the answer sent after its EOF
    "backend-half-closes",  # backend answers, SHUT_WR, then reads the request sent after it
    "client-resets",  # client sends part of its bytes, then resets (SO_LINGER 0)
    "backend-resets",  # backend sends part of its bytes, then resets
)
CLEAN = KINDS[:4]
RESET_LIMIT = 64 * KiB  # a resetting side sends at most this: it fits in the buffers


@dataclass(frozen=True)
class Plan:
    number: int
    kind: str
    c2b: tuple[int, int]  # (offset in the block, size) of what the client sends
    b2c: tuple[int, int]  # the same for the backend's answer
    ipv6: bool
    v2: bool
    read_before_reset: int  # bytes the resetting side reads first (0: resets at once)


def payload_size(r: random.Random) -> int:
    """Mostly small; now and then up to 4 MiB; 0 one time in ten."""
    x = r.random()
    if x < 0.10:
        return 0
    if x < 0.85:
        return r.randint(1, 4 * KiB)
    if x < 0.98:
        return r.randint(4 * KiB + 1, 64 * KiB)
    if x < 0.997:
        return r.randint(64 * KiB + 1, MiB)
    return r.randint(MiB + 1, 4 * MiB)


def plan(seed: int, number: int) -> Plan:
    r = random.Random(seed * 10_000_019 + number)
    kind = r.choice(KINDS)
    sizes = [payload_size(r), payload_size(r)]
    if kind == "client-resets":
        sizes[0] = min(sizes[0], RESET_LIMIT)
    elif kind == "backend-resets":
        sizes[1] = min(sizes[1], RESET_LIMIT)
    c2b, b2c = ((r.randrange(BLOCK_SIZE - s + 1), s) for s in sizes)
    read_first = r.choice((0, r.randint(0, 16 * KiB)))
    return Plan(number, kind, c2b, b2c, r.random() < 0.25, r.random() < 0.5, read_first)


def block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK_SIZE)


def client_address(number: int, ipv6: bool) -> tuple[str, int]:
    index = 1 + number // PER_ADDRESS
    host = f"2001:db8:99::{index:x}" if ipv6 else f"203.0.113.{index}"
    return host, FIRST_PORT + number % PER_ADDRESS


def number_of(peer: tuple[str, int]) -> int | None:
    """The connection's number from the source address the application sees."""
    host, port = peer[0], peer[1]
    if host.startswith("2001:db8:99::"):
        index = int(host.rsplit(":", 1)[1], 16)
    elif host.startswith("203.0.113."):
        index = int(host.rsplit(".", 1)[1])
    else:
        return None  # mmproxy's self-checks
    return (index - 1) * PER_ADDRESS + port - FIRST_PORT


# --- one direction ------------------------------------------------------------------


class Sink:
    """Reads and hashes what arrives; remembers how the stream ended."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.n = 0
        self.end = "open"

    def read(self, sock: socket.socket, limit: int | None = None) -> None:
        """Until EOF (limit None) or until `limit` bytes in all have arrived."""
        buf = bytearray(256 * KiB)
        view = memoryview(buf)
        while limit is None or self.n < limit:
            want = len(buf) if limit is None else min(len(buf), limit - self.n)
            try:
                got = sock.recv_into(view, want)
            except ConnectionResetError:
                self.end = "reset"
                return
            except TimeoutError:
                self.end = "timeout"
                return
            except OSError as exc:
                self.end = f"error:{exc.errno}"
                return
            if not got:
                self.end = "eof"
                return
            self.sha.update(view[:got])
            self.n += got
        self.end = "complete"

    def record(self, number: int, direction: str) -> str:
        return f"{number} {direction} recv {self.n} {self.sha.hexdigest()} {self.end}\n"


def send(sock: socket.socket, data: memoryview) -> tuple[int, str]:
    """Send all of `data`; (bytes handed to the kernel, how it went)."""
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + 256 * KiB])
    except (ConnectionResetError, BrokenPipeError):
        return sent, "reset"
    except TimeoutError:
        return sent, "timeout"
    except OSError as exc:
        return sent, f"error:{exc.errno}"
    return sent, "ok"


def sent_record(number: int, direction: str, data: memoryview, n: int, how: str) -> str:
    return f"{number} {direction} sent {n} {hashlib.sha256(data[:n]).hexdigest()} {how}\n"


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


# --- the two ends ---------------------------------------------------------------------


def client_connection(p: Plan, data: memoryview, port: int, timeout: float) -> list[str]:
    out = data[p.c2b[0] : p.c2b[0] + p.c2b[1]]
    answer = Sink()
    family = "TCP6" if p.ipv6 else "TCP4"
    source = client_address(p.number, p.ipv6)
    destination = ("2001:db8:1::1", port) if p.ipv6 else ("198.51.100.1", port)
    if p.v2:
        header = encode_v2("PROXY", family, source, destination)
    else:
        header = encode_v1(family, source, destination)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(header)
    n, how = 0, "ok"
    if p.kind == "client-closes-first":
        n, how = send(sock, out)
        answer.read(sock, p.b2c[1])
        sock.close()
    elif p.kind == "backend-closes-first":
        n, how = send(sock, out)
        answer.read(sock)
        sock.close()
    elif p.kind == "client-half-closes":
        n, how = send(sock, out)
        sock.shutdown(socket.SHUT_WR)
        answer.read(sock)
        sock.close()
    elif p.kind == "backend-half-closes":
        answer.read(sock)
        n, how = send(sock, out)
        sock.close()
    elif p.kind == "client-resets":
        n, how = send(sock, out)
        if p.read_before_reset:
            answer.read(sock, min(p.read_before_reset, p.b2c[1]))
        reset(sock)
        how = "reset-by-me"
    else:  # backend-resets
        n, how = send(sock, out)
        answer.read(sock)
        sock.close()
    return [sent_record(p.number, "c2b", out, n, how), answer.record(p.number, "b2c")]


def backend_connection(p: Plan, data: memoryview, sock: socket.socket) -> list[str]:
    out = data[p.b2c[0] : p.b2c[0] + p.b2c[1]]
    request = Sink()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n, how = 0, "ok"
    if p.kind == "client-closes-first":
        request.read(sock, p.c2b[1])
        n, how = send(sock, out)
        Sink().read(sock)  # the client's EOF (nothing more comes)
        sock.close()
    elif p.kind == "backend-closes-first":
        request.read(sock, p.c2b[1])
        n, how = send(sock, out)
        sock.close()
    elif p.kind == "client-half-closes":
        request.read(sock)
        n, how = send(sock, out)
        sock.close()
    elif p.kind == "backend-half-closes":
        n, how = send(sock, out)
        sock.shutdown(socket.SHUT_WR)
        request.read(sock)
        sock.close()
    elif p.kind == "client-resets":
        n, how = send(sock, out)  # ends with a reset if the client resets first
        request.read(sock)
        sock.close()
    else:  # backend-resets
        n, how = send(sock, out)
        if p.read_before_reset:
            request.read(sock, min(p.read_before_reset, p.c2b[1]))
        reset(sock)
        how = "reset-by-me"
    return [sent_record(p.number, "b2c", out, n, how), request.record(p.number, "c2b")]


def run_clients(args: argparse.Namespace) -> None:
    data = memoryview(block(args.seed))
    numbers = iter(range(args.first + args.index, args.last, args.processes))
    lock = threading.Lock()
    records: list[str] = []

    def worker() -> None:
        mine: list[str] = []
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                break
            p = plan(args.seed, number)
            try:
                mine += client_connection(p, data, args.port, args.timeout)
            except OSError as exc:  # connect or header failed: nothing was sent
                mine.append(f"{number} c2b failed 0 - {type(exc).__name__}:{exc.errno}\n")
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        f.writelines(records)


def run_backend(args: argparse.Namespace) -> None:
    data = memoryview(block(args.seed))
    listeners = []
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, args.port))
        sock.listen(4096)
        sock.setblocking(False)
        listeners.append(sock)
    records: list[str] = []
    lock = threading.Lock()
    threads: set[threading.Thread] = set()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def serve(conn: socket.socket, number: int) -> None:
        try:
            conn.settimeout(args.timeout)
            lines = backend_connection(plan(args.seed, number), data, conn)
        except OSError as exc:
            lines = [f"{number} b2c failed 0 - {type(exc).__name__}:{exc.errno}\n"]
        finally:
            conn.close()
        with lock:
            records.extend(lines)
            threads.discard(threading.current_thread())

    with selectors.DefaultSelector() as sel:
        for sock in listeners:
            sel.register(sock, selectors.EVENT_READ)
        print("ready", flush=True)
        while not stop.is_set():
            for key, _ in sel.select(0.2):
                try:
                    conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                conn.setblocking(True)
                number = number_of(peer)
                if number is None:
                    conn.close()
                    continue
                t = threading.Thread(target=serve, args=(conn, number))
                with lock:
                    threads.add(t)
                t.start()
    for sock in listeners:
        sock.close()
    with lock:
        left = list(threads)
    for t in left:
        t.join(args.timeout)
    with open(args.out, "w") as f:
        f.writelines(records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("client", "backend"))
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    threading.stack_size(256 * KiB)
    (run_clients if args.role == "client" else run_backend)(args)
    sys.stdout.flush()
    os._exit(0)  # don't wait for anything still lingering


if __name__ == "__main__":
    main()

"""/metrics of a real mmproxy with two worker processes, scraped under load (accepted,
refused, rejected and health-checked connections at once), and its counters against the
records mmproxy logged for the same connections."""

from __future__ import annotations

import functools
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from mmproxy.proxy_protocol import encode_v1, encode_v2
from mmproxy.stats import close_label
from tests.test_metrics import samples

from .conftest import CLIENT4, CLIENT6, Mmproxy, Net, recv_all, start_backend

StartMmproxy = Callable[..., Mmproxy]
METRICS = ("127.0.0.1", 9877)
RELAYED, LOCAL = 120, 4  # each sends "ping" and gets it back; a third with v2 headers
INVALID, UNTRUSTED, REFUSED, PROBES = 8, 6, 5, 3  # under the log's 10 a reason a window
THREADS = 6

RECORD = re.compile(r" via \S+ -> \S+: (.+) after [\d.]+ s, (\d+) bytes in, (\d+) bytes out$")
REJECTED = {  # what a rejection's journal line says -> its CLOSE_REASON
    "invalid PROXY header": "invalid-header",
    "peer is not in allowed_networks": "untrusted-balancer",
    "refused the connection": "target-unavailable",
}


def scrape(net: Net) -> dict[str, int]:
    with net.gw.connect(METRICS, timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        head, body = recv_all(sock).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200"), head
    return samples(body.decode())


def relayed(net: Net, n: int) -> None:
    client = (CLIENT4, 20000 + n)
    kind = n % 3
    if n >= RELAYED:
        header = encode_v2("LOCAL", "UNSPEC")
    elif kind:
        header = encode_v1("TCP4", client, ("198.51.100.1", 2222))
    else:
        header = encode_v2("PROXY", "TCP4", client, ("198.51.100.1", 2222))
    with net.gw.connect(("127.0.0.1", 2222), timeout=10) as sock:
        sock.sendall(header + b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"ping"


def headers_of(n: int) -> tuple[str, str]:
    if n >= RELAYED:
        return "2", "LOCAL"
    return ("1", "PROXY") if n % 3 else ("2", "PROXY")


def rejected(net: Net, n: int) -> None:
    if n < INVALID:
        sock = net.gw.connect(("127.0.0.1", 2222), timeout=10)
        sock.sendall(b"GARBAGE\r\n")
    elif n < INVALID + UNTRUSTED:
        sock = net.gw.connect(("::1", 2222), timeout=10)  # ::1 is not an allowed network
    elif n < INVALID + UNTRUSTED + REFUSED:
        sock = net.gw.connect(("127.0.0.1", 2222), timeout=10)
        client = (CLIENT6, 30000 + n)
        sock.sendall(encode_v1("TCP6", client, ("2001:db8:1::1", 2222)))
    else:
        sock = net.gw.connect(("127.0.0.1", 2222), timeout=10)  # a plain TCP health check
        sock.shutdown(socket.SHUT_WR)
    with sock:
        recv_all(sock)  # until mmproxy closes it


def run_all(jobs: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def worker(mine: list[Callable[[], None]]) -> None:
        try:
            for job in mine:
                job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[i::THREADS],)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def settled(net: Net, accepted: int, timeout: float = 20.0) -> dict[str, int]:
    """The page once every worker has reported every connection (once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        page = scrape(net)
        done = page.get("mmproxy_connections_accepted_total") == accepted
        if (done and page["mmproxy_connections_active"] == 0) or time.monotonic() > deadline:
            return page
        time.sleep(0.2)


def test_metrics_under_load_agree_with_the_journal(lo_net: Net, run_mmproxy: StartMmproxy) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1", handler=_echo)
    proc = run_mmproxy(
        lo_net,
        ipv4=app.address,
        ipv6="[::1]:1",  # nothing listens there: refused
        allowed_networks=["127.0.0.0/8"],
        workers=2,
        metrics_listen=f"{METRICS[0]}:{METRICS[1]}",
        check_failure="warn",  # the self-check of the IPv6 target fails, as it should
    )
    proc.wait_for("2 worker processes accept")
    before = scrape(lo_net)
    assert before["mmproxy_connections_accepted_total"] == 0
    assert before["mmproxy_workers"] == 2

    good = RELAYED + LOCAL
    bad = INVALID + UNTRUSTED + REFUSED + PROBES
    jobs: list[Callable[[], None]] = [functools.partial(relayed, lo_net, n) for n in range(good)]
    jobs += [functools.partial(rejected, lo_net, n) for n in range(bad)]
    scrapes: list[dict[str, int]] = []
    stop = threading.Event()

    def scraper() -> None:  # scrapes while the load runs: each answer a whole page
        while not stop.is_set():
            scrapes.append(scrape(lo_net))

    watcher = threading.Thread(target=scraper)
    watcher.start()
    try:
        run_all(jobs)
    finally:
        stop.set()
        watcher.join()
    assert scrapes
    seen = [s["mmproxy_connections_accepted_total"] for s in scrapes]
    assert seen == sorted(seen)  # counters never go back

    page = settled(lo_net, good + bad)
    assert page["mmproxy_connections_accepted_total"] == good + bad
    assert page["mmproxy_connections_active"] == 0

    # The journal's records of the same connections (written by each worker's log thread).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = [m for line in list(proc.lines) if (m := RECORD.search(line))]
        if len(records) >= good:
            break
        time.sleep(0.1)
    assert len(records) == good, "\n".join(proc.lines)
    closed = Counter(close_label(m[1]) for m in records)
    assert closed == {
        k.split('"')[1]: v
        for k, v in page.items()
        if k.startswith("mmproxy_connections_closed_total{")
    }
    assert page['mmproxy_tcp_bytes_total{direction="in"}'] == sum(int(m[2]) for m in records)
    assert page['mmproxy_tcp_bytes_total{direction="out"}'] == sum(int(m[3]) for m in records)
    assert sum(int(m[2]) for m in records) == 4 * good

    journal: Counter[str] = Counter()
    for line in proc.lines:
        if line.startswith("WARNING rejected "):
            journal.update(r for text, r in REJECTED.items() if text in line)
        elif "health check from" in line:
            journal["probe"] += 1
    assert journal == {
        k.split('"')[1]: v
        for k, v in page.items()
        if k.startswith("mmproxy_connections_rejected_total{")
    }
    assert journal == {
        "invalid-header": INVALID,
        "untrusted-balancer": UNTRUSTED,
        "target-unavailable": REFUSED,
        "probe": PROBES,
    }
    assert page['mmproxy_target_connect_errors_total{errno="ECONNREFUSED"}'] == REFUSED

    headers = Counter(headers_of(n) for n in range(good))
    headers["1", "PROXY"] += REFUSED  # their header was read; the target refused them
    for (version, command), count in headers.items():
        key = f'mmproxy_proxy_headers_total{{version="{version}",command="{command}"}}'
        assert page[key] == count, key
    print(_excerpt(lo_net))


def _echo(conn: socket.socket, seen: object) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _excerpt(net: Net) -> str:
    """The page as the report quotes it."""
    with net.gw.connect(METRICS, timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return recv_all(sock).split(b"\r\n\r\n", 1)[1].decode()

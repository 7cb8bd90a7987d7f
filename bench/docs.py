"""docs/performance.md and bench/results/results.md, written from a run's results."""

from __future__ import annotations

from typing import Any

from bench.coldstart import table as coldstart_table
from bench.report import floors_table, tables
from bench.udp import table as udp_table

Results = dict[str, Any]

HOW = """\
`make bench` reproduces this page on a Debian 12 machine, as root: it installs its own tools
(Debian's `haproxy`, `go-mmproxy`, `python3-matplotlib`, `gcc`), builds two network
namespaces, runs every workload against every target, and rewrites this file together
with `bench/results/` (`results.md`, `chart.png`, the raw `results.json`).
`make bench-quick` runs everything at a reduced size (two rounds, in about five minutes) and
writes to `bench/results/quick/` only. Wall-clock figures are reported here, never asserted
in tests."""

METHOD = """\
## How it is measured

- **Sizes** of `make bench`: 5 interleaved rounds; bulk 2 GiB each way; the rate test
  6 s for each of its four variants (PROXY v1 and v2, over IPv4 and over IPv6), 32
  clients; 9,000 idle connections, then as many as the fd limit allows; UDP 5 s per
  payload size (64 and 1,400 bytes) and framing. About 25 to 30 minutes on this 2-core
  machine (the line "Latest run" above says how long the page's run took).
  `make bench-quick`: 2 rounds, 512 MiB, 2 s per rate variant, 2 s per UDP phase.
- **Network.** A client namespace (the load generator, standing in for the balancer:
  198.51.100.7 plus 32 more source addresses, and 2001:db8:100::7 plus 32 more) and a
  gateway namespace (198.51.100.1 and 2001:db8:100::1, the gateway and the application)
  joined by a veth pair. The gateway namespace has mmproxy's loopback routing for both
  families (`ip rule add from 127.0.0.1/8 iif lo table 100`,
  `ip route add local 0.0.0.0/0 dev lo table 100`, `ip -6 rule add from ::1/128 iif lo
  table 100`, `ip -6 route add local ::/0 dev lo table 100`), which all three gateways use.
- **Targets**, each started fresh for every run, interleaved (A B C D E A B C D E …):
  - *direct*: the client connects straight to the application, no header — the limit of
    this machine for connections (for one bulk stream, see below);
  - *mmproxy*: `python -m mmproxy -l 198.51.100.1:8001 -4 127.0.0.1:9000 -a FILE --mark 123 -q`
    (over IPv6: `-l [2001:db8:100::1]:8001 -6 [::1]:9000`),
    unpinned, as the CLI runs it (`-q`: no per-connection log line; the peers log none;
    `workers: auto`, its default: one worker process per CPU, two here);
  - *mmproxy (taskset -c 1)*: the same, under `taskset -c 1` (one CPU, so one process);
  - *go-mmproxy*: Debian's package, `-l … -4 127.0.0.1:9000 -allowed-subnets FILE -mark 123 -v 0`
    (over IPv6: `-6 [::1]:9000`);
  - *HAProxy*: Debian's 2.6, `bind … accept-proxy`, `server app 127.0.0.1:9000 source 0.0.0.0
    usesrc clientip`, `option splice-request`, `option splice-response`, `maxconn` above the
    concurrency test's count, `maxpipes 256` (to stay under the 20,000-fd limit); over IPv6
    `bind [2001:db8:100::1]:8004` and `server app [::1]:9000 source [::] usesrc clientip`.
  The allowed-networks file has 198.51.100.0/24 and 2001:db8:100::/64.
- **Load generator and application** are small C programs in `bench/c/` (epoll,
  `sendfile` from a memfd to send, `recv(MSG_TRUNC)` to discard), so that neither is the
  bottleneck: the *direct* rows show how far above every gateway they go. Every
  connection claims a client address — with a header, a fake one from 203.0.113.0/24 or
  192.0.2.0/24 (over IPv6: from 2001:db8:f00::/64, in a `TCP6` v1 line or an AF_INET6 v2
  block), never the same 4-tuple twice in a run; direct, its own — and the application
  (listening on 0.0.0.0:9000 and [::]:9000) answers OK only if it accepted the connection
  from that address ("verified"). Its PROXY headers, v1 and v2, IPv4 and IPv6, are checked
  byte for byte against mmproxy's encoder before every run.
- **1. Bulk**: one connection, the given size each way, upload and download separately.
- **2. Rate**: closed loop; each client connects, sends the PROXY header and a 64-byte
  request in one write, reads the 64-byte reply, closes, and starts again. Latency is from
  `connect()` to the last reply byte. Four variants one after the other, each with a fresh
  application and gateway: PROXY v1 and v2, with the whole path over IPv4 (balancer to
  gateway, fake IPv4 client, gateway to 127.0.0.1) and over IPv6 (to [2001:db8:100::1],
  fake IPv6 client, to [::1]). Direct has no header: one run per family.
- **3. Concurrency**: the idle connections are opened (at most 200 hand-shakes at a time)
  and held; the gateway's RSS, threads and open fds (of all its processes, added up) are
  read from /proc while all are held, then every connection is pinged through the
  gateway and must echo. Per-connection figures are the growth since start-up divided by
  the connections held. The load generator and the application are separate processes,
  because each holds one socket per connection and the gateway holds two, under a limit
  of 20,000 fds per process.
- **3b. At the fd limit**: the harness first raises its open-file limit (which every
  process it starts inherits) as far as the machine lets it: the hard limit to
  `fs.nr_open` when it may (CAP_SYS_RESOURCE), else the soft limit to the hard one; the
  limits in force are in the JSON (`machine.fd_limits`). The count is then the most every
  process can hold, less 256 fds each for listeners, epoll, pipes and logs, rounded down
  to a hundred, and 60,000 at most (the application's table has 65,536 slots; `fs.nr_open`
  is often a million): the application and the load generator hold one fd per connection in one
  process each; mmproxy two per connection, in each of its workers (one per CPU; one
  under `taskset -c 1`), which share the connections (its `max_connections` is raised to
  the count: its default, 10,000, would stop it first). All are held, measured as in 3,
  then each pinged. go-mmproxy and HAProxy are one process each with the same per-process
  limit (HAProxy two fds per connection, go-mmproxy about five), so they are n/a here.
- **4. Efficiency**: the gateway's own utime+stime from `/proc/PID/stat` (all its
  threads, and its child processes: mmproxy's workers), read just before and after each
  workload: CPU-s per GiB moved (both ways together) and per 1,000 connections of the
  rate test. This is the figure least distorted by the shared 2-core machine and by the
  load generator, which runs on the same cores.
- **UDP** (table 4): `bench/c/udpgen.c` plays the balancer, in several processes: every
  flow is its own UDP socket claiming its own fake client in the PROXY v2 (`UDP4`) header
  of every datagram (framing *v2*; for mmproxy also *v2first*: the header alone once per
  flow, then datagrams without one, as Cloudflare Spectrum sends them, and *spp*: a
  38-byte SPP header on every datagram, which must come back on every reply, against
  `udp_header: spp`), with at most *window* datagrams outstanding (a reply, or its loss
  after 200 ms, frees a place). The default, 2 for each of 32 flows (64 in all), fits in
  the default 208 KiB receive buffer of the gateway's one listening socket even at 1,400
  bytes (3 per flow already overflowed it now and then), so loss measures the gateway and
  not a full buffer. `bench/c/udpecho.c` (recvmmsg/sendmmsg) sends every payload back
  with a verdict: did it come from the claimed client address and port? The sources it
  saw must be exactly the fake clients ("verified").
  Gateways: `python -m mmproxy -l udp://198.51.100.1:8001 -4 127.0.0.1:9000 …`, and
  `go-mmproxy -p udp … -close-after 60`; HAProxy has no UDP PROXY-protocol gateway (n/a).
  The echo listens on 127.0.0.1:9000, not 0.0.0.0: a reply from an unbound address would
  not match the `from 127.0.0.1/8 iif lo` rule. Packets/s are request+reply pairs sent and
  answered within the time (each pair is two datagrams through the gateway), Mbit/s the
  payload each way, latency from sending to the reply, and CPU-s per 1M packets the
  gateway's own CPU per million pairs, which includes the kernel's work its system calls
  do (delivering a datagram over `lo` or the veth is done in the sender's system call).
- **5. Cold start** (`bench/coldstart.py`, mmproxy only): a Debian 12 container booted with
  `systemd-nspawn` (systemd as PID 1; its root made once by `debootstrap --variant=minbase`
  with systemd, iproute2, nftables, iptables, python3, python3-yaml, python3-systemd,
  python3-sdnotify, openssh-server and haproxy, and cached outside the checkout), on a
  veth to a client namespace. `make deb` builds this tree's package on the host (Debian
  12), and apt installs it into a fresh copy of that root before the boot. Inside:
  HAProxy 2.6 (`bind 192.0.2.10:2200`, `server local 127.0.0.1:2222 send-proxy-v2`, no
  health check), sshd, and `/etc/mmproxy/ssh.yaml` (`listen: 127.0.0.1:2222`, targets
  127.0.0.1:22 and [::1]:22, `allowed_networks: [127.0.0.1/32]`) with
  `systemctl enable --now mmproxy@ssh.socket`. The client times `connect()` to HAProxy
  to the first bytes of sshd's banner (`SSH-2.0-`). *Cold*: `mmproxy@ssh.service` is
  stopped before each sample, its socket listening (what the first connection after a
  boot meets; the page cache is warm). *Warm*: the service running. 10 of each per
  round, all rounds pooled for the median and the maximum; the container is built once
  per run.
- Nothing is pinned except the *taskset* variant; the CPU affinity each gateway ran with is
  in the concurrency table and in the JSON.

## Reading the figures

- *Direct* is the limit for connections, not for one bulk stream: over a veth pair the
  sender's CPU also does the receiver's protocol work, while a gateway splits one stream's
  work over both CPUs (client → gateway on one, gateway → application on the other), so a
  gateway can move one stream faster than the two ends alone.
- In the rate test every gateway is saturated (32 clients in a closed loop): conn/s and
  latency measure how much work a connection costs it, and so does CPU per 1,000
  connections, which is the steadier figure of the two.
- The machine is shared (2 cores): the line under "Latest run" says how much CPU other
  processes used during the run (an upper bound); with more than a few tenths, repeat it.
- All figures are medians; every run is in `bench/results/results.json` with the load
  generator's and the application's own counters. `python -m bench --from-json FILE
  --docs docs/performance.md` rewrites the tables, chart and this page from such a file.

## Where a connection's cost goes

A short connection (the rate test) costs every gateway about the same kernel time: the
system calls are the same kind and number (accept4, recv, socket, setsockopt, bind,
connect, send, epoll_ctl, four splice, shutdown, two close; about 23 for mmproxy, 27 for
HAProxy), and over loopback the application's side of each packet is processed in the
sender's system call. What differs is the user time around them. In pure Python it was
about 20 µs per connection against HAProxy's 7.5 µs (2026-12-01, `perf` and
`/proc/PID/stat`, the rate test), which left mmproxy at 1.38 x HAProxy's CPU per
connection. `mmproxy/_splice.c` then took the per-event relay work (which direction, how
much, half-closes, errors: without the GIL and without a Python call per event), the
accept and the upstream socket, which brought the user time to about 12 to 13 µs
(1.18 x HAProxy's CPU per connection in the full run of 2026-12-01).

Issue 15 took the rest of the hand-shake out of the interpreter for the usual client,
without moving a decision into C (2026-12-04, the same rate load, mmproxy beside
HAProxy in one run, user time per connection under a loaded machine: 22 to 25 µs before,
12 to 13.5 µs after, HAProxy 10.5 to 12.5 µs):

- a C pre-parser (`_splice.parse_header`) reads the usual headers (v1 TCP4/TCP6, v2
  TCP4/TCP6 without TLVs, v2 LOCAL) and answers None for anything else, which the codec
  then decides and words; it is tested against every codec vector and every prefix of
  each, and fuzzed against the codec (`make fuzz`, `make sanitize`). The Python parse
  of a v1 line cost 2.4 µs;
- the policy's answers are remembered per claimed host (`policy.Claims`): a host it let
  through, with its target, until the config changes or this host's addresses are read
  again (every 2 s); refusals are never remembered, so each is checked and worded anew;
- `_splice.handshake` accepts a batch and, for a client whose balancer Python already
  let through, whose header the pre-parser takes with bytes after it, and whose claim
  the policy already let through, does the whole hand-shake in C: the transparent
  socket, the connect, the early bytes, the hand-over to the relay. Every other client,
  and every failure, goes back to Python at the step where it stopped (unread if its
  balancer is new), so the checks, the messages and the records stay the codec's and
  the policy's.

What stays per connection in Python is one record when it ends (the counters, and the
journal line when `log_connections: all`).

## Cold start

The first connection to an instance that is not running waits for systemd to notice it
and start the service, for the service's sandbox, for Python and mmproxy's imports, for
the self-checks and for the workers; then it is relayed like any other. Where the time
went on this machine (2026-12-04, Debian 12 container, load average about 1, traced
with time stamps in the daemon and systemd's unit time stamps), about 190 ms in all:

| step | ms |
|---|---|
| connection in the socket's queue → systemd forks the service (socket activation) | 15-25 |
| the unit's sandbox (its mount namespace, DynamicUser=, seccomp filters) and exec | 35-45 |
| the Python interpreter's own start | 12 |
| imports: configuration (PyYAML, dataclasses), logging, argparse, the relay, the journal | 75-100 |
| configuration, self-checks (capabilities, a spoofed connection to each target) | 5-10 |
| two workers forked, their relay loops started | 17-24 |
| HAProxy → mmproxy → sshd (which forks and re-executes itself) → banner | 15-20 |

Before issue 15 it was about 370 ms here (280-330 ms on a quieter day): a second Python
process ran first, `mmproxy routing up` in the service's `ExecStartPre=`, which imported
the same configuration code and ran `ip` a dozen times to apply and check the routing.
Now the routing is applied, and the host checks run, as root when the *socket* starts
(its `ExecStartPre=`, at boot): a wrong host fails the socket's start with the fix, and
`systemctl status mmproxy@NAME.socket` shows it. The service's start runs the daemon
alone, which still runs its own self-checks before it serves. The daemon also starts
cheaper: `python3 -IS` (no site module), the garbage collector off during the imports,
no import of what only some starts need (the metrics HTTP server, the UDP forwarder,
multiprocessing, the `systemd.daemon` module, difflib, subprocess). The self-checks'
connections to the targets no longer reach the application: each is reset before it can
be accepted (the hand-shake's last ACK held back), where sshd used to fork and re-execute
itself for two of them at every start, on the same two CPUs as the first client. The
sandbox and the interpreter are the floor of a hardened Python service here: about 60 ms
before the first line of mmproxy runs.

## Profiling mmproxy under the same load

The pinned variant is one process (`workers: auto` follows the CPU affinity), which
py-spy and perf can follow whole; unpinned, profile one worker (`pgrep -P PARENT`).

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench --workloads rate --targets mmproxy-pinned --rounds 1 \\
        --rate-seconds 30 --out /tmp/profile-run &
    sleep 5; PID=$(pgrep -f 'mmproxy -l 198.51.100.1:8002')
    .venv/bin/py-spy record --nonblocking --threads -d 10 -p $PID -o /tmp/mmproxy.svg
    perf stat -e context-switches,cpu-migrations,task-clock -p $PID -- sleep 5

For UDP: `--workloads udp --udp-seconds 30 --udp-sizes 64`, and
`PID=$(pgrep -f 'mmproxy -l udp://198.51.100.1:8001')`; `strace -c -f -p $PID` counts
its system calls per datagram.
"""


FLOORS_NOTE = (
    "ratio = mmproxy / the better of go-mmproxy and HAProxy, or / go-mmproxy for UDP, same run"
)
FLOORS_TEXT = """\
Ratio = mmproxy's figure / the better of go-mmproxy's and HAProxy's in the same run (for
TCP HAProxy's, as a rule), for every rate variant (PROXY v1 and v2, IPv4 and IPv6) and for
bulk; for UDP, / go-mmproxy's with PROXY v2 in every datagram (all go-mmproxy does; HAProxy
has no UDP gateway), for each of mmproxy's framings and payload sizes. The idle rows, UDP
loss and cold start are absolute. The floors apply to mmproxy as the CLI runs it; the
pinned variant is shown for comparison (the cold start is measured for the packaged
service only: n/a in its columns)."""


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date']}: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"kernel {m['kernel']}, fd limit {m['fd_limit']:,}; Python {m['python']}, "
        f"mmproxy {m['mmproxy']} ({m['mmproxy_revision']}), HAProxy {m['haproxy']}, "
        f"go-mmproxy {m['go-mmproxy']}. Load average before the run "
        f"{m.get('load_average_before', '?')}, after {m.get('load_average_after', '?')}; "
        f"other processes used {m.get('foreign_cpus', '?')} CPUs on average during it"
    )


def _took(results: Results) -> str:
    elapsed = results.get("elapsed_s")
    return f"; the run took {elapsed / 60:.0f} minutes" if elapsed else ""


def _all_tables(results: Results) -> list[str]:
    """TCP's three tables, and UDP's and the cold start's when they ran."""
    udp = udp_table(results["summary"], results["order"], results["settings"])
    cold = coldstart_table(results)
    return [
        tables(results["summary"], results["order"], results["settings"]),
        *([udp] if udp else []),
        *([cold] if cold else []),
    ]


def results_markdown(results: Results) -> str:
    """bench/results/results.md: the tables and floors alone."""
    return "\n\n".join([
        "# mmproxy benchmark: latest run",
        f"Taken {machine_line(results['machine'])}. Medians of {results['rounds']} "
        "interleaved rounds.",
        *_all_tables(results),
        f"**Floors of issue 15** ({FLOORS_NOTE})",
        floors_table(results["floors"]),
        "![chart](chart.png)",
    ]) + "\n"  # fmt: skip


def performance_page(results: Results) -> str:
    """docs/performance.md."""
    return "\n\n".join([
        "# Performance",
        HOW,
        f"**Latest run**: {machine_line(results['machine'])}. "
        f"Medians of {results['rounds']} interleaved rounds{_took(results)}.",
        "## Results",
        *_all_tables(results),
        "![mmproxy beside go-mmproxy and HAProxy](../bench/results/chart.png)",
        "## The floors of issue 15",
        FLOORS_TEXT,
        floors_table(results["floors"]),
        METHOD,
    ]) + "\n"  # fmt: skip

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
`make bench-quick` runs everything at a reduced size (two rounds, in about a minute) and
writes to `bench/results/quick/` only. Wall-clock figures are reported here, never asserted
in tests."""

METHOD = """\
## How it is measured

- **Network.** A client namespace (the load generator, standing in for the balancer:
  198.51.100.7 plus 32 more source addresses) and a gateway namespace (198.51.100.1, the
  gateway and the application) joined by a veth pair. The gateway namespace has mmproxy's
  loopback routing (`ip rule add from 127.0.0.1/8 iif lo table 100`,
  `ip route add local 0.0.0.0/0 dev lo table 100`), which all three gateways use.
- **Targets**, each started fresh for every run, interleaved (A B C D E A B C D E …):
  - *direct*: the client connects straight to the application, no header — the limit of
    this machine for connections (for one bulk stream, see below);
  - *mmproxy*: `python -m mmproxy -l 198.51.100.1:8001 -4 127.0.0.1:9000 -a FILE --mark 123 -q`,
    unpinned, as the CLI runs it (`-q`: no per-connection log line; the peers log none;
    `workers: auto`, its default: one worker process per CPU, two here);
  - *mmproxy (taskset -c 1)*: the same, under `taskset -c 1` (one CPU, so one process);
  - *go-mmproxy*: Debian's package, `-l … -4 127.0.0.1:9000 -allowed-subnets FILE -mark 123 -v 0`;
  - *HAProxy*: Debian's 2.6, `bind … accept-proxy`, `server app 127.0.0.1:9000 source 0.0.0.0
    usesrc clientip`, `option splice-request`, `option splice-response`, `maxconn` above the
    concurrency test's count, `maxpipes 256` (to stay under the 20,000-fd limit).
- **Load generator and application** are small C programs in `bench/c/` (epoll,
  `sendfile` from a memfd to send, `recv(MSG_TRUNC)` to discard), so that neither is the
  bottleneck: the *direct* rows show how far above every gateway they go. Every
  connection claims a client address — with a header, a fake one from 203.0.113.0/24 or
  192.0.2.0/24, never the same 4-tuple twice in a run; direct, its own — and the
  application answers OK only if it accepted the connection from that address
  ("verified"). Its PROXY headers are checked byte for byte against mmproxy's encoder.
- **1. Bulk**: one connection, the given size each way, upload and download separately.
- **2. Rate**: closed loop; each client connects, sends the PROXY v1 header and a 64-byte
  request in one write, reads the 64-byte reply, closes, and starts again. Latency is from
  `connect()` to the last reply byte.
- **3. Concurrency**: the idle connections are opened (at most 200 hand-shakes at a time)
  and held; the gateway's RSS, threads and open fds (of all its processes, added up) are
  read from /proc while all are held, then every connection is pinged through the
  gateway and must echo. Per-connection figures are the growth since start-up divided by
  the connections held. The load generator and the application are separate processes,
  because each holds one socket per connection and the gateway holds two, under a limit
  of 20,000 fds per process.
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
connection. `mmproxy/_splice.c` now does the per-event relay work (which direction, how
much, half-closes, errors: without the GIL and without a Python call per event), the
accept (one accept4() with the flags, no socket object) and the upstream socket (one
call for socket, transparent bind, options and connect); the PROXY header, the policy
(who may claim what) and the records stay in Python. That brought the user time to
about 12 to 13 µs per connection. The relay is still mmproxy's design: one epoll loop per
worker, a pool of 1 MiB pipes taken only while bytes wait, edge-triggered events.

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
| configuration, self-checks (capabilities, one spoofed connection per target) | 5-10 |
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
multiprocessing, the `systemd.daemon` module, difflib, subprocess), and one connection
per target in the self-checks instead of two. The sandbox and the interpreter are the floor of a
hardened Python service here: about 60 ms before the first line of mmproxy runs.

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


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date']}: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"kernel {m['kernel']}, fd limit {m['fd_limit']:,}; Python {m['python']}, "
        f"mmproxy {m['mmproxy']} ({m['mmproxy_revision']}), HAProxy {m['haproxy']}, "
        f"go-mmproxy {m['go-mmproxy']}. Load average before the run "
        f"{m.get('load_average_before', '?')}, after {m.get('load_average_after', '?')}; "
        f"other processes used {m.get('foreign_cpus', '?')} CPUs on average during it"
    )


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
        "**Floors of issue 6** (ratio = mmproxy / best of go-mmproxy and HAProxy, same run)",
        floors_table(results["floors"]),
        "![chart](chart.png)",
    ]) + "\n"  # fmt: skip


def performance_page(results: Results) -> str:
    """docs/performance.md."""
    return "\n\n".join([
        "# Performance",
        HOW,
        f"**Latest run**: {machine_line(results['machine'])}. "
        f"Medians of {results['rounds']} interleaved rounds.",
        "## Results",
        *_all_tables(results),
        "![mmproxy beside go-mmproxy and HAProxy](../bench/results/chart.png)",
        "## The floors of issue 6",
        "Ratio = mmproxy's figure / the better of go-mmproxy's and HAProxy's in the same run. "
        "The issue's floors apply to mmproxy as the CLI runs it; the pinned variant is shown "
        "for comparison.",
        floors_table(results["floors"]),
        METHOD,
    ]) + "\n"  # fmt: skip

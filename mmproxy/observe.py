"""What operators see of a running instance, without being able to change it: the
Prometheus page at http://metrics_listen/metrics and the status socket that
`mmproxy status NAME` reads (JSON). Both are served from threads of the runner (or of
the supervisor), from the counters it already holds: a request never reaches the relay
loops except to list the open connections, which the loops answer between events.

The status socket is RUNTIME/NAME/status.sock (RUNTIME: $MMPROXY_RUNTIME_DIR, else
/run/mmproxy), mode 0600, or 0660 with `status_group:`; its server reads nothing from
the client: it writes one JSON document and closes.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import json
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmproxy import __version__, metrics
from mmproxy.config import Config
from mmproxy.routing import runtime_base
from mmproxy.stats import Details, Snapshot

log = logging.getLogger("mmproxy")

REQUEST_TIMEOUT = 5.0  # a client that does not read its answer is dropped after this


class ObserveError(Exception):
    """The status socket or the metrics listener could not be opened, or read."""


@dataclasses.dataclass
class Source:
    """Where the answers come from: the runner's (or supervisor's) callbacks."""

    snapshot: Callable[[], Snapshot]  # the instance's counters, summed over the workers
    state: Callable[[], metrics.State]
    details: Callable[[], Details]  # may wait a moment for the workers


def status_path(name: str) -> Path:
    return runtime_base() / name / "status.sock"


# --- the server side ----------------------------------------------------------------------


class Observer:
    """The metrics listener and the status socket of one instance, each on its thread."""

    def __init__(self, config: Config, name: str | None, source: Source) -> None:
        self.config = config
        self.name = name
        self.source = source
        self.started = time.time()
        self._servers: list[socketserver.BaseServer] = []
        self._path: Path | None = None

    def start(self) -> None:
        """Open what the configuration asks for. A status socket that cannot be made is
        a warning (the service runs on); a metrics address that cannot be bound, an
        ObserveError (it was asked for by name)."""
        if self.name is not None:
            try:
                self._serve(self._status_server(status_path(self.name)))
            except OSError as exc:
                log.warning("no status socket for `mmproxy status`: %s", exc)
        if self.config.metrics_listen is not None:
            try:
                from mmproxy.metrics_http import MetricsServer

                server = MetricsServer(self.config.metrics_listen.sockaddr, self.metrics_page)
            except OSError as exc:
                where = self.config.metrics_listen
                raise ObserveError(f"metrics_listen {where}: {exc.strerror or exc}") from exc
            self._serve(server)
            log.info("metrics at http://%s/metrics", self.config.metrics_listen.endpoint)

    def _serve(self, server: socketserver.BaseServer) -> None:
        self._servers.append(server)
        name = f"observe-{len(self._servers)}"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()

    def _status_server(self, path: Path) -> socketserver.BaseServer:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _take_over(path)
        old = os.umask(0o177)  # created 0600: never readable by others, even a moment
        try:
            server = _StatusServer(str(path), self)
        finally:
            os.umask(old)
        self._path = path
        group = self.config.status_group
        if group is not None:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
                os.chmod(path, 0o660)  # connect() needs write permission
            except (KeyError, OSError) as exc:
                log.warning("status_group %s not applied to %s: %s", group, path, exc)
        log.debug("status socket %s", path)
        return server

    def close_copies(self) -> None:
        """In a forked worker: close the inherited listening sockets (not the threads',
        which stayed behind in the parent) so that they end with the supervisor."""
        for server in self._servers:
            server.socket.close()  # type: ignore[attr-defined]
        self._servers = []
        self._path = None

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if self._path is not None:
            try:
                self._path.unlink()
                self._path.parent.rmdir()  # if empty, and ours to remove (not systemd's)
            except OSError:
                pass

    def metrics_page(self) -> bytes:
        return metrics.render(self.source.snapshot(), self.source.state()).encode()

    def status_document(self) -> dict[str, Any]:
        state = self.source.state()
        details = self.source.details()
        now = time.monotonic()
        return {
            "instance": self.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "draining": state.draining,
            "workers": state.workers,
            "counters": counters(self.source.snapshot()),
            "connections": [
                {**_plain(c, "started"), "age": round(now - c.started, 1)}
                for c in details.connections
            ],
            "more_connections": details.more,
            "rejections": [dataclasses.asdict(r) for r in details.rejections],
        }


def counters(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot as JSON: header counts keyed "v1 PROXY" and so on."""
    found: dict[str, Any] = {}
    if snapshot.tcp is not None:
        tcp = dataclasses.asdict(snapshot.tcp)
        tcp["headers"] = {f"v{v} {c}": n for (v, c), n in sorted(snapshot.tcp.headers.items())}
        found["tcp"] = tcp
    if snapshot.udp is not None:
        found["udp"] = dataclasses.asdict(snapshot.udp)
    return found


def _plain(value: object, *leave: str) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(value).items() if k not in leave}  # type: ignore[call-overload]


def _take_over(path: Path) -> None:
    """Remove a socket left by an instance that died; refuse one that still answers."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except FileNotFoundError:
        return
    except OSError:
        path.unlink(missing_ok=True)  # refused: nobody listens there any more
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} answers: instance running already")


class _StatusServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, observer: Observer) -> None:
        self.observer = observer
        super().__init__(path, _StatusHandler)


class _StatusHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _StatusServer)
        self.request.settimeout(REQUEST_TIMEOUT)
        try:
            document = server.observer.status_document()
            self.request.sendall(json.dumps(document).encode() + b"\n")
            self.request.shutdown(socket.SHUT_WR)
            # What the client sent is read and dropped (a close with unread bytes would
            # reset the answer away); ours closes once it has read the answer.
            while self.request.recv(4096):
                pass
        except OSError:
            pass  # the reader went away
        except Exception:  # a bug must cost this answer, not the thread
            log.exception("answering the status socket")


# --- the client side: `mmproxy status NAME` -----------------------------------------------


def read_status(name: str) -> dict[str, Any]:
    path = status_path(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REQUEST_TIMEOUT * 2)
    try:
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ObserveError(f"instance {name} is not running (no answer at {path})") from exc
    except PermissionError as exc:
        raise ObserveError(
            f"cannot read {path}: root only (or the group in status_group:)"
        ) from exc
    except OSError as exc:
        raise ObserveError(f"{path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        found = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ObserveError(f"{path}: not a status answer: {exc}") from exc
    assert isinstance(found, dict)
    return found


def format_status(doc: dict[str, Any]) -> str:
    """The status document for a person."""
    lines = [
        f"mmproxy {doc['version']} instance {doc['instance']}: pid {doc['pid']}, "
        f"up {_duration(doc['uptime'])}, {doc['workers']} worker(s)"
        + (", DRAINING" if doc["draining"] else ""),
    ]
    tcp = doc["counters"].get("tcp")
    if tcp is not None:
        lines.append(
            f"tcp: {tcp['active']} active, {tcp['accepted']} accepted, "
            f"{tcp['bytes_in']} bytes in, {tcp['bytes_out']} bytes out (of closed connections)"
        )
        for title, key in (
            ("headers", "headers"),
            ("closed", "closed"),
            ("rejected", "rejected"),
            ("connect errors", "connect_errors"),
        ):
            if tcp[key]:
                lines.append(
                    f"  {title}: " + ", ".join(f"{k} {v}" for k, v in sorted(tcp[key].items()))
                )
    udp = doc["counters"].get("udp")
    if udp is not None:
        lines.append(
            f"udp ({udp['framing']}): {udp['flows']} flows, {udp['total']} opened, "
            f"{udp['packets_in']} datagrams ({udp['bytes_in']} bytes) in, "
            f"{udp['packets_out']} ({udp['bytes_out']} bytes) out"
        )
        if udp["dropped"]:
            lines.append(
                "  dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(udp["dropped"].items()))
            )
    conns = doc["connections"]
    lines.append("")
    lines.append(
        f"open connections: {len(conns) + doc['more_connections']}"
        + (f" (the {len(conns)} oldest listed)" if doc["more_connections"] else "")
    )
    if conns:
        rows = [("CLIENT", "BALANCER", "TARGET", "IN", "OUT", "AGE")]
        rows += [
            (
                c["client"],
                c["balancer"],
                c["target"],
                str(c["bytes_in"]),
                str(c["bytes_out"]),
                _duration(c["age"]),
            )
            for c in conns
        ]
        lines += _table(rows)
    rejections = doc["rejections"]
    lines.append("")
    lines.append(f"last rejections: {len(rejections) or 'none'}")
    for r in rejections:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        who = f"client {r['client']} via {r['balancer']}" if r["client"] else r["balancer"]
        lines.append(f"  {when} {who}: {r['reason']}: {r['detail']}")
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def main(name: str, as_json: bool) -> int:
    """`mmproxy status NAME`: 0 when the instance answered."""
    try:
        doc = read_status(name)
    except ObserveError as exc:
        print(f"mmproxy status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if as_json else format_status(doc))
    return 0

"""The Prometheus page's HTTP server (`metrics_listen:`). Its own module, imported only
when that key is set: http.server brings ssl, email and html, about 30 ms of every
start-up otherwise (issue 15, the cold start)."""

from __future__ import annotations

import http.server
import socket
from collections.abc import Callable
from typing import Any

from mmproxy import __version__, metrics


class MetricsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], page: Callable[[], bytes]) -> None:
        self.page = page
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _MetricsHandler)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    timeout = 5.0  # a client that does not read its answer is dropped after this
    server_version = f"mmproxy/{__version__}"

    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, MetricsServer)
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is here")
            return
        body = server.page()
        self.send_response(200)
        self.send_header("Content-Type", metrics.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news for the journal

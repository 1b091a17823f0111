"""A discarding OTLP/HTTP collector for benchmarks with ``[tracing]`` on: it reads each export, counts it, answers
200 and keeps nothing. The appliance's exporter then does all its real work (batching, protobuf encoding, an HTTP
POST per batch) without an endpoint that refuses connections (which would make it log and retry instead)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


class _Sink(http.server.ThreadingHTTPServer):
    daemon_threads = True
    exports = 0
    received_bytes = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests session expects

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        server = self.server
        assert isinstance(server, _Sink)
        server.exports += 1
        server.received_bytes += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


@contextlib.contextmanager
def otlp_sink() -> Iterator[tuple[str, _Sink]]:
    """A sink on a free loopback port until the block ends; yields its traces URL and the server (its counts)."""
    server = _Sink(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", server
    finally:
        server.shutdown()
        server.server_close()

"""A discarding OTLP/HTTP collector for benchmarks with ``[tracing]`` on: it reads each export, counts it, answers
200 and keeps nothing. The appliance's exporter then does all its real work (batching, protobuf encoding, an HTTP
POST per batch) without an endpoint that refuses connections (which would make it log and retry instead). It runs
in a process of its own at the lowest CPU priority: it stands in for a collector on another machine, so that what
it spends receiving is not charged to the appliance on a small box."""

from __future__ import annotations

import contextlib
import http.server
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any


class _Sink(http.server.ThreadingHTTPServer):
    daemon_threads = True
    counts: tuple[Any, Any]  # shared exports and bytes received


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests session expects

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        server = self.server
        assert isinstance(server, _Sink)
        exports, received_bytes = server.counts
        with exports.get_lock():
            exports.value += 1
        with received_bytes.get_lock():
            received_bytes.value += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


class Counts:
    """What the sink received, readable while it runs and after it stopped."""

    def __init__(self, exports: Any, received_bytes: Any) -> None:
        self._exports, self._bytes = exports, received_bytes

    @property
    def exports(self) -> int:
        return self._exports.value

    @property
    def received_bytes(self) -> int:
        return self._bytes.value


def _serve(port: Any, exports: Any, received_bytes: Any) -> None:
    os.nice(19)
    server = _Sink(("127.0.0.1", 0), _Handler)
    server.counts = (exports, received_bytes)
    port.value = server.server_address[1]
    server.serve_forever()


@contextlib.contextmanager
def otlp_sink() -> Iterator[tuple[str, Counts]]:
    """A sink on a free loopback port until the block ends; yields its traces URL and its counts."""
    context = multiprocessing.get_context("spawn")
    port, exports, received = context.Value("i", 0), context.Value("q", 0), context.Value("q", 0)
    process = context.Process(target=_serve, args=(port, exports, received), name="otlp-sink", daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 30
        while not port.value:
            if time.monotonic() > deadline or not process.is_alive():
                raise RuntimeError("the OTLP sink did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port.value}/v1/traces", Counts(exports, received)
    finally:
        process.terminate()
        process.join(10)

"""Where a serving process's span records (:data:`appliance.span_records.SpanRecord`) become OpenTelemetry spans and are
exported: in an export process per serving process (:class:`ProcessSink`, the default), or in the serving process
itself through an injected exporter (:class:`InProcessSink`, what tests use).

The export process is ``python -m appliance.trace_export``: it reads the msgpack-packed records from a socket its
serving process holds the other end of, encodes the spans of each request and step as OTLP protobuf
(:mod:`appliance.otlp_encoding`) and POSTs them to the collector (:mod:`appliance.otlp_http`;
``OTEL_EXPORTER_OTLP_*`` environment as usual). It runs on idle CPU only
(``SCHED_IDLE``) and ignores SIGTERM and SIGINT (a service stop signals the whole unit): it exports what it was sent
and exits when the serving process closes the socket, or dies with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from appliance.span_records import request_attributes

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

    from appliance.config import TracingConfig
    from appliance.span_records import SpanRecord

TRACER_NAME = "appliance"
EXPORT_REQUESTS = 256  # requests' spans per OTLP export (about 1,800 spans, 300 kB): each POST costs the same again
MAX_UNSENT_BYTES = 16 << 20  # records the export process has not read yet beyond this are dropped, not queued
READ_BYTES = 1 << 20
READY = b"R"  # what the export process says once it is set up
log = logging.getLogger("appliance.tracing")


class SpanSink(Protocol):
    """Takes the records of ended requests from a serving process."""

    async def start(self) -> None:
        """Get ready (on the event loop, as the server starts)."""

    def send(self, records: list[bytes]) -> None:
        """Take ``records``, each a packed :data:`~appliance.span_records.SpanRecord` (on the event loop; never
        blocks)."""

    def flush(self, timeout_s: float) -> bool:
        """Export what was taken, if this sink can wait for that (blocking); whether it finished in time."""

    async def stop(self) -> None:
        """Export what was taken and release everything (as the server stops)."""


def resource_of(config: TracingConfig, pid: int) -> Resource:
    """The resource of a serving process's spans; ``process.pid`` tells the workers of one server apart."""
    from opentelemetry.sdk.resources import Resource

    class HashedOnce(Resource):
        """The SDK's encoder groups spans by resource, hashing it for each span, and a resource's hash is a JSON
        dump of its attributes (a sixth of the encoding's time); a resource is immutable, so hash it once."""

        def __init__(self, resource: Resource) -> None:
            super().__init__(resource.attributes, resource.schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnce(Resource.create({"service.name": config.service_name, "process.pid": pid}))


class SpanMaker:
    """Makes the SDK's finished spans of records: each request's SERVER span and one INTERNAL child per step."""

    def __init__(self, resource: Resource) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        self._resource, self._scope = resource, InstrumentationScope(TRACER_NAME)
        self._readable, self._context, self._state = ReadableSpan, SpanContext, TraceState
        self._server, self._internal = SpanKind.SERVER, SpanKind.INTERNAL
        self._status, self._error, self._unset = Status, StatusCode.ERROR, Status(StatusCode.UNSET)
        self._sampled = TraceFlags(TraceFlags.SAMPLED)
        self._new_span_id = RandomIdGenerator().generate_span_id  # the steps' own ids

    def spans(self, records: Iterable[SpanRecord]) -> list[ReadableSpan]:
        """The spans of unpacked ``records``."""
        made: list[ReadableSpan] = []
        readable, context, sampled, scope, resource = (self._readable, self._context, self._sampled, self._scope,
                                                       self._resource)
        new_span_id = self._new_span_id
        for trace_bytes, span_id, parent_id, state, start, end, error, steps, request in records:
            trace_id = int.from_bytes(trace_bytes, "big")
            trace_state = self._state.from_header([state]) if state else None
            own = context(trace_id, span_id, False, sampled, trace_state)
            parent = context(trace_id, parent_id, True, sampled, trace_state) if parent_id is not None else None
            status = self._unset if error is None else self._status(self._error, error)
            method, route = request[0], request[1]
            made.append(readable(f"{method} {route}" if route else method, own, parent, resource,
                                 dict(request_attributes(request)), kind=self._server, status=status, start_time=start,
                                 end_time=end, instrumentation_scope=scope))
            for step_name, step_start, step_end, step_attributes, step_error in steps:
                step_attributes = dict(step_attributes or {})
                step_status = self._unset
                if step_error is not None:
                    step_attributes["error.type"] = step_error
                    step_status = self._status(self._error, step_error)
                made.append(readable(step_name, context(trace_id, new_span_id(), False, sampled, trace_state), own,
                                     resource, step_attributes, kind=self._internal, status=step_status,
                                     start_time=step_start, end_time=step_end, instrumentation_scope=scope))
        return made


class RecordingSink:
    """Keeps the packed records it is sent, in ``records``, and exports nothing: for tools that measure the serving
    side alone, and for tests."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    async def start(self) -> None:
        """Nothing to start."""

    def send(self, records: list[bytes]) -> None:
        self.records += records

    def flush(self, timeout_s: float) -> bool:
        return True

    async def stop(self) -> None:
        """Nothing to stop."""


class InProcessSink:
    """Spans made in the serving process and handed to the SDK's batch processor for ``exporter`` (its own
    thread): the seam tests inject an in-memory exporter through. Making spans here costs what the export process
    saves the serving process; use it for tests and tools, not for serving."""

    def __init__(self, exporter: SpanExporter, resource: Resource) -> None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._maker, self._processor = SpanMaker(resource), BatchSpanProcessor(exporter)

    async def start(self) -> None:
        """Nothing to start: the processor's thread runs from its making."""

    def send(self, records: list[bytes]) -> None:
        for span in self._maker.spans(msgpack.unpackb(record, use_list=False) for record in records):
            self._processor.on_end(span)

    def flush(self, timeout_s: float) -> bool:
        return self._processor.force_flush(int(timeout_s * 1000))

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._processor.shutdown)


class ProcessSink:
    """Records to an export process over a socket; ``dropped(n)`` counts the ``n`` requests whose records it could
    not take: the export process fell more than ``max_unsent_bytes`` behind, or is gone (it is started again, at
    most every ``restart_after_s``)."""

    def __init__(self, config: TracingConfig, pid: int, dropped: Callable[[int], None],
                 max_unsent_bytes: int = MAX_UNSENT_BYTES, restart_after_s: float = 10.0,
                 stop_timeout_s: float = 30.0) -> None:
        self._config, self._pid, self._dropped = config, pid, dropped
        self._max_unsent_bytes, self._restart_after_s, self._stop_timeout_s = (max_unsent_bytes, restart_after_s,
                                                                                stop_timeout_s)
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._started_at = 0.0
        self._restart: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def pid(self) -> int | None:
        """The export process's id (``None`` before it starts)."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = json.dumps({"endpoint": self._config.endpoint, "service_name": self._config.service_name,
                               "pid": self._pid})
        self._started_at = time.monotonic()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "appliance.trace_export", "--fd", str(theirs.fileno()), "--settings",
                 settings], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)

    async def ready(self) -> None:
        """Wait until the export process has set itself up (its signals ignored, its exporter made)."""
        assert self._reader is not None, "start() first"
        if await self._reader.read(1) != READY:
            raise RuntimeError("the span export process ended before it was ready")

    def send(self, records: list[bytes]) -> None:
        writer, process = self._writer, self._process
        if writer is None or process is None or process.poll() is not None or writer.transport.is_closing():
            self._drop(len(records), "gone")
            self._start_again()
        elif writer.transport.get_write_buffer_size() > self._max_unsent_bytes:
            self._drop(len(records), "behind")
        else:
            writer.writelines(records)

    def _drop(self, requests: int, why: str) -> None:
        self._dropped(requests)
        if not self._warned:
            self._warned = True
            log.warning("tracing: the span export process is %s; traces are dropped (counted in "
                        "appliance_traces_dropped_total)", why)

    def _start_again(self) -> None:
        if self._writer is None or self._restart is not None or \
                time.monotonic() - self._started_at < self._restart_after_s:
            return  # stopping, already restarting, or restarted moments ago

        async def restart() -> None:
            old = self._writer
            if old is not None:
                old.close()
            code = self._process.poll() if self._process is not None else None
            log.warning("tracing: the span export process ended (exit status %s); starting another", code)
            try:
                await self.start()
                self._warned = False
            except OSError as exc:  # tried again at the next send after restart_after_s
                log.warning("tracing: could not start a span export process: %s", exc)
            finally:
                self._restart = None

        self._restart = asyncio.ensure_future(restart())

    def flush(self, timeout_s: float) -> bool:
        return True  # the export process exports each batch as it reads it; nothing here to wait for

    async def stop(self) -> None:
        if self._restart is not None:
            await asyncio.gather(self._restart, return_exceptions=True)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self._stop_timeout_s)
            except (OSError, asyncio.TimeoutError):
                pass
        process, self._process = self._process, None
        if process is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, process.wait, self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tracing: the span export process did not finish in %g s; stopped", self._stop_timeout_s)
                process.kill()
                await asyncio.get_running_loop().run_in_executor(None, process.wait)


def _batches(connection: socket.socket) -> Iterable[list[Any]]:
    """The records on ``connection`` as they arrive, a batch per read, until it closes."""
    unpacker = msgpack.Unpacker(use_list=False)
    while chunk := connection.recv(READ_BYTES):
        unpacker.feed(chunk)
        batch = list(unpacker)
        if batch:
            yield batch


def _idle_priority() -> None:
    """Run on idle CPU only (Linux SCHED_IDLE, else the lowest nice): serving comes first; under a full CPU this
    process falls behind and its serving process drops records."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(argv: list[str] | None = None) -> None:
    """The export process: batches from ``--fd`` to the OTLP exporter until the socket closes."""
    parser = argparse.ArgumentParser(description="the span export process of one appliance serving process")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--settings", required=True, help="JSON: endpoint, service_name, pid")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _idle_priority()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from appliance.config import TracingConfig
    from appliance.otlp_encoding import OtlpEncoder
    from appliance.otlp_http import OtlpHttpSender, OtlpHttpSettings

    settings = json.loads(args.settings)
    config = TracingConfig(enabled=True, endpoint=settings["endpoint"], service_name=settings["service_name"])
    encoder = OtlpEncoder(resource_of(config, settings["pid"]), TRACER_NAME)
    sender = OtlpHttpSender(OtlpHttpSettings.from_environment(config.endpoint))
    with socket.socket(fileno=args.fd) as connection:
        with contextlib.suppress(OSError):  # a serving process that stopped at once still gets its records sent
            connection.sendall(READY)
        for records in _batches(connection):
            for first in range(0, len(records), EXPORT_REQUESTS):
                sender.send(encoder.encode(records[first:first + EXPORT_REQUESTS]))
    sender.close()


if __name__ == "__main__":
    main()

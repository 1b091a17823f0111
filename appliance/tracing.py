"""OpenTelemetry traces of the request path: one SERVER span per request, one child span per step.

Off by default (``[tracing] enabled``). While it is off nothing imports opentelemetry, and every request carries
:data:`NO_SPANS`, whose :meth:`Spans.step` hands out one shared object that does nothing: the data plane writes
``with trace.spans.step("cache"):`` either way and pays a method call when tracing is off.

When it is on, a serving process records each sampled request as one plain record
(:data:`~appliance.span_records.SpanRecord`: ids, times, attributes and its steps') and hands the records, a few
times a second, to a span sink (:mod:`appliance.trace_export`): by default a child export process per serving
process, which encodes their spans (OTLP protobuf) and sends them. Encoding costs ~3 us a span, seven spans for a
small request, so it never runs in the process whose event loop serves:
the serving process spends a few microseconds a request on tracing, and an export process that falls behind (it runs
on idle CPU only) makes the serving process drop records, counted in ``appliance_traces_dropped_total``, rather than
slow down. A client's W3C ``traceparent`` (and ``tracestate``) continues the client's trace, and its sampled flag
decides; of the traces a worker starts, ``sample_ratio`` are sampled, at most ``max_traces_per_second``: recording
and exporting a small request's seven spans costs about a tenth of what serving it does, and the cap bounds that
cost under a load that would otherwise trace thousands of requests a second.

What a span may carry: names, versions, places, route reasons and kinds, cache results, counts, costs, statuses,
lanes, tenants and request ids. Never a prompt, input tensor, answer or error message (messages may quote input):
an error is told by its class name alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from msgpack import Packer

from appliance.span_records import StepRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from appliance.config import TracingConfig
    from appliance.trace_export import SpanSink
    from appliance.types import Caller, Trace

ExporterFactory = Callable[["TracingConfig"], "SpanExporter"]
"""Makes a span exporter; given one, spans are exported in the serving process (the seam tests use); without, an
export process per serving process sends OTLP/HTTP to ``[tracing] endpoint``."""

SEND_INTERVAL_S = 0.5  # how often a serving process hands its ended requests' records to the sink
log = logging.getLogger("appliance.tracing")
_now = time.time_ns


def _traceparent(trace_id: int, span_id: int, flags: str) -> str:
    # bytes.hex() is about 8x faster than a "032x" format spec, and this runs for every traced request
    return f"00-{trace_id.to_bytes(16, 'big').hex()}-{span_id.to_bytes(8, 'big').hex()}{flags}"


def _random_id(bits: int) -> int:
    """A random trace (128) or span (64 bits) id, never the invalid 0: what the SDK's ``RandomIdGenerator``
    makes, without its two method calls."""
    while not (value := random.getrandbits(bits)):
        pass
    return value


class Step:
    """One step's span; a context manager, or ended by :meth:`end`. This base does nothing (tracing is off)."""

    __slots__ = ()

    def __enter__(self) -> Step:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        self.end(error)

    def end(self, error: BaseException | None = None) -> None:
        """End the span (once); ``error``: the step failed with it (only its class name is recorded)."""


class Spans:
    """The spans of one request. This base is the shared no-op one, :data:`NO_SPANS`, used while tracing is off."""

    __slots__ = ()

    def step(self, name: str, attributes: Mapping[str, str] | None = None) -> Step:
        """A child span of the request's span for the step ``name``, started now."""
        return NO_STEP

    def settled(self, input_tokens: int, output_tokens: int, cost: float, cost_avoided: float = 0.0) -> None:
        """What the request consumed and cost, once it is accounted."""

    def failed(self, error: BaseException) -> None:
        """The request ended in ``error`` (recorded by class name when the request's span ends)."""

    def end(self, status: int, trace: Trace, caller: Caller) -> None:
        """End the request's span with the HTTP status and what the data plane and the middleware learned."""

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` of the request's span; empty while tracing is off."""
        return ""


NO_STEP = Step()
NO_SPANS = Spans()


class _Step(Step):
    """A step's start and attributes until it ends; then a :data:`StepRecord` in its request's steps. A request's
    steps run one after another, so each request reuses one of these (a new one only while another is open): a
    traced request runs six steps, and making and initializing an object for each is a measurable part of what
    tracing costs it. ``_start``: when it began (ns); 0 when it ended as a context manager (free to reuse); -1 when
    it was ended by :meth:`end`, whose holder may call it again, so it is never reused."""

    __slots__ = ("_steps", "_name", "_attributes", "_start")

    def __init__(self, steps: list[StepRecord]) -> None:
        self._steps, self._name, self._attributes, self._start = steps, "", None, 0

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if self._start > 0:  # end(), inlined for the same reason
            self._steps.append((self._name, self._start, _now(), self._attributes,
                                None if error is None else type(error).__name__))
            self._start = 0

    def end(self, error: BaseException | None = None) -> None:
        if self._start > 0:
            self._steps.append((self._name, self._start, _now(), self._attributes,
                                None if error is None else type(error).__name__))
            self._start = -1


class _Unsampled(Spans):
    """A request whose trace is not sampled: it has ids to pass on (``traceparent``), and records nothing."""

    __slots__ = ("_traceparent",)

    def __init__(self, trace_id: int, span_id: int) -> None:
        self._traceparent = _traceparent(trace_id, span_id, "-00")

    @property
    def traceparent(self) -> str:
        return self._traceparent


class RequestSpans(Spans):
    """The spans of one sampled request: its SERVER span's ids, start and what its attributes are made of, and its
    ended steps, which become one :data:`~appliance.span_records.SpanRecord`, packed, when the request ends (bytes:
    the garbage collector does not walk them, as it would a few thousand records' tuples between two sends)."""

    __slots__ = ("_ended", "_pack", "_trace_id", "_span_id", "_parent_id", "_state", "_start", "_request",
                 "_error", "_settled", "_steps", "_step")

    def __init__(self, ended: Callable[[bytes], None], pack: Callable[[Any], bytes], trace_id: int, span_id: int,
                 parent_id: int | None, state: str, request: tuple[str, str, str, str]) -> None:
        self._ended, self._pack, self._trace_id, self._span_id, self._parent_id = (ended, pack, trace_id, span_id,
                                                                                  parent_id)
        self._state, self._request, self._start = state, request, _now()
        self._error, self._settled, self._steps, self._step = "", (None, None, None, None), [], None

    def step(self, name: str, attributes: Mapping[str, str] | None = None) -> Step:
        step = self._step
        if step is None or step._start:  # the last one is still open, or its holder may end it again: this step gets its own
            step = self._step = _Step(self._steps)
        step._name, step._attributes, step._start = name, attributes, _now()
        return step

    def settled(self, input_tokens: int, output_tokens: int, cost: float, cost_avoided: float = 0.0) -> None:
        self._settled = (input_tokens, output_tokens, cost, cost_avoided)

    def failed(self, error: BaseException) -> None:
        self._error = type(error).__name__

    def end(self, status: int, trace: Trace, caller: Caller) -> None:
        usage, principal, model = trace.usage, caller.principal, trace.model
        # A 4xx is the client's error: OpenTelemetry leaves a SERVER span's status unset for it.
        error = (self._error or str(status)) if status >= 500 else None
        self._ended(self._pack((self._trace_id.to_bytes(16, "big"), self._span_id, self._parent_id, self._state,
                                self._start, _now(), error, self._steps,
                     (*self._request, status, caller.lane, model, trace.version if model else None,
                      trace.place if model else None, trace.route, trace.route_kind, trace.cache,
                      *((usage.queue_s, usage.compute_s, usage.batch_size) if usage is not None else (None,) * 3),
                      principal.tenant if principal is not None else None, self._error, *self._settled))))

    @property
    def traceparent(self) -> str:
        return _traceparent(self._trace_id, self._span_id, "-01")


class Tracing:
    """A server process's tracer: :meth:`begin` gives each request its spans, and the records of ended requests go
    to a span sink made by :meth:`lifespan` (an aiohttp ``cleanup_ctx``) in the process that serves, and stopped,
    records flushed, when it stops. ``exporter`` is the seam tests inject an in-memory exporter through; ``sink``
    replaces the sink altogether (tools that measure the serving side alone); ``dropped(n)`` counts the ``n``
    requests whose records the export process could not take."""

    def __init__(self, config: TracingConfig, exporter: ExporterFactory | None = None,
                 dropped: Callable[[int], None] | None = None, sink: SpanSink | None = None) -> None:
        self.config = config
        self._exporter, self._given_sink = exporter, sink
        self._dropped = dropped or (lambda requests: None)
        self._ended: collections.deque[bytes] = collections.deque()  # packed SpanRecords
        self._sink: SpanSink | None = None
        # Made by start(), with the sink (its presence says tracing has started): the SDK's traceparent parser
        # and TraceIdRatioBased rule.
        self._extract: Any = None
        self._sample_limit = self._sample_bound = 0
        self._pack = Packer().pack  # one packer, reused: every call is on the event loop
        self._tokens, self._filled_at = config.max_traces_per_second, time.monotonic()  # the new traces' budget

    def _make_sink(self) -> SpanSink:
        if self._given_sink is not None:
            return self._given_sink
        from appliance import trace_export

        resource = trace_export.resource_of(self.config, os.getpid())
        if self._exporter is not None:
            return trace_export.InProcessSink(self._exporter(self.config), resource)
        return trace_export.ProcessSink(self.config, os.getpid(), self._dropped)

    async def start(self) -> None:
        """Make this process's sink (for the default, start its export process) and the traceparent parser."""
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
        from opentelemetry.trace import get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        ratio = TraceIdRatioBased(self.config.sample_ratio)  # its rule, on the trace id's low 64 bits
        self._sample_limit, self._sample_bound = ratio.TRACE_ID_LIMIT, ratio.bound
        propagator = TraceContextTextMapPropagator()
        self._extract = lambda headers: get_current_span(propagator.extract(headers)).get_span_context()
        self._sink = sink = self._make_sink()
        await sink.start()
        config = self.config
        log.info("tracing: spans of %s to %s, %g of new traces sampled", config.service_name, config.endpoint,
                 config.sample_ratio)

    def send(self) -> None:
        """Hand the records of every request ended so far to the sink (on the event loop; never blocks)."""
        ended, sink = self._ended, self._sink
        if ended and sink is not None:
            sink.send([ended.popleft() for _ in range(len(ended))])

    async def stop(self) -> None:
        """Send what is pending and stop the sink (its export process exports what it holds and exits)."""
        self.send()
        sink, self._sink = self._sink, None
        if sink is not None:
            await sink.stop()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export every ended request's spans now (blocking; from any thread) and say whether that finished in
        time: what the in-process exporter (``exporter``) is for. An export process is only sent what is pending
        (call it on the event loop then)."""
        self.send()
        return self._sink.flush(timeout_s) if self._sink is not None else True

    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The sink's life in this process: made at start, records handed over every ``SEND_INTERVAL_S``, flushed
        and stopped at the end."""
        await self.start()
        sender = asyncio.create_task(self._send_periodically(), name="tracing-send")
        yield
        sender.cancel()
        await self.stop()

    async def _send_periodically(self) -> None:
        while True:
            await asyncio.sleep(SEND_INTERVAL_S)
            self.send()

    def _within_budget(self) -> bool:
        """Whether one more new trace fits ``max_traces_per_second`` (a token bucket as deep as a second's worth,
        refilled as time passes): under a load that would trace more, the rest are sampled out, and what tracing
        costs a worker stays bounded however many requests it serves."""
        rate = self.config.max_traces_per_second
        if not rate:
            return True
        now = time.monotonic()
        tokens = min(rate, self._tokens + (now - self._filled_at) * rate)
        self._filled_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def begin(self, method: str, route: str, path: str, request_id: str, headers: Mapping[str, str]) -> Spans:
        """The spans of a request that has just arrived, continuing the client's trace if it sent one.

        Sampling is parent-based: a client's trace is recorded when its ``traceparent`` says sampled, a new one
        when its id falls within ``sample_ratio`` (OpenTelemetry's ``TraceIdRatioBased`` rule) and it fits
        ``max_traces_per_second``."""
        if self._sink is None:  # not started (or stopped): nothing to record into
            return NO_SPANS
        parent = None
        if "traceparent" in headers:
            parent = self._extract(headers)
            parent = parent if parent.is_valid else None
        if parent is None:
            trace_id, parent_id, state = _random_id(128), None, ""
            sampled = trace_id & self._sample_limit < self._sample_bound and self._within_budget()
        else:
            trace_id, parent_id, sampled = parent.trace_id, parent.span_id, parent.trace_flags.sampled
            state = parent.trace_state.to_header() if parent.trace_state else ""
        span_id = _random_id(64)
        if not sampled:
            return _Unsampled(trace_id, span_id)
        return RequestSpans(self._ended.append, self._pack, trace_id, span_id, parent_id, state,
                            (method, route, path, request_id))

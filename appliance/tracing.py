"""OpenTelemetry traces of the request path: one SERVER span per request, one child span per step.

Off by default (``[tracing] enabled``). While it is off nothing imports opentelemetry, and every request carries
:data:`NO_SPANS`, whose :meth:`Spans.step` hands out one shared object that does nothing: the data plane writes
``with trace.spans.step("cache"):`` either way and pays a method call when tracing is off.

When it is on, :class:`Tracing` owns one SDK ``BatchSpanProcessor`` (and its exporter) per server process, made
when the process starts serving (its ``cleanup_ctx``, so that each worker of ``server.workers`` makes its own after
it was started) and shut down, spans flushed, when the process stops. A client's W3C ``traceparent`` (and
``tracestate``) continues the client's trace. A span is a start time and a few attributes until it ends; then it
becomes the SDK's ``ReadableSpan`` for the processor (see :class:`RequestSpans` for why not the SDK's live spans).

What a span may carry: names, versions, places, route reasons and kinds, cache results, counts, costs, statuses,
lanes, tenants and request ids. Never a prompt, input tensor, answer or error message (messages may quote input):
an error is told by its class name alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from appliance.config import TracingConfig
    from appliance.types import Caller, Trace

ExporterFactory = Callable[["TracingConfig"], "SpanExporter"]
"""Makes the span exporter of a process; the default sends OTLP/HTTP to ``[tracing] endpoint``."""

TRACER_NAME = "appliance"
log = logging.getLogger("appliance.tracing")


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


class _Otel:
    """What the hot path uses of opentelemetry, imported and made once per process when tracing starts."""

    def __init__(self, config: TracingConfig, resource: Any, processor: Any) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.resource, self.processor = resource, processor
        self.scope = InstrumentationScope(TRACER_NAME)
        ids = RandomIdGenerator()
        self.new_trace_id, self.new_span_id = ids.generate_trace_id, ids.generate_span_id
        ratio = TraceIdRatioBased(config.sample_ratio)  # its rule, on the trace id's low 64 bits
        self.sample_limit, self.sample_bound = ratio.TRACE_ID_LIMIT, ratio.bound
        self.server, self.internal = SpanKind.SERVER, SpanKind.INTERNAL
        self.error, self.status, self.unset = StatusCode.ERROR, Status, Status(StatusCode.UNSET)
        self.readable, self.span_context, self.sampled = ReadableSpan, SpanContext, TraceFlags(TraceFlags.SAMPLED)
        self.current_span = get_current_span
        self.propagator = TraceContextTextMapPropagator()


class _Step(Step):
    """A step's start, end and attributes, handed to the span processor as a finished span when it ends."""

    __slots__ = ("_spans", "_name", "_attributes", "_start", "_open")

    def __init__(self, spans: RequestSpans, name: str, attributes: Mapping[str, str] | None) -> None:
        self._spans, self._name, self._attributes = spans, name, attributes
        self._start, self._open = time.time_ns(), True

    def end(self, error: BaseException | None = None) -> None:
        if self._open:
            self._open = False
            self._spans.emit(self._name, self._start, time.time_ns(), self._attributes, error)


class _Unsampled(Spans):
    """A request whose trace is not sampled: it has ids to pass on (``traceparent``), and records nothing."""

    __slots__ = ("_traceparent",)

    def __init__(self, trace_id: int, span_id: int) -> None:
        self._traceparent = f"00-{trace_id:032x}-{span_id:016x}-00"

    @property
    def traceparent(self) -> str:
        return self._traceparent


class RequestSpans(Spans):
    """The spans of one sampled request: its SERVER span, and the steps' spans as its children.

    Each is made as the SDK's ``ReadableSpan`` when it ends and handed to the batch processor, as the SDK's own
    spans are. The SDK's live-span machinery (context lookups, the sampler, locks, attribute checks) costs ~10 us
    a span on a small CPU, more than the appliance spends on a small request's step, and none of it is needed:
    the request's span decides the trace and the sampling, and every attribute is a plain string or number.
    """

    __slots__ = ("_otel", "_name", "_context", "_parent", "_start", "_attributes", "_error")

    def __init__(self, otel: _Otel, name: str, context: Any, parent: Any, attributes: dict[str, Any]) -> None:
        self._otel, self._name, self._context, self._parent = otel, name, context, parent
        self._start, self._attributes, self._error = time.time_ns(), attributes, ""

    def step(self, name: str, attributes: Mapping[str, str] | None = None) -> Step:
        return _Step(self, name, attributes)

    def emit(self, name: str, start: int, end: int, attributes: Mapping[str, Any] | None,
             error: BaseException | None) -> None:
        """A finished step, as a child span of the request's, to the span processor."""
        otel, parent = self._otel, self._context
        status = otel.unset
        if error is not None:
            error_type = type(error).__name__
            attributes = {**(attributes or {}), "error.type": error_type}
            status = otel.status(otel.error, error_type)
        context = otel.span_context(parent.trace_id, otel.new_span_id(), False, parent.trace_flags,
                                    parent.trace_state)
        otel.processor.on_end(otel.readable(name, context, parent, otel.resource, dict(attributes or {}),
                                            kind=otel.internal, status=status, start_time=start, end_time=end,
                                            instrumentation_scope=otel.scope))

    def settled(self, input_tokens: int, output_tokens: int, cost: float, cost_avoided: float = 0.0) -> None:
        attributes = self._attributes
        attributes["appliance.tokens.prompt"] = input_tokens
        attributes["appliance.tokens.completion"] = output_tokens
        attributes["appliance.cost"] = cost
        if cost_avoided:
            attributes["appliance.cost_avoided"] = cost_avoided

    def failed(self, error: BaseException) -> None:
        self._error = type(error).__name__

    def end(self, status: int, trace: Trace, caller: Caller) -> None:
        otel, attributes = self._otel, self._attributes
        attributes["http.response.status_code"] = status
        attributes["appliance.lane"] = caller.lane
        if trace.model:
            attributes.update({"appliance.model": trace.model, "appliance.version": trace.version,
                               "appliance.place": trace.place})
        if trace.route:
            attributes["appliance.route.reason"] = trace.route
        if trace.route_kind:
            attributes["appliance.route.kind"] = trace.route_kind
        if trace.cache:
            attributes["appliance.cache"] = trace.cache
        if trace.usage is not None:
            attributes.update({"appliance.queue_s": trace.usage.queue_s, "appliance.compute_s": trace.usage.compute_s,
                               "appliance.batch_size": trace.usage.batch_size})
        if caller.principal is not None:
            attributes["appliance.tenant"] = caller.principal.tenant
        if self._error:
            attributes["error.type"] = self._error
        # A 4xx is the client's error: OpenTelemetry leaves a SERVER span's status unset for it.
        result = otel.status(otel.error, self._error or str(status)) if status >= 500 else otel.unset
        otel.processor.on_end(otel.readable(self._name, self._context, self._parent, otel.resource, attributes,
                                            kind=otel.server, status=result, start_time=self._start,
                                            end_time=time.time_ns(), instrumentation_scope=otel.scope))

    @property
    def traceparent(self) -> str:
        context = self._context
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def otlp_exporter(config: TracingConfig) -> SpanExporter:
    """Spans to ``config.endpoint`` over OTLP/HTTP (protobuf); headers and TLS files from the ``OTEL_EXPORTER_OTLP_*``
    environment, as every OpenTelemetry exporter reads them."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint)


class Tracing:
    """A server process's tracer: its span processor is made by :meth:`lifespan` (an aiohttp ``cleanup_ctx``) in
    the process that serves, and shut down, spans flushed, when it stops. ``exporter`` is the seam tests inject an
    in-memory exporter through."""

    def __init__(self, config: TracingConfig, exporter: ExporterFactory | None = None) -> None:
        self.config = config
        self._exporter = exporter or otlp_exporter
        self._otel: _Otel | None = None

    def start(self) -> None:
        """Make the resource and the batch processor (its export thread) of this process."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        config = self.config
        # process.pid tells the workers of one server (server.workers) apart; each makes its processor itself.
        resource = Resource.create({"service.name": config.service_name, "process.pid": os.getpid()})
        self._otel = _Otel(config, resource, BatchSpanProcessor(self._exporter(config)))
        log.info("tracing: spans of %s to %s, %g of new traces sampled", config.service_name, config.endpoint,
                 config.sample_ratio)

    def shutdown(self) -> None:
        """Export what is pending and stop the export thread (blocking: call it off the event loop)."""
        otel, self._otel = self._otel, None
        if otel is not None:
            otel.processor.shutdown()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export every ended span now (blocking); whether it finished in time."""
        return self._otel.processor.force_flush(int(timeout_s * 1000)) if self._otel is not None else True

    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The processor's life in this process: made at start, flushed and shut down at the end."""
        self.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    def begin(self, method: str, route: str, path: str, request_id: str, headers: Mapping[str, str]) -> Spans:
        """The spans of a request that has just arrived, continuing the client's trace if it sent one.

        Sampling is parent-based: a client's trace is recorded when its ``traceparent`` says sampled, a new one
        when its id falls within ``sample_ratio`` (OpenTelemetry's ``TraceIdRatioBased`` rule)."""
        otel = self._otel
        if otel is None:  # not started (or stopped): nothing to record into
            return NO_SPANS
        parent = None
        if "traceparent" in headers:
            parent = otel.current_span(otel.propagator.extract(headers)).get_span_context()
            parent = parent if parent.is_valid else None
        if parent is None:
            trace_id, state = otel.new_trace_id(), None
            sampled = trace_id & otel.sample_limit < otel.sample_bound
        else:
            trace_id, state, sampled = parent.trace_id, parent.trace_state, parent.trace_flags.sampled
        span_id = otel.new_span_id()
        if not sampled:
            return _Unsampled(trace_id, span_id)
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path,
                                      "appliance.request_id": request_id}
        if route:
            attributes["http.route"] = route
        context = otel.span_context(trace_id, span_id, False, otel.sampled, state)
        return RequestSpans(otel, f"{method} {route}" if route else method, context, parent, attributes)

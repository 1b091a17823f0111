"""The one middleware: request ids, drain, authentication and the caller's policy, errors as JSON (through
``appliance.api.errors``), request metrics, the access log and, when tracing is on, the request's span (the data
plane opens its steps' spans under it). Accounting is the data plane's."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from appliance.api.errors import error_response
from appliance.api.state import ACCESS_LOG, AUTH, CALLER, CONFIG, LIFECYCLE, LIMITER, METRICS, TRACE
from appliance.auth import LOCAL, require_admin
from appliance.errors import (ApplianceError, BadRequest, Forbidden, PayloadTooLarge, RateLimited, ServerDraining,
                              Unauthorized)
from appliance.keys import LANES, NAME
from appliance.tracing import Tracing
from appliance.types import Caller, Principal, Trace
from appliance.workers import FANOUT_HEADER

log = logging.getLogger("appliance.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Request ids: a random per-process prefix and a counter (uuid4 costs a getrandom() call per request).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)
# Paths that keep answering while the server drains, so that orchestrators can watch it go.
ALWAYS_ANSWERED = ("/v2/health/live", "/v2/health/ready", "/metrics")
# Paths anyone who can reach the port may call: probes, metrics (no payloads, no keys), the API description and
# the status page's HTML shell (code only: its data comes from /v1/status, which needs a key like the rest).
PUBLIC = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json", "/", "/ui"})
ADMIN_PREFIXES = ("/v2/repository/", "/admin/", "/v1/usage")
# Requests that run models: while any is in flight, routing-quality replays wait (and give way).
MODEL_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v2/models/")
DATA_POLICIES = ("local-only", "local-only-no-retention", "any")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer
REQUEST_ID = re.compile(r"[!-~]{1,128}")  # a client's x-request-id is kept when it is this; else the server makes one
ANONYMOUS = Caller()  # public paths, and requests refused before their key was known
REJECTION_REASONS = {Unauthorized: "unauthenticated", Forbidden: "forbidden", RateLimited: "rate_limited"}
TRACING = web.AppKey("tracing", Tracing)  # present only when [tracing] enabled; probes and scrapes are not traced


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Wrap every request: id, drain check, the caller, error mapping, metrics and the access log."""
    started = time.perf_counter()
    arrived = time.monotonic()
    request_id = _request_id(request)
    app = request.app
    lifecycle = app[LIFECYCLE]
    trace = Trace()
    request[TRACE] = trace
    tracing = app.get(TRACING)
    if tracing is not None and request.path not in ALWAYS_ANSWERED:
        trace.spans = tracing.begin(request.method, _route_of(request), request.path, request_id, request.headers)
    spans = trace.spans
    request[CALLER] = caller = ANONYMOUS
    openai = request.path.startswith("/v1/")
    uses_models = request.method == "POST" and request.path.startswith(MODEL_PREFIXES)
    lifecycle.in_flight += 1
    lifecycle.model_requests += uses_models
    lifecycle.model_started += uses_models
    try:
        if lifecycle.draining and request.path not in ALWAYS_ANSWERED:
            raise ServerDraining("the server is shutting down; retry on another instance or after it restarts")
        if request.path not in PUBLIC:
            with spans.step("authenticate"):
                request[CALLER] = caller = _caller(request, _principal(request), arrived)
        elif request.path == "/metrics" and app[CONFIG].server.metrics_access == "admin":
            principal = app[AUTH].authenticate(request.headers.get("Authorization"))
            require_admin(principal, "GET /metrics (server.metrics_access = 'admin')")
        response = await handler(request)
    except asyncio.CancelledError:  # the client left and aiohttp cancelled the handler: the work stops here
        _record(request, request_id, CLIENT_CLOSED, started, trace, caller)
        raise
    except ApplianceError as exc:
        spans.failed(exc)
        reason = REJECTION_REASONS.get(type(exc))
        if reason is not None:
            app[METRICS].auth_rejected.labels(reason).inc()
        response = error_response(exc.status, exc.message, exc.retry_after_s, openai=openai, param=exc.param)
    except web.HTTPRequestEntityTooLarge as exc:
        spans.failed(exc)
        response = error_response(413, PayloadTooLarge(f"request body too large: {exc.text}").message,
                                  openai=openai)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        spans.failed(exc)
        reason = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        response = error_response(exc.status, f"{reason}: {request.method} {request.path}", openai=openai)
        if "Allow" in exc.headers:  # a 405 says which methods the path takes
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:  # noqa: BLE001 - a bug must still produce a JSON 500 and a log line, not a dropped socket
        spans.failed(exc)
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request_id)
        response = error_response(500, f"internal error; see the server log for request {request_id}",
                                  openai=openai)
    finally:
        lifecycle.in_flight -= 1
        lifecycle.model_requests -= uses_models
    if not response.prepared:
        response.headers["x-request-id"] = request_id
        if trace.cache:
            response.headers["x-cache"] = trace.cache
        if trace.model and "x-appliance-model" not in response.headers:
            response.headers["x-appliance-model"] = trace.model
        if trace.route:
            response.headers["x-appliance-route"] = trace.route
        traceparent = spans.traceparent
        if traceparent:
            response.headers["traceparent"] = traceparent
    status = response.status
    transport = request.transport
    if transport is None or transport.is_closing():
        status = CLIENT_CLOSED  # the answer (or the rest of the stream) never reached the client
    _record(request, request_id, status, started, trace, caller)
    return response


def _request_id(request: web.Request) -> str:
    """The client's ``x-request-id`` when it is 1 to 128 printable ASCII characters, else one of the server's."""
    given = request.headers.get("x-request-id")
    if given is not None and REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


def _route_of(request: web.Request) -> str:
    """The matched route's template (``/v2/models/{model}/infer``): a span name of bounded variety."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


def _record(request: web.Request, request_id: str, status: int, started: float, trace: Trace,
            caller: Caller) -> None:
    """The request's metrics, access log line and span."""
    app = request.app
    total = time.perf_counter() - started
    if trace.model or request.path.endswith("/infer"):
        app[METRICS].observe_request(trace.model, trace.version, status, total)
    usage = trace.usage
    app[ACCESS_LOG].record(
        request_id=request_id,
        method=request.method,
        path=request.path,
        status=status,
        total_s=total,
        model=trace.model,
        version=trace.version,
        queue_s=usage.queue_s if usage else 0.0,
        compute_s=usage.compute_s if usage else 0.0,
        tenant=caller.principal.tenant if caller.principal else "",
        key_id=caller.principal.key_id if caller.principal else "",
        cache=trace.cache,
        place=trace.place if trace.model else "",
        route=trace.route,
    )
    trace.spans.end(status, trace, caller)


def _principal(request: web.Request) -> Principal:
    """Authenticate, check admin paths and take the request from the key's budget."""
    if request.headers.get(FANOUT_HEADER) and _from_unix_socket(request):
        return LOCAL  # a sibling worker repeating a model-control request it has already authorized
    principal = request.app[AUTH].authenticate(request.headers.get("Authorization"))
    if request.path.startswith(ADMIN_PREFIXES):
        require_admin(principal, f"{request.method} {request.path}")
    if principal.requests_per_minute or principal.tokens_per_minute:
        request.app[LIMITER].admit(principal)
    return principal


def _from_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _caller(request: web.Request, principal: Principal, arrived: float) -> Caller:
    """The caller's lane, workflow tag, data policy and reproducible mode: headers, else the key's defaults.

    ``x-appliance-data: local-only`` (or ``local-only-no-retention``: and keep nothing of it) can only tighten
    what the key allows; nothing a client sends widens it.
    """
    headers = request.headers
    lane = headers.get("x-appliance-lane")
    if lane is not None and lane not in LANES:
        raise BadRequest(f"x-appliance-lane must be one of {', '.join(LANES)}, not {lane!r}")
    data = headers.get("x-appliance-data")
    if data is not None and data not in DATA_POLICIES:
        raise BadRequest(f"x-appliance-data must be 'local-only', 'local-only-no-retention' (nothing of the request "
                         f"or its answer is kept: no response cache, no routing-quality replay) or 'any' (the key's "
                         f"policy), not {data!r}")
    workflow = headers.get("x-appliance-workflow")
    if workflow is not None and not NAME.fullmatch(workflow):
        raise BadRequest("x-appliance-workflow must be 1 to 64 letters, digits, '.', '_' or '-'")
    reproducible = headers.get("x-appliance-reproducible", "false").lower()
    if reproducible not in ("true", "false"):
        raise BadRequest(f"x-appliance-reproducible must be 'true' or 'false', not {reproducible!r}")
    return Caller(principal=principal, lane=lane or principal.lane, workflow=workflow or principal.workflow,
                  local_only=data in ("local-only", "local-only-no-retention") or not principal.cloud
                  or not principal.retention,
                  arrived=arrived, reproducible=reproducible == "true",
                  retention=principal.retention and data != "local-only-no-retention")

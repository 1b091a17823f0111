"""The one middleware: request ids, drain, errors as JSON, request metrics and the access log."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from appliance.api.state import ACCESS_LOG, LIFECYCLE, METRICS, TRACE
from appliance.errors import ApplianceError, PayloadTooLarge, ServerDraining
from appliance.types import Trace

log = logging.getLogger("appliance.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Request ids: a random per-process prefix and a counter (uuid4 costs a getrandom() call per request).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)
# Paths that keep answering while the server drains, so that orchestrators can watch it go.
ALWAYS_ANSWERED = ("/v2/health/live", "/v2/health/ready", "/metrics")


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(status: int, message: str, retry_after_s: float | None = None, *, openai: bool = False,
                   param: str | None = None) -> web.Response:
    """The JSON error body every failure gets: ``{"error": "..."}``, or OpenAI's error object under ``/v1``."""
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(retry_after_s + 0.999)))
    if openai:
        error: object = {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"),
                         "param": param, "code": None}
    else:
        error = message
    return web.Response(
        status=status, body=orjson.dumps({"error": error}), content_type="application/json", headers=headers
    )


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Wrap every request: id, drain check, error mapping, accounting."""
    started = time.perf_counter()
    request_id = request.headers.get("x-request-id") or f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"
    app = request.app
    lifecycle = app[LIFECYCLE]
    trace = Trace()
    request[TRACE] = trace
    openai = request.path.startswith("/v1/")
    lifecycle.in_flight += 1
    try:
        if lifecycle.draining and request.path not in ALWAYS_ANSWERED:
            raise ServerDraining("the server is shutting down; retry on another instance or after it restarts")
        response = await handler(request)
    except ApplianceError as exc:
        response = error_response(exc.status, exc.message, exc.retry_after_s, openai=openai, param=exc.param)
    except web.HTTPRequestEntityTooLarge as exc:
        response = error_response(413, PayloadTooLarge(f"request body too large: {exc.text}").message,
                                  openai=openai)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        response = error_response(exc.status, f"{reason}: {request.method} {request.path}", openai=openai)
    except Exception:  # noqa: BLE001 - a bug must still produce a JSON 500 and a log line, never a dropped socket
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request_id)
        response = error_response(500, f"internal error; see the server log for request {request_id}",
                                  openai=openai)
    finally:
        lifecycle.in_flight -= 1
    response.headers["x-request-id"] = request_id
    total = time.perf_counter() - started
    if trace.model or request.path.endswith("/infer"):
        app[METRICS].observe_request(trace.model, trace.version, response.status, total)
    usage = trace.usage
    app[ACCESS_LOG].record(
        request_id=request_id,
        method=request.method,
        path=request.path,
        status=response.status,
        total_s=total,
        model=trace.model,
        version=trace.version,
        queue_s=usage.queue_s if usage else 0.0,
        compute_s=usage.compute_s if usage else 0.0,
    )
    return response

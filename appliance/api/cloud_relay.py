"""Relaying a request to the cloud upstream its route names: the body as the client sent it (model renamed by
the upstream's mapping), the answer back as the upstream gave it, streams chunk by chunk. The response says where
it ran (``x-appliance-model: <upstream>:<model>``) and why (``x-appliance-route``)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from appliance.api.middleware import stream_error
from appliance.api.state import TRACE, UPSTREAMS
from appliance.errors import ApplianceError
from appliance.types import Route, Trace
from appliance.upstreams import UpstreamUnavailable


def _headers(trace: Trace) -> dict[str, str]:
    return {"x-appliance-model": trace.model, "x-appliance-route": trace.route}


def _start(request: web.Request, route: Route) -> tuple[Any, Trace]:
    upstream = request.app[UPSTREAMS][route.upstream]
    trace = request[TRACE]
    trace.place, trace.route = "cloud", route.reason
    trace.model = f"{upstream.name}:{upstream.model_for(route.model)}"
    trace.cache = ""
    return upstream, trace


def _account(trace: Trace, input_tokens: int, output_tokens: int, cost: float) -> None:
    trace.input_tokens, trace.output_tokens, trace.cost = input_tokens, output_tokens, cost


async def relay_openai(request: web.Request, route: Route, path: str, body: dict[str, Any],
                       stream: bool) -> web.StreamResponse:
    """An OpenAI-shaped request (chat, completions, embeddings) to an ``openai`` upstream."""
    upstream, trace = _start(request, route)
    if not stream:
        result = await upstream.openai(path, body, route.model)
        _account(trace, result.input_tokens, result.output_tokens, result.cost)
        return _answer(trace, result)
    # The upstream is always asked for its usage chunk, so that a stream is accounted whatever the client asked;
    # the chunk is passed on only to a client that asked for it.
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    _, relay = await upstream.openai_stream(path, {**body, "stream_options": {"include_usage": True}}, route.model)
    try:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **_headers(trace)})
        await response.prepare(request)
        try:
            async for block in relay:
                if client_wants_usage or not _usage_only(block):
                    await response.write(block)
        except ConnectionResetError:
            return response  # the client went away; what the upstream sent is still accounted
        except ApplianceError as exc:  # the upstream broke off after the headers: say so in the stream
            await response.write(stream_error(exc))
    finally:
        await relay.aclose()
        _account(trace, relay.input_tokens, relay.output_tokens, relay.cost)
    await response.write_eof()
    return response


def _usage_only(block: bytes) -> bool:
    """Whether an SSE event is the usage chunk (no choices) that only clients asking for it get."""
    if b'"usage"' not in block:
        return False
    try:
        chunk = orjson.loads(block.strip().removeprefix(b"data: "))
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and not chunk.get("choices") and bool(chunk.get("usage"))


def _answer(trace: Trace, result: Any) -> web.Response:
    """The upstream's answer as it came, except that its refusal of our credential is a 502, not the client's 401."""
    if result.status in (401, 403):
        raise UpstreamUnavailable(f"upstream refused the appliance's credential (HTTP {result.status}); check its "
                                  "api_key_env / api_key_file", retry_after_s=60)
    headers = _headers(trace)
    if "Inference-Header-Content-Length" in result.headers:
        headers["Inference-Header-Content-Length"] = result.headers["Inference-Header-Content-Length"]
    return web.Response(status=result.status, body=result.body, content_type=result.content_type.split(";")[0],
                        headers=headers)


async def relay_kserve(request: web.Request, route: Route, body: bytes) -> web.Response:
    """A v2 infer request, in whatever format it came, to a ``kserve`` upstream."""
    upstream, trace = _start(request, route)
    passed = {name: request.headers[name] for name in ("Inference-Header-Content-Length", "Accept")
              if name in request.headers}
    result = await upstream.kserve_infer(route.model, body, request.content_type, passed)
    _account(trace, 0, 0, result.cost)
    return _answer(trace, result)

"""OpenAI-compatible endpoints: ``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from appliance.api.errors import read_body
from appliance.api.state import CALLER, CONFIG, DATAPLANE, MODELS, TRACE
from appliance.errors import BadRequest, ModelNotFound
from appliance.model_version import ModelVersion
from appliance.types import EmbedRequest

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "truncate", "timeout"}
MAX_INPUTS = 2048


def _json(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                        content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, within the configured size limit."""
    raw = await read_body(request, request.app[CONFIG].server.max_body_bytes,
                          "send fewer inputs per request or raise server.max_body_bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def parse_embedding_request(body: dict[str, Any]) -> tuple[EmbedRequest, str]:
    """Check an embeddings body field by field; returns the request and the encoding format."""
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; this endpoint takes {sorted(EMBEDDING_FIELDS)}",
                         param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: the name or alias of an embedding model (GET /v1/models)",
                         param="model")
    request = EmbedRequest(id="", model=model)
    value = body.get("input")
    if isinstance(value, str):
        request.texts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        request.texts = list(value)
    elif isinstance(value, list) and value and all(is_int(v) for v in value):
        request.token_ids = [list(value)]
    elif isinstance(value, list) and value and all(isinstance(v, list) and all(is_int(t) for t in v)
                                                   for v in value):
        request.token_ids = [list(v) for v in value]
    else:
        raise BadRequest("'input' must be a string, a non-empty array of strings, an array of token ids, or an "
                         "array of such arrays", param="input")
    count = len(request.texts or request.token_ids or [])
    if count > MAX_INPUTS:
        raise BadRequest(f"'input' has {count} items; at most {MAX_INPUTS} per request", param="input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64', not {encoding!r}", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not is_int(dimensions) or dimensions < 1):
        raise BadRequest(f"dimensions must be a positive integer, not {dimensions!r}", param="dimensions")
    request.dimensions = dimensions
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise BadRequest(f"truncate must be true or false, not {truncate!r}", param="truncate")
    request.truncate = truncate
    check_user(body)
    request.deadline = deadline_from(body)
    return request, encoding


def check_user(body: dict[str, Any]) -> None:
    """``user`` is accepted (and not stored) when it is a string."""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("user must be a string", param="user")


def deadline_from(body: dict[str, Any]) -> float | None:
    """The ``timeout`` extension (seconds) as a deadline on the monotonic clock."""
    timeout = body.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise BadRequest(f"timeout is in seconds and must be a positive number, not {timeout!r}", param="timeout")
    return time.monotonic() + float(timeout)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def create_embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings"""
    raw = await read_json(request)
    embed_request, encoding = parse_embedding_request(raw)
    embed_request.cache_control = request.headers.get("Cache-Control")
    embed_request.caller, embed_request.trace, embed_request.wire = request[CALLER], request[TRACE], raw
    response = await request.app[DATAPLANE].embed(embed_request)
    vectors = np.ascontiguousarray(response.embeddings, dtype=np.float32)
    if encoding == "base64":
        rows: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in vectors]
    else:
        rows = list(vectors)
    return _json({
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": row} for index, row in enumerate(rows)],
        "model": response.model,
        "usage": {"prompt_tokens": response.prompt_tokens, "total_tokens": response.prompt_tokens},
    })


def _model_object(model: ModelVersion) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.loaded_at), "owned_by": "appliance",
            "task": model.spec.task, "tier": model.spec.tier or None, "aliases": model.spec.aliases}


def _visible(request: web.Request) -> list[ModelVersion]:
    """The models serving now that the caller's key may use."""
    principal = request[CALLER].principal
    return [model for model in request.app[MODELS].serving()
            if principal is None or principal.may_use(model.name, *model.spec.aliases)]


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the models serving now that the caller's key may use, in OpenAI's shape."""
    return _json({"object": "list", "data": [_model_object(model) for model in _visible(request)]})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: one of them, by name or alias (404 for any other, so that a key learns nothing of
    models outside its list)."""
    name = request.match_info["model"]
    for model in _visible(request):
        if name == model.name or name in model.spec.aliases:
            return _json(_model_object(model))
    raise ModelNotFound(f"no model {name!r} is serving for this key; GET /v1/models lists those that are",
                        param="model")


def add_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes."""
    app.router.add_post("/v1/embeddings", create_embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)

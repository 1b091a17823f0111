"""OpenAI-compatible endpoints: ``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from appliance.api.bodies import parse_embedding_request
from appliance.api.errors import read_body
from appliance.api.state import CALLER, CONFIG, DATAPLANE, MODELS, TRACE
from appliance.errors import BadRequest, ModelNotFound
from appliance.model_version import ModelVersion
from appliance.models import EmbeddingModel, GenerativeModel

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
    entry: dict[str, Any] = {"id": model.name, "object": "model", "created": int(model.loaded_at),
                             "owned_by": "appliance", "task": model.spec.task, "tier": model.spec.tier or None,
                             "aliases": model.spec.aliases}
    if isinstance(model, GenerativeModel):
        # The tokens one sequence may hold (prompt and output): the KV cache's row, not the model's training context.
        entry["context_length"] = entry["max_model_len"] = model.context_limit
        entry["capabilities"] = {"tools": True, "structured_output": ["json_object", "json_schema"]}
    elif isinstance(model, EmbeddingModel):
        entry["context_length"] = model.spec.tokenizer.max_seq_length
        entry["dimensions"] = model.spec.embedding.dimensions
    return entry


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

"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

The request bodies of the OpenAI-compatible routes are generated from the definitions their parsers check against
(:mod:`appliance.api.bodies`); the schemas are JSON Schema 2020-12, which OpenAPI 3.1 uses.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from appliance import __version__, validation
from appliance.api.bodies import FIELD_RULES, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from appliance.api.status import DEFAULT_WINDOW_S, PAGE_PATHS, WINDOW_RANGE_S
from appliance.keys import NAME
from appliance.ledger import GROUP_FIELDS, PLACES

# Where an operation fails; replaced, per path, by the error body that path really sends (see _error_for).
_ERROR: dict[str, Any] = {"description": "Error"}
REQUEST_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/v1/embeddings": EmbeddingRequest}


def _error_for(path: str) -> dict[str, Any]:
    """Under ``/v1/`` an error is OpenAI's error object; elsewhere ``{"error": "<message>"}``."""
    name = "OpenAIError" if path.startswith("/v1/") else "Error"
    return {"description": "Error",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"type": "string", "pattern": f"^{NAME.pattern}$"}
_DAY = {"type": "string", "format": "date", "description": "YYYY-MM-DD, inclusive; since must not be after until"}
_DIMENSION = f"(?:{'|'.join(GROUP_FIELDS)})"
# Comma-separated dimensions (spaces and empty items ignored, a repeated one counted once); empty: totals only.
_GROUP_BY = {"type": "string", "pattern": f"^[ ,]*(?:{_DIMENSION} *(?:,[ ,]*{_DIMENSION} *)*)?[ ,]*$",
             "description": f"the dimensions to keep, comma separated: {', '.join(GROUP_FIELDS)} (all when absent)"}
_USAGE_PARAMS = {"tenant": {"type": "string"}, "key": {"type": "string", "description": "a key id"},
                 "model": {"type": "string"}, "place": {"enum": list(PLACES)}, "workflow": {"type": "string"},
                 "since": _DAY, "until": _DAY, "group_by": _GROUP_BY}
_PURGE = {
    "type": "object",
    "properties": {"tenant": {"anyOf": [_NAME, {"type": "null"}]}, "key": {"anyOf": [_NAME, {"type": "null"}]},
                   "model": {"anyOf": [_NAME, {"type": "null"}]}, "all": {"type": ["boolean", "null"]}},
    "additionalProperties": False,
    # Say what to purge (a tenant, a key and/or a model, or all: true); a tenant and a key are different scopes.
    "anyOf": [{"required": [name], "properties": {name: _NAME}} for name in ("tenant", "key", "model")]
    + [{"required": ["all"], "properties": {"all": {"const": True}}}],
    "not": {"required": ["tenant", "key"], "properties": {"tenant": _NAME, "key": _NAME}},
}
_WINDOW = {"type": "integer", "minimum": WINDOW_RANGE_S[0], "maximum": WINDOW_RANGE_S[1],
           "description": f"seconds the recent figures cover (default {DEFAULT_WINDOW_S}; at most since the start)"}
_STATUS = {"type": "object", "required": ["object", "server", "caller", "recent", "models", "upstreams", "gpus",
                                          "history"],
           "properties": {"object": {"const": "status"}, "server": {"type": "object"}, "caller": {"type": "object"},
                          "window_s": {"type": ["number", "null"]}, "recent": {"type": "object"},
                          "models": {"type": "array", "items": {"type": "object"}},
                          "upstreams": {"type": "array", "items": {"type": "object"}},
                          "gpus": {"type": "array", "items": {"type": "object"}}, "history": {"type": "object"},
                          "cost": {"type": ["object", "null"], "description": "admin keys only; null: ledger off"}}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}


def _op(summary: str, responses: dict[str, Any], body: dict | None = None, params: list | None = None) -> dict:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = body
    return operation


def _json_ok(schema_ref: str | None = None, description: str = "OK") -> dict:
    if schema_ref is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": {"$ref": schema_ref}}}}


def _model_paths() -> dict[str, dict]:
    paths: dict[str, dict] = {}
    infer_body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Triton binary extension: JSON header of Inference-Header-Content-Length bytes, "
                "then raw tensor bytes",
            },
            "application/msgpack": {
                "schema": {"type": "string", "format": "binary"},
                "description": "The InferRequest structure in msgpack, tensor data as raw little-endian bytes",
            },
        },
    }
    infer_ok = {
        "description": "Outputs",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    for base, params in (("/v2/models/{model}", [_MODEL]),
                         ("/v2/models/{model}/versions/{version}", [_MODEL, _VERSION])):
        # A version that is not a number is a 400 (it cannot name any version).
        bad_version = {"400": _ERROR} if len(params) == 2 else {}
        paths[base] = {"get": _op("Model metadata", {"200": _json_ok("#/components/schemas/ModelMetadata"),
                                                      **bad_version, "404": _ERROR, "503": _ERROR}, params=params)}
        paths[base + "/ready"] = {"get": _op("Model readiness", {"200": _json_ok(), **bad_version, "404": _ERROR,
                                                                 "503": _ERROR}, params=params)}
        paths[base + "/config"] = {"get": _op("Model configuration (Triton's shape)",
                                              {"200": _json_ok(), **bad_version, "404": _ERROR, "503": _ERROR},
                                              params=params)}
        paths[base + "/infer"] = {
            "post": _op(
                "Run inference",
                {"200": infer_ok, "400": _ERROR, "404": _ERROR, "413": _ERROR, "503": _ERROR, "504": _ERROR},
                body=infer_body,
                params=params,
            )
        }
    return paths


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document for the routes of :func:`appliance.app.create_app`."""
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                     "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
            "parameters": {"type": "object"},
            "data": {"type": "array", "items": {}},
        },
    }
    paths: dict[str, dict] = {
        "/v2": {"get": _op("Server metadata", {"200": _json_ok()})},
        "/v2/health/live": {"get": _op("Liveness", {"200": _json_ok()})},
        "/v2/health/ready": {"get": _op("Readiness: models loaded and not draining", {"200": _json_ok(),
                                                                                     "503": _json_ok()})},
        **_model_paths(),
        "/v2/repository/index": {"post": _op(
            "Models in the repository and their state",
            {"200": _json_ok("#/components/schemas/RepositoryIndex"), "400": _ERROR},
            body={"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"ready": {"type": "boolean", "description": "only ready ones"}}}}}})},
        "/v2/repository/models/{model}/load": {"post": _op("Load or reload the newest version",
                                                           {"200": _json_ok(), "400": _ERROR, "404": _ERROR},
                                                           params=[_MODEL])},
        "/v2/repository/models/{model}/unload": {"post": _op("Unload", {"200": _json_ok(), "404": _ERROR},
                                                             params=[_MODEL])},
        "/v1/embeddings": {"post": _op(
            "OpenAI-compatible embeddings",
            {"200": _json_ok("#/components/schemas/EmbeddingList"), "400": _ERROR, "404": _ERROR, "413": _ERROR,
             "503": _ERROR, "504": _ERROR})},
        "/v1/models": {"get": _op("Models serving now that the key may use (OpenAI shape)", {"200": _json_ok()})},
        "/v1/models/{model}": {"get": _op("One of them, by name or alias", {"200": _json_ok(), "404": _ERROR},
                                          params=[_MODEL])},
        "/v1/chat/completions": {"post": _op(
            "OpenAI-compatible chat completions (stream: server-sent events)",
            {"200": {"description": "a chat.completion, or text/event-stream chunks ending with data: [DONE]"},
             "400": _ERROR, "404": _ERROR, "413": _ERROR, "503": _ERROR, "504": _ERROR})},
        "/v1/completions": {"post": _op(
            "OpenAI-compatible completions (stream: server-sent events)",
            {"200": {"description": "a text_completion, or text/event-stream chunks ending with data: [DONE]"},
             "400": _ERROR, "404": _ERROR, "413": _ERROR, "503": _ERROR, "504": _ERROR})},
        "/admin/cache": {"get": _op("Response cache entries, bytes and cap, and what the answering worker holds in memory (admin key)",
                                    {"200": _json_ok(), "401": _ERROR, "403": _ERROR})},
        "/admin/routing/quality": {"get": _op(
            "Routing quality: agreement of the small and mid tiers on replayed small-tier routes, per score band "
            "(admin key)", {"200": _json_ok(), "401": _ERROR, "403": _ERROR})},
        "/admin/cache/purge": {"post": _op(
            "Delete cached answers of a tenant, a key's private scope and/or a model (admin key)",
            {"200": _json_ok(), "400": _ERROR, "401": _ERROR, "403": _ERROR},
            body={"required": True, "content": {"application/json": {"schema": _PURGE}}})},
        "/v1/usage": {"get": _op(
            "Cost ledger totals (admin key): filter by tenant, key, model, place, workflow, since, until; group_by",
            {"200": _json_ok(), "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR},  # 404: ledger off
            params=[{"name": name, "in": "query", "required": False, "schema": schema}
                    for name, schema in _USAGE_PARAMS.items()])},
        "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "text/plain exposition"}})},
        "/openapi.json": {"get": _op("This document", {"200": _json_ok()})},
        **{path: {"get": _op("The status page: one HTML file that draws GET /v1/status (public: it holds no data)",
                             {"200": {"description": "HTML", "content": {"text/html": {"schema": {
                                 "type": "string"}}}}})} for path in PAGE_PATHS},
        "/v1/status": {"get": _op(
            "The box now and over the last minutes: models, lanes, latency, cache, routing, upstreams, GPUs and, "
            "for an admin key, today's cost",
            {"200": _json_ok("#/components/schemas/Status"), "400": _ERROR},
            params=[{"name": "window_s", "in": "query", "required": False, "schema": _WINDOW}])},
    }
    schemas: dict[str, Any] = {}
    for path, definition in REQUEST_BODIES.items():
        paths[path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": validation.json_schema(definition, schemas)}}}
    for definition, rules in FIELD_RULES.items():
        schemas[definition.__name__] = {**schemas[definition.__name__], "allOf": rules}
    for path, methods in paths.items():
        for operation in methods.values():
            if path not in ("/metrics", "/openapi.json", *PAGE_PATHS) and not path.startswith("/v2/health"):
                operation["security"] = [{"bearer": []}]
                operation["responses"].setdefault("401", _ERROR)
                operation["responses"].setdefault("403", _ERROR)
                if path.startswith(("/v1/", "/v2/models/")):
                    operation["responses"].setdefault("429", _ERROR)
            error = _error_for(path)
            operation["responses"] = {status: error if response is _ERROR else response
                                      for status, response in operation["responses"].items()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "appliance", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "an API key from `appliance keys create`; not needed on a "
                                                          "loopback-only server without keys"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string", "description": "invalid_request_error, authentication_error, "
                                 "permission_error, not_found_error, rate_limit_error, server_error, ..."},
                        "param": {"type": ["string", "null"], "description": "the request field at fault"},
                        "code": {"type": ["integer", "string", "null"],
                                 "description": "null; in a stream, the HTTP status the error would have had"}}}}},
                "Tensor": tensor,
                "InferRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object", "properties": {
                            "timeout": {"type": "integer", "description": "microseconds"},
                            "binary_data_output": {"type": "boolean"}}},
                        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                        "outputs": {"type": "array", "items": {"type": "object", "properties": {
                            "name": {"type": "string"}, "parameters": {"type": "object"}}}},
                    },
                },
                "InferResponse": {
                    "type": "object",
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                    },
                },
                "ModelMetadata": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "platform": {"type": "string"},
                        "inputs": {"type": "array", "items": {"type": "object"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "EmbeddingList": {
                    "type": "object",
                    "properties": {
                        "object": {"type": "string"},
                        "data": {"type": "array", "items": {"type": "object", "properties": {
                            "object": {"type": "string"}, "index": {"type": "integer"},
                            "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                                    {"type": "string"}]}}}},
                        "model": {"type": "string"},
                        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                                   "total_tokens": {"type": "integer"}}},
                    },
                },
                "Status": _STATUS,
                "RepositoryIndex": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"},
                    "reason": {"type": "string"}}}},
                **schemas,
            }
        },
    }


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json"""
    return web.Response(body=orjson.dumps(build_openapi()), content_type="application/json")

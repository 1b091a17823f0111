"""KServe v2 / Open Inference Protocol over HTTP, with Triton's binary extension and model repository API."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from appliance import __version__
from appliance.api import v2_codec
from appliance.api.errors import read_body
from appliance.api.state import CALLER, CONFIG, DATAPLANE, LIFECYCLE, MODELS, TRACE, WORKERS
from appliance.errors import BadRequest, WorkersDiverged
from appliance.model_version import ModelVersion, ServedTensor
from appliance.types import TensorRequest, WireBody
from appliance.workers import FANOUT_HEADER, forward_to_siblings

# Bodies above this are decoded and encoded in a worker thread rather than on the event loop.
OFFLOAD_BYTES = 256 * 1024
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "msgpack_tensor_data"]
RELAYED_HEADERS = (v2_codec.BINARY_HEADER, "Accept")  # what a cloud upstream needs to read the body as it came


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _version_param(request: web.Request) -> int | None:
    text = request.match_info.get("version")
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise BadRequest(f"model version must be a positive integer, not {text!r}")
    return int(text)


def _model(request: web.Request) -> ModelVersion:
    """The model the path names, if the caller's key may use it (403 otherwise, as for inference)."""
    return request.app[DATAPLANE].resolve(request[CALLER], request.match_info["model"], _version_param(request))


def _shape(model: ModelVersion, tensor: ServedTensor) -> list[int]:
    return ([-1] if model.max_batch_size > 0 else []) + list(tensor.dims)


async def server_metadata(request: web.Request) -> web.Response:
    """GET /v2"""
    return _json({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


async def health_live(request: web.Request) -> web.Response:
    """GET /v2/health/live: the process is up."""
    return web.Response(status=200)


async def health_ready(request: web.Request) -> web.Response:
    """GET /v2/health/ready: started (models loaded) and not draining."""
    lifecycle = request.app[LIFECYCLE]
    return web.Response(status=200 if lifecycle.started and not lifecycle.draining else 503)


async def model_metadata(request: web.Request) -> web.Response:
    """GET /v2/models/{model}[/versions/{version}]"""
    model = _model(request)
    return _json(
        {
            "name": model.name,
            "versions": [str(model.version)],
            "platform": model.runtime.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": _shape(model, t)} for t in model.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": _shape(model, t)} for t in model.outputs],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    """GET /v2/models/{model}[/versions/{version}]/ready: 200 when serving, 503 when not, 404 if unknown."""
    _model(request)
    return web.Response(status=200)


async def model_config(request: web.Request) -> web.Response:
    """GET /v2/models/{model}[/versions/{version}]/config: the configuration in Triton's shape."""
    model = _model(request)
    batching = model.spec.batching
    runtime = model.runtime
    instances: dict = {"count": model.spec.engine.instances, "kind": runtime.instance_kind}
    if runtime.on_gpu:
        instances["gpus"] = list(runtime.gpus)

    def tensors(items: list[ServedTensor]) -> list[dict]:
        return [{"name": t.name, "data_type": f"TYPE_{t.datatype.replace('BYTES', 'STRING')}", "dims": list(t.dims)}
                for t in items]

    config: dict = {
        "name": model.name,
        "platform": runtime.platform,
        "backend": runtime.backend,
        "max_batch_size": batching.max_batch_size,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
        "instance_group": [instances],
        "parameters": {"runtime": {"string_value": runtime.summary},
                       "engine": {"string_value": model.description}},
    }
    if runtime.on_gpu:
        config["optimization"] = {"cuda": {"graphs": model.spec.engine.cuda_graphs}}
    if batching.max_batch_size > 0:
        config["dynamic_batching"] = {
            "preferred_batch_size": batching.preferred_batch_size,
            "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
        }
    return _json(config)


async def _read_body(request: web.Request) -> bytes:
    return await read_body(request, request.app[CONFIG].server.max_body_bytes,
                           "send smaller batches or raise server.max_body_bytes")


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{model}[/versions/{version}]/infer in JSON, binary-extension or msgpack form."""
    body = await _read_body(request)
    content_type, headers = request.content_type, request.headers
    use_msgpack = content_type in v2_codec.MSGPACK_TYPES
    header_text = headers.get(v2_codec.BINARY_HEADER)
    if use_msgpack:
        decode = partial(v2_codec.decode_msgpack, body)
    else:
        try:
            header_length = int(header_text) if header_text is not None else None
        except ValueError:
            raise BadRequest(f"{v2_codec.BINARY_HEADER} must be an integer, not {header_text!r}") from None
        decode = partial(v2_codec.decode_json, body, header_length)
    if len(body) > OFFLOAD_BYTES:
        parsed = await asyncio.get_running_loop().run_in_executor(None, decode)
    else:
        parsed = decode()
    deadline = time.monotonic() + parsed.timeout_us / 1e6 if parsed.timeout_us else None
    infer_request = TensorRequest(
        model=request.match_info["model"],
        version=_version_param(request),
        inputs=parsed.inputs,
        caller=request[CALLER],
        trace=request[TRACE],
        id=parsed.id or "",
        outputs=parsed.outputs,
        deadline=deadline,
        cache_control=headers.get("Cache-Control"),
        wire=WireBody(body, content_type, {name: headers[name] for name in RELAYED_HEADERS if name in headers}),
    )
    result = await request.app[DATAPLANE].infer(infer_request)
    if result.relayed is not None:
        return _relayed(result.relayed)
    datatypes = result.datatypes
    outputs = {name: (datatypes[name], array) for name, array in result.outputs.items()}
    request_id = parsed.id
    if use_msgpack or "msgpack" in headers.get("Accept", ""):
        body_out = v2_codec.encode_msgpack(result.model, result.version, request_id, outputs)
        return web.Response(body=body_out, content_type="application/msgpack")
    binary = set(outputs) if parsed.binary_default else parsed.binary_outputs
    body_out, header_length = v2_codec.encode_json(result.model, result.version, request_id, outputs, binary)
    if header_length is None:
        return web.Response(body=body_out, content_type="application/json")
    return web.Response(
        body=body_out,
        content_type="application/octet-stream",
        headers={v2_codec.BINARY_HEADER: str(header_length)},
    )


def _relayed(answer: Any) -> web.Response:
    """A cloud upstream's answer, body and format as it came."""
    headers = {}
    if v2_codec.BINARY_HEADER in answer.headers:
        headers[v2_codec.BINARY_HEADER] = answer.headers[v2_codec.BINARY_HEADER]
    return web.Response(body=answer.body, content_type=answer.content_type.split(";")[0], headers=headers)


async def repository_index(request: web.Request) -> web.Response:
    """POST /v2/repository/index: every model with its state; body ``{"ready": true}`` keeps only ready ones."""
    ready_only = False
    if request.can_read_body:
        body = await _read_body(request)
        if body.strip():
            try:
                options = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"the body must be JSON: {exc}") from None
            if not isinstance(options, dict):
                raise BadRequest('the body must be a JSON object, such as {"ready": true}')
            ready_only = options.get("ready", False)
            if not isinstance(ready_only, bool):
                raise BadRequest(f"ready must be true or false, not {ready_only!r}")
    entries = []
    for state in request.app[MODELS].index():
        if ready_only and state.state != "READY":
            continue
        entry = {"name": state.name, "state": state.state, "reason": state.reason}
        if state.version is not None:
            entry["version"] = str(state.version)
        if state.runtime:
            entry["runtime"] = state.runtime
        entries.append(entry)
    return _json(entries)


async def repository_load(request: web.Request) -> web.Response:
    """POST /v2/repository/models/{model}/load: load (or reload) the newest version, warm it, swap it in."""
    await _read_body(request)
    # Shielded: a client that leaves must not cut a load between its warmup and the swap.
    model = await asyncio.shield(request.app[MODELS].load(request.match_info["model"]))
    await _fan_out(request, f"loaded version {model.version}")
    return _json({"name": model.name, "version": str(model.version), "state": "READY"})


async def repository_unload(request: web.Request) -> web.Response:
    """POST /v2/repository/models/{model}/unload: stop serving after queued requests finish."""
    await _read_body(request)
    await asyncio.shield(request.app[MODELS].unload(request.match_info["model"]))
    await _fan_out(request, "unloaded")
    return _json({"name": request.match_info["model"], "state": "UNAVAILABLE"})


async def _fan_out(request: web.Request, done_here: str) -> None:
    """With several worker processes, repeat a model-control request on the others; raise if any failed."""
    group = request.app.get(WORKERS)
    if group is None or request.headers.get(FANOUT_HEADER):
        return
    failures = await forward_to_siblings(group, request.path, timeout_s=600)
    if failures:
        raise WorkersDiverged(
            f"{done_here} on worker {group.index} but not everywhere: {'; '.join(failures)}; retry the request"
        )


def add_routes(app: web.Application) -> None:
    """Register the v2 routes."""
    router = app.router
    # aiohttp matches routes in registration order: the hot path goes first.
    router.add_post("/v2/models/{model}/infer", infer)
    router.add_post("/v2/models/{model}/versions/{version}/infer", infer)
    router.add_get("/v2", server_metadata)
    router.add_get("/v2/health/live", health_live)
    router.add_get("/v2/health/ready", health_ready)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_get(base, model_metadata)
        router.add_get(base + "/ready", model_ready)
        router.add_get(base + "/config", model_config)
    router.add_post("/v2/repository/index", repository_index)
    router.add_post("/v2/repository/models/{model}/load", repository_load)
    router.add_post("/v2/repository/models/{model}/unload", repository_unload)

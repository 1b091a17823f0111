"""OpenAI-compatible text generation: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from appliance.api.errors import stream_error
from appliance.api.openai_api import check_user, deadline_from, is_int, read_json
from appliance.api.state import CALLER, DATAPLANE, TRACE
from appliance.engines.generation import SamplingParams
from appliance.errors import ApplianceError, BadRequest
from appliance.generation_stream import GenerationStream, TokenCount
from appliance.types import GenerateRequest, Trace

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
                 "user", "n", "ignore_eos", "timeout"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}


@dataclass
class GenerateBody:
    """A checked chat or completions body."""

    model: str
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    deadline: float | None = None

    def canonical(self, chat: bool) -> dict[str, Any]:
        """Every field that changes the generated text: the response cache's view of the request."""
        p = self.params
        return {"chat": chat, "messages": self.messages, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "seed": p.seed,
                "stop": self.stop, "logprobs": p.logprobs, "ignore_eos": p.ignore_eos}


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number from {low} to {high}, not {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise BadRequest(f"{name} must be an integer {bound}, not {value!r}", param=name)
    return value


def parse_generate(body: dict[str, Any], chat: bool) -> GenerateBody:
    """Check every field; unknown fields and unsupported values get 400 naming the field."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown or unsupported field {unknown[0]!r}; this endpoint takes {sorted(allowed)}",
                         param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: a model name, alias or tier (GET /v1/models)", param="model")
    parsed = GenerateBody(model=model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array of {role, content}", param="messages")
        parsed.messages = [_message(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt))):
            raise BadRequest("'prompt' must be a string (or one string in an array) or an array of token ids",
                             param="prompt")
        parsed.prompt = prompt
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest(f"n must be 1 (one choice per request), not {n!r}", param="n")
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    parsed.max_tokens = _integer(body, limit_name, 1)
    params = parsed.params
    params.temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    params.top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if params.top_p == 0:
        raise BadRequest("top_p must be above 0", param="top_p")
    params.top_k = _integer(body, "top_k", 0) or 0
    params.seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    if params.seed is not None and params.seed < 0:
        params.seed &= (1 << 64) - 1
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be true or false", param="ignore_eos")
    params.ignore_eos = ignore_eos
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s
                                                                                      for s in stop)):
        raise BadRequest("stop must be a non-empty string or an array of at most 4 such strings", param="stop")
    parsed.stop = stop or []
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    parsed.stream = stream
    options = body.get("stream_options")
    if options is not None:
        if not stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise BadRequest("stream_options needs stream: true and takes only include_usage", param="stream_options")
        parsed.include_usage = bool(options.get("include_usage", False))
    params.logprobs = _logprobs(body, chat)
    check_user(body)
    parsed.deadline = deadline_from(body)
    return parsed


def _message(message: Any, index: int) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
        raise BadRequest(f"messages[{index}] needs a role of system, developer, user or assistant",
                         param="messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood by a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise BadRequest(f"messages[{index}].content parts must all be text parts", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{index}].content must be a string", param="messages")
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}


def _logprobs(body: dict, chat: bool) -> int:
    if chat:
        wanted = body.get("logprobs", False)
        if not isinstance(wanted, bool):
            raise BadRequest("logprobs must be true or false", param="logprobs")
        top = _integer(body, "top_logprobs", 0, 20)
        if top is not None and not wanted:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if wanted else -1
    count = _integer(body, "logprobs", 0, 5)
    return -1 if count is None else count


def _logprobs_object(entries: list[dict], chat: bool) -> dict:
    if chat:
        return {"content": entries}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _usage(tokens: TokenCount) -> dict:
    return {"prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
            "total_tokens": tokens.total_tokens}


async def _handle(request: web.Request, chat: bool) -> web.StreamResponse:
    raw = await read_json(request)
    body = parse_generate(raw, chat)
    generate = GenerateRequest(model=body.model, chat=chat, params=body.params, messages=body.messages,
                               prompt=body.prompt, max_tokens=body.max_tokens, stop=body.stop, stream=body.stream,
                               deadline=body.deadline, cache_control=request.headers.get("Cache-Control"),
                               canonical=body.canonical(chat), caller=request[CALLER], trace=request[TRACE],
                               wire=raw)
    stream = await request.app[DATAPLANE].generate(generate)
    async with stream:
        frame = _Frame(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()), stream.model,
                       chat, body.include_usage)
        headers = _headers(request[TRACE], stream.model)
        if body.stream:
            return await _stream(request, stream, frame, headers, body.params.logprobs >= 0)
        return await _whole(stream, frame, headers, body.params.logprobs >= 0)


def _headers(trace: Trace, model: str) -> dict[str, str]:
    headers = {"x-appliance-model": model}
    if trace.cache:
        headers["x-cache"] = trace.cache
    if trace.route:
        headers["x-appliance-route"] = trace.route
    return headers


@dataclass(frozen=True, slots=True)
class _Frame:
    """What every chunk or answer object of one response repeats."""

    ident: str
    created: int
    model: str
    chat: bool
    include_usage: bool

    def event(self, choices: list[dict], usage: dict | None = None) -> bytes:
        payload: dict[str, Any] = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else
                                   "text_completion", "created": self.created, "model": self.model,
                                   "choices": choices}
        if self.include_usage:
            payload["usage"] = usage
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def choice(self, delta: str | None, finish: str | None, logprobs: list[dict] | None = None) -> dict:
        item: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            item["delta"] = {} if delta is None else {"content": delta}
            item["logprobs"] = {"content": logprobs} if logprobs is not None else None
        else:
            item["text"] = delta or ""
            item["logprobs"] = None
        return item


async def _whole(stream: GenerationStream, frame: _Frame, headers: dict[str, str],
                 wants_logprobs: bool) -> web.Response:
    texts: list[str] = []
    entries: list[dict] = []
    async for chunk in stream:
        texts.append(chunk.text)
        entries.extend(chunk.logprobs)
    text = "".join(texts)
    choice: dict[str, Any] = {"index": 0, "logprobs": _logprobs_object(entries, frame.chat) if wants_logprobs
                              else None, "finish_reason": stream.finish_reason}
    if frame.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    payload = {"id": frame.ident, "object": "chat.completion" if frame.chat else "text_completion",
               "created": frame.created, "model": frame.model, "choices": [choice], "usage": _usage(stream.tokens)}
    return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)


async def _stream(request: web.Request, stream: GenerationStream, frame: _Frame, headers: dict[str, str],
                  wants_logprobs: bool) -> web.StreamResponse:
    # The first chunk comes before the headers, so that a prompt that cannot run still gets a proper status.
    chunk = await anext(stream)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **headers})
    await response.prepare(request)
    try:
        if frame.chat:
            await response.write(frame.event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]))
        while True:
            if chunk.text or (wants_logprobs and chunk.logprobs):
                await response.write(frame.event([frame.choice(chunk.text, None,
                                                               chunk.logprobs if wants_logprobs else None)]))
            if chunk.finish_reason is not None:
                break
            chunk = await anext(stream)
        await response.write(frame.event([frame.choice(None, chunk.finish_reason)]))
        if frame.include_usage:
            await response.write(frame.event([], _usage(stream.tokens)))
    except ConnectionResetError:
        return response  # the client went away; what was generated is still accounted
    except ApplianceError as exc:  # after the headers: the error goes in the stream, which then ends
        await response.write(stream_error(exc))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    return await _handle(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    return await _handle(request, chat=False)


def add_routes(app: web.Application) -> None:
    """Register the generation routes."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)

"""OpenAI-compatible text generation: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from appliance.api.openai_api import check_user, deadline_from, is_int, read_json
from appliance.api.state import DATAPLANE, TRACE
from appliance.api.text_stream import TextAssembler
from appliance.dataplane import Generation
from appliance.engines.generation import SamplingParams, TokenEvent
from appliance.errors import BadRequest, DeadlineExceeded, EngineFailed

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


class _Reply:
    """Assembles the response text, logprobs and usage from token events."""

    def __init__(self, generation: Generation, body: GenerateBody, chat: bool) -> None:
        self.generation, self.body, self.chat = generation, body, chat
        text = generation.served.text
        assert text is not None
        self._text = text
        self.assembler = TextAssembler(text.decode, body.stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []

    def take(self, event: TokenEvent) -> str:
        if event.token is not None and not self.assembler.stopped:
            self.completion_tokens += 1
            piece = self.assembler.add(event.token)
            if event.logprob is not None:
                self.logprobs.append(self._logprob_entry(event))
            if self.assembler.stopped:
                self.finish_reason = "stop"
                return piece
        else:
            piece = ""
        if event.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = "length" if event.finish_reason == "length" else "stop"
            piece += self.assembler.finish()
        return piece

    def _logprob_entry(self, event: TokenEvent) -> dict:
        token = self._text.decode([event.token], skip_special_tokens=False)
        entry = {"token": token, "logprob": event.logprob, "bytes": list(token.encode())}
        entry["top_logprobs"] = [
            {"token": (t := self._text.decode([tid], skip_special_tokens=False)), "logprob": lp,
             "bytes": list(t.encode())} for tid, lp in (event.top_logprobs or [])]
        return entry

    def logprobs_object(self) -> dict | None:
        if self.body.params.logprobs < 0:
            return None
        if self.chat:
            return {"content": self.logprobs}
        return {"tokens": [e["token"] for e in self.logprobs], "token_logprobs": [e["logprob"] for e in self.logprobs],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in self.logprobs]}

    def usage(self) -> dict:
        prompt = self.generation.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


async def _next_event(request: web.Request, generation: Generation) -> TokenEvent:
    event: TokenEvent = await generation.sequence.events.get()
    if event.token is not None:
        request.app[DATAPLANE].observe_token(generation)
    if event.finish_reason == "timeout":
        raise DeadlineExceeded("the request's timeout passed before generation finished")
    if event.finish_reason == "error":
        raise EngineFailed(f"generation failed: {event.error}")
    return event


async def _handle(request: web.Request, chat: bool) -> web.StreamResponse:
    body = parse_generate(await read_json(request), chat)
    dataplane = request.app[DATAPLANE]
    generation = await dataplane.generate(body.model, body.messages, body.prompt, body.params, body.max_tokens,
                                          body.deadline, request[TRACE])
    reply = _Reply(generation, body, chat)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    try:
        if body.stream:
            return await _stream(request, generation, reply, ident, created)
        pieces = []
        while reply.finish_reason is None:
            pieces.append(reply.take(await _next_event(request, generation)))
            if reply.assembler.stopped:
                break
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": reply.logprobs_object(), "finish_reason": reply.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        payload = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": generation.served.name, "choices": [choice], "usage": reply.usage()}
        return web.Response(body=orjson.dumps(payload), content_type="application/json",
                            headers={"x-appliance-model": generation.served.name})
    finally:
        dataplane.finish_generation(generation, reply.completion_tokens)


async def _stream(request: web.Request, generation: Generation, reply: _Reply, ident: str, created: int
                  ) -> web.StreamResponse:
    chat = reply.chat
    # The first event comes before the headers, so that a prompt that cannot run still gets a proper status.
    first = await _next_event(request, generation)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "x-appliance-model": generation.served.name})
    await response.prepare(request)
    kind = "chat.completion.chunk" if chat else "text_completion"

    async def send(delta: str | None, finish: str | None, logprobs: list[dict] | None = None) -> None:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {} if delta is None else {"content": delta}
            choice["logprobs"] = {"content": logprobs} if logprobs is not None else None
        else:
            choice["text"] = delta or ""
            choice["logprobs"] = None
        chunk = {"id": ident, "object": kind, "created": created, "model": generation.served.name,
                 "choices": [choice]}
        if reply.body.include_usage:
            chunk["usage"] = None
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    if chat:
        role_chunk = {"id": ident, "object": kind, "created": created, "model": generation.served.name,
                      "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]}
        await response.write(b"data: " + orjson.dumps(role_chunk) + b"\n\n")
    event: TokenEvent | None = first
    while True:
        assert event is not None
        before = len(reply.logprobs)
        piece = reply.take(event)
        new_logprobs = reply.logprobs[before:] if reply.body.params.logprobs >= 0 else None
        if piece or new_logprobs:
            await send(piece, None, new_logprobs)
        if reply.finish_reason is not None:
            break
        event = await _next_event(request, generation)
    await send(None, reply.finish_reason)
    if reply.body.include_usage:
        usage = {"id": ident, "object": kind, "created": created, "model": generation.served.name, "choices": [],
                 "usage": reply.usage()}
        await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
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

"""OpenAI-compatible text generation: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from appliance.api.bodies import parse_generate
from appliance.api.errors import stream_error
from appliance.api.openai_api import read_json
from appliance.api.state import CALLER, DATAPLANE, TRACE
from appliance.errors import ApplianceError
from appliance.generation_stream import Chunk, GenerationStream, TokenCount
from appliance.tools import ToolSet, may_become_a_call, parse_tool_calls
from appliance.types import GenerateRequest, Trace


def _logprobs_object(entries: list[dict], chat: bool) -> dict:
    if chat:
        return {"content": entries}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _usage(tokens: TokenCount) -> dict:
    return {"prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
            "total_tokens": tokens.total_tokens, "prompt_tokens_details": {"cached_tokens": tokens.cached_tokens}}


async def _handle(request: web.Request, chat: bool) -> web.StreamResponse:
    raw = await read_json(request)
    body = parse_generate(raw, chat)
    generate = GenerateRequest(model=body.model, chat=chat, params=body.params, messages=body.messages,
                               prompt=body.prompt, max_tokens=body.max_tokens, stop=body.stop, stream=body.stream,
                               deadline=body.deadline, cache_control=request.headers.get("Cache-Control"),
                               canonical=body.canonical(chat), caller=request[CALLER], trace=request[TRACE],
                               wire=raw, response_format=body.response_format, tools=body.tools,
                               echo=body.echo, n=body.n, prompts=body.prompts)
    stream = await request.app[DATAPLANE].generate(generate)
    async with stream:
        frame = _Frame(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()), stream.model,
                       chat, body.include_usage)
        headers = _headers(request[TRACE], stream.model)
        tools = body.tools if chat and body.tools is not None and body.tools.offered else None
        if body.stream:
            return await _stream(request, stream, frame, headers, body.params.logprobs >= 0, tools)
        return await _whole(stream, frame, headers, body.params.logprobs >= 0, tools)


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

    def choice(self, delta: str | None, finish: str | None, logprobs: list[dict] | None = None,
               index: int = 0) -> dict:
        item: dict[str, Any] = {"index": index, "finish_reason": finish}
        if self.chat:
            item["delta"] = {} if delta is None else {"content": delta}
            item["logprobs"] = {"content": logprobs} if logprobs is not None else None
        else:
            item["text"] = delta or ""
            item["logprobs"] = None
        return item


async def _whole(stream: GenerationStream, frame: _Frame, headers: dict[str, str],
                 wants_logprobs: bool, tools: ToolSet | None = None) -> web.Response:
    texts: dict[int, list[str]] = defaultdict(list)
    entries: dict[int, list[dict]] = defaultdict(list)
    async for chunk in stream:
        texts[chunk.index].append(chunk.text)
        entries[chunk.index].extend(chunk.logprobs)
    choices = [_whole_choice(index, "".join(texts[index]), entries[index], stream.finish_reasons.get(index), frame,
                             wants_logprobs, tools) for index in range(stream.choices)]
    payload = {"id": frame.ident, "object": "chat.completion" if frame.chat else "text_completion",
               "created": frame.created, "model": frame.model, "choices": choices, "usage": _usage(stream.tokens)}
    return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)


def _whole_choice(index: int, text: str, entries: list[dict], finish: str | None, frame: _Frame,
                  wants_logprobs: bool, tools: ToolSet | None) -> dict[str, Any]:
    calls = parse_tool_calls(text, tools) if tools is not None and finish == "stop" else None
    choice: dict[str, Any] = {"index": index, "logprobs": _logprobs_object(entries, frame.chat) if wants_logprobs
                              else None, "finish_reason": "tool_calls" if calls else finish}
    if calls:
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": [c.as_openai() for c in calls]}
    elif frame.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return choice


async def _stream(request: web.Request, stream: GenerationStream, frame: _Frame, headers: dict[str, str],
                  wants_logprobs: bool, tools: ToolSet | None = None) -> web.StreamResponse:
    # The first chunk comes before the headers, so that a prompt that cannot run still gets a proper status.
    chunk = await anext(stream)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **headers})
    traceparent = request[TRACE].spans.traceparent  # prepared here, before the middleware sees the response
    if traceparent:
        response.headers["traceparent"] = traceparent
    await response.prepare(request)
    try:
        if frame.chat:
            await response.write(frame.event([{"index": index, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}
                                              for index in range(stream.choices)]))
        # Per choice, text that may still become a tool call (None: plain text, streamed as it comes).
        held: dict[int, list[Chunk] | None] = {index: [] if tools is not None else None
                                               for index in range(stream.choices)}
        while True:
            index = chunk.index
            pending = held.get(index)
            if pending is not None:
                pending.append(chunk)
                if not may_become_a_call("".join(c.text for c in pending)):
                    for piece in pending:  # plain text after all: send what was held, then stream as usual
                        await _send_text(response, frame, piece, wants_logprobs)
                    held[index] = None
            else:
                await _send_text(response, frame, chunk, wants_logprobs)
            if chunk.finish_reason is not None:
                await _finish_choice(response, frame, index, chunk.finish_reason, held.get(index), tools,
                                     wants_logprobs)
            if stream.finish_reason is not None:
                break
            chunk = await anext(stream)
        if frame.include_usage:
            await response.write(frame.event([], _usage(stream.tokens)))
    except ConnectionResetError:
        return response  # the client went away; what was generated is still accounted
    except ApplianceError as exc:  # after the headers: the error goes in the stream, which then ends
        await response.write(stream_error(exc))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _finish_choice(response: web.StreamResponse, frame: _Frame, index: int, finish: str,
                         held: list[Chunk] | None, tools: ToolSet | None, wants_logprobs: bool) -> None:
    """The end of one choice: held text as its tool calls (or as text after all), then its finish reason."""
    if held is not None:
        calls = parse_tool_calls("".join(c.text for c in held), tools) if finish == "stop" and tools else None
        if calls:
            await response.write(frame.event([{"index": index, "delta": {"tool_calls": [
                c.as_openai(position) for position, c in enumerate(calls)]}, "logprobs": None,
                "finish_reason": None}]))
            finish = "tool_calls"
        else:
            for piece in held:
                await _send_text(response, frame, piece, wants_logprobs)
    await response.write(frame.event([frame.choice(None, finish, index=index)]))


async def _send_text(response: web.StreamResponse, frame: _Frame, chunk: Chunk, wants_logprobs: bool) -> None:
    if chunk.text or (wants_logprobs and chunk.logprobs):
        await response.write(frame.event([frame.choice(chunk.text, None, chunk.logprobs if wants_logprobs else None,
                                                       chunk.index)]))


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

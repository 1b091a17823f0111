"""The cloud step: a typed request sent to the upstream its route names, the answer read back into the data
plane's own shapes (a :class:`Result`, an :class:`EmbedResponse`, chunks of a generation).

The body goes as the client sent it, the model renamed by the upstream's mapping. Whatever goes wrong there (a
refusal of the appliance's credential, an upstream that is unreachable, failing or answering with an error) is an
:class:`UpstreamFailed` (502) that names the upstream: the client's own request was fine and may be retried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from appliance.errors import ApplianceError, UpstreamFailed, UpstreamRejected, UpstreamUnavailable
from appliance.generation_stream import Chunk, TokenCount
from appliance.types import EmbedRequest, EmbedResponse, GenerateRequest, Result, Route, TensorRequest, Usage
from appliance.upstreams import Upstream, UpstreamResult


@dataclass(slots=True)
class CloudCost:
    """What a cloud call cost, known once its answer (or its stream's usage chunk) has arrived."""

    value: float = 0.0


class Cloud:
    """Runs requests on the configured upstreams."""

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        self._upstreams = upstreams

    def model_label(self, route: Route) -> str:
        """``<upstream>:<its model>``: where a cloud answer came from, for the trace and the ledger."""
        upstream = self._upstreams[route.upstream]
        return f"{upstream.name}:{upstream.model_for(route.model)}"

    async def infer(self, route: Route, request: TensorRequest) -> tuple[Result, float]:
        """A v2 infer request, its body in whatever format it came, to a ``kserve`` upstream."""
        upstream = self._upstreams[route.upstream]
        wire = request.wire
        assert wire is not None, "a tensor request bound for the cloud carries its body"
        try:
            result = await upstream.kserve_infer(route.model, wire.body, wire.content_type, dict(wire.headers))
        except ApplianceError as exc:
            raise _failed(upstream, route, exc) from None
        _check(upstream, route, result)
        return Result(request.model, 0, {}, {}, Usage(), relayed=result), result.cost

    async def embed(self, route: Route, request: EmbedRequest) -> tuple[EmbedResponse, float]:
        """An embeddings request to an ``openai`` upstream, always asked for floats."""
        upstream = self._upstreams[route.upstream]
        body = {**(request.wire or {}), "encoding_format": "float"}
        try:
            result = await upstream.openai("/v1/embeddings", body, route.model)
        except ApplianceError as exc:
            raise _failed(upstream, route, exc) from None
        _check(upstream, route, result)
        try:
            doc = orjson.loads(result.body)
            rows = sorted(doc["data"], key=lambda item: item["index"])
            vectors = np.array([row["embedding"] for row in rows], dtype=np.float32)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise _failed(upstream, route, f"answered embeddings the appliance cannot read ({exc})") from None
        return EmbedResponse(self.model_label(route), 0, vectors, result.input_tokens, Usage()), result.cost

    async def generate(self, route: Route, request: GenerateRequest, tokens: TokenCount,
                       cost: CloudCost) -> AsyncIterator[Chunk]:
        """The chunks of a chat or completions answer from an ``openai`` upstream; ``tokens`` and ``cost`` are kept
        up to date as they arrive. A streaming client gets a streamed call, asked for its usage chunk so that the
        stream is accounted whatever the client asked."""
        upstream = self._upstreams[route.upstream]
        path = "/v1/chat/completions" if request.chat else "/v1/completions"
        body = dict(request.wire or {})
        if not request.stream:
            try:
                result = await upstream.openai(path, body, route.model)
            except ApplianceError as exc:
                raise _failed(upstream, route, exc) from None
            _check(upstream, route, result)
            tokens.prompt_tokens, tokens.completion_tokens = result.input_tokens, result.output_tokens
            cost.value = result.cost
            return _replay(_whole_answer(upstream, route, result.body, request.chat, request.choice_count))
        body["stream_options"] = {"include_usage": True}
        try:
            _, events = await upstream.openai_stream(path, body, route.model)
        except ApplianceError as exc:
            raise _failed(upstream, route, exc) from None
        return _streamed(upstream, route, events, request.chat, tokens, cost, request.choice_count)


async def _replay(chunks: list[Chunk]) -> AsyncIterator[Chunk]:
    for chunk in chunks:
        yield chunk


async def _streamed(upstream: Upstream, route: Route, events: Any, chat: bool, tokens: TokenCount,
                    cost: CloudCost, choices: int) -> AsyncIterator[Chunk]:
    finish: dict[int, str] = {}
    try:
        async for event in events:
            data = b"\n".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")).strip()
            if not data or data == b"[DONE]":
                continue
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise _failed(upstream, route, "sent a stream event that is not JSON") from None
            if not isinstance(doc, dict):
                continue
            if "error" in doc:
                raise _failed(upstream, route, f"broke off the stream: {_error_text(doc['error'])}")
            tokens.prompt_tokens, tokens.completion_tokens = events.input_tokens, events.output_tokens
            cost.value = events.cost
            for choice in doc.get("choices") or []:
                chunk = _choice_chunk(choice, chat, delta=True)
                if not 0 <= chunk.index < choices:
                    raise _failed(upstream, route, f"sent choice {chunk.index} of {choices} asked for")
                if chunk.finish_reason is not None:
                    finish[chunk.index] = chunk.finish_reason
                chunk.finish_reason = None  # the end is announced once the usage chunk has come
                if chunk.text or chunk.logprobs:
                    yield chunk
    except (UpstreamUnavailable, UpstreamRejected) as exc:
        raise _failed(upstream, route, exc) from None
    finally:
        await events.aclose()
    if len(finish) < choices:
        raise _failed(upstream, route, "ended the stream without a finish reason for every choice")
    for index in range(choices):
        yield Chunk(finish_reason=finish[index], index=index)


def _whole_answer(upstream: Upstream, route: Route, body: bytes, chat: bool, choices: int) -> list[Chunk]:
    """The answer's choices, each as one chunk that ends it; exactly the ``choices`` asked for, by index."""
    try:
        doc = orjson.loads(body)
        chunks = [_choice_chunk(choice, chat, delta=False) for choice in doc["choices"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise _failed(upstream, route, "answered with a body that is not a completion") from None
    if sorted(chunk.index for chunk in chunks) != list(range(choices)):
        raise _failed(upstream, route, f"answered {len(chunks)} choices where {choices} were asked for")
    for chunk in chunks:
        chunk.finish_reason = chunk.finish_reason or "stop"
    return sorted(chunks, key=lambda chunk: chunk.index)


def _choice_chunk(choice: dict, chat: bool, *, delta: bool) -> Chunk:
    """One OpenAI choice (or stream delta) as a :class:`Chunk`."""
    if chat:
        message = choice.get("delta" if delta else "message") or {}
        text = message.get("content") or ""
        logprobs = ((choice.get("logprobs") or {}).get("content")) or []
    else:
        text = choice.get("text") or ""
        logprobs = _legacy_logprobs(choice.get("logprobs"))
    index = choice.get("index", 0)
    return Chunk(text=text, logprobs=list(logprobs), finish_reason=choice.get("finish_reason"),
                 index=index if isinstance(index, int) and not isinstance(index, bool) else -1)


def _legacy_logprobs(logprobs: Any) -> list[dict]:
    """The completions endpoint's ``{tokens, token_logprobs, top_logprobs}`` as per-token entries."""
    if not isinstance(logprobs, dict):
        return []
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [{}] * len(tokens)
    return [{"token": token, "logprob": value, "bytes": list(str(token).encode()),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(str(t).encode())}
                              for t, lp in (top or {}).items()]}
            for token, value, top in zip(tokens, values, tops)]


def _check(upstream: Upstream, route: Route, result: UpstreamResult) -> None:
    if result.status != 200:
        raise _failed(upstream, route, result)


def _refusal(result: UpstreamResult) -> str:
    """An upstream's non-200 answer in words; a 401 or 403 is a refusal of the appliance's own credential."""
    if result.status in (401, 403):
        return (f"refused the appliance's credential (HTTP {result.status}); check the upstream's api_key_env / "
                "api_key_file")
    detail = _error_text(_error_of(result.body))
    return f"answered HTTP {result.status}{': ' + detail if detail else ''}"


def _failed(upstream: Upstream, route: Route, problem: ApplianceError | UpstreamResult | str) -> UpstreamFailed:
    retry_after_s: float | None = None
    if isinstance(problem, UpstreamResult):
        retry_after_s, problem = _retry_after(problem), _refusal(problem)
    if isinstance(problem, ApplianceError):
        retry_after_s = problem.retry_after_s
        if isinstance(problem, UpstreamRejected):
            problem = _refusal(problem.result)
        else:
            problem = problem.message.removeprefix(f"upstream {upstream.name!r}: ")
    return UpstreamFailed(f"cloud upstream {upstream.name!r} failed this request ({problem}); it went there for "
                          f"{route.kind} ({route.reason}); the request may be retried",
                          retry_after_s=retry_after_s if retry_after_s is not None else 1.0)


def _error_of(body: bytes) -> Any:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode(errors="replace")
    return doc.get("error", doc) if isinstance(doc, dict) else doc


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or "")[:300]
    return str(error or "")[:300]


def _retry_after(result: UpstreamResult) -> float | None:
    value = next((v for k, v in result.headers.items() if k.lower() == "retry-after"), "")
    return float(value) if value.isdigit() else None

"""Cloud upstreams: where a request goes when the local models are saturated or failing and the caller's policy lets
its data leave the box.

An upstream is an OpenAI-compatible server (``kind = "openai"``: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``) or a KServe v2 server (``kind = "kserve"``: Triton, KServe, another appliance). Each is
configured in a ``[upstreams.<name>]`` table (``appliance.upstream_config``) and served by one :class:`Upstream`: one
pooled ``aiohttp`` client session, a concurrency cap that refuses rather than queues, a :class:`CircuitBreaker`, and
retries with exponential backoff and jitter under a :class:`RetryBudget`.

Failure model, per call:

- refused before any I/O with :class:`UpstreamUnavailable` (503) when the breaker is open or the cap is reached;
- connection errors, timeouts before the response headers and 502/503/504 are retried (at most ``retries`` times,
  while the budget allows, never once a response byte has arrived);
- connection errors, timeouts and 5xx end as :class:`UpstreamUnavailable` and count as breaker failures;
- 429 is returned as it came (not retried) but counts as a breaker failure: the upstream is saturated;
- other 4xx are the caller's problem: returned as they came, breaker success.

The credential is read once at start into a ``Secret``, which never prints its value: it
appears in no repr, log line or error message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson

from appliance.breaker import CircuitBreaker, RetryBudget
from appliance.telemetry import Metrics
from appliance.upstream_config import UpstreamConfig
from appliance.errors import ModelNotFound, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger("appliance.upstreams")

RETRY_STATUSES = frozenset({502, 503, 504})
MAX_BACKOFF_S = 30.0
# Not relayed: hop-by-hop headers, and the length/encoding of a body aiohttp has already decoded.
DROPPED_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                             "transfer-encoding", "upgrade", "content-length", "content-encoding"})
KSERVE_PASSED_HEADERS = ("Inference-Header-Content-Length", "Accept")
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class _AttemptsFailed(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass
class UpstreamResult:
    """A complete upstream answer, body and content type as they came; ``headers`` less hop-by-hop ones."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]
    input_tokens: int = 0  # from an OpenAI "usage" object when present
    output_tokens: int = 0
    cost: float = 0.0  # tokens x the configured prices


class UpstreamStream:
    """The body of a 200 streaming answer: an async iterator of raw SSE event blocks (``b"data: ...\\n\\n"``, the
    final ``data: [DONE]`` included), each yielded as soon as it has arrived, unchanged.

    ``input_tokens``, ``output_tokens`` and ``cost`` are set from a usage chunk once it has passed; ``done`` once
    ``data: [DONE]`` has. The breaker verdict is recorded and the concurrency slot released at the end of the body,
    on an error (which raises :class:`UpstreamUnavailable`), or on :meth:`aclose`; a consumer that stops early must
    call :meth:`aclose` (or use ``async with``); one dropped unclosed is released when collected, without a verdict.
    """

    def __init__(self, upstream: Upstream, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = _relayed(response.headers)
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.done = False
        self._upstream = upstream
        self._response = response
        self._buffer = b""
        self._closed = False

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            end = _EVENT_END.search(self._buffer)
            if end is not None:
                event, self._buffer = self._buffer[:end.end()], self._buffer[end.end():]
                self._inspect(event)
                return event
            if self._closed:
                raise StopAsyncIteration
            try:
                data = await self._response.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"broke off the stream ({_describe(exc, self._upstream.config.timeout_s)})"
                self._finish(False, problem)
                raise UpstreamUnavailable(f"upstream {self._upstream.name!r}: {problem}", retry_after_s=1.0) from None
            except BaseException:  # cancelled: no verdict on the upstream
                self._finish(None)
                raise
            if data:
                self._buffer += data
                continue
            tail, self._buffer = self._buffer, b""
            self._finish(True)
            if tail.strip():
                self._inspect(tail)
                return tail
            raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop early: drop the upstream connection and release the slot (the upstream answered: breaker success)."""
        self._buffer = b""
        self._finish(True)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):  # dropped without aclose(): do not leak the slot
            self._finish(None)

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _inspect(self, event: bytes) -> None:
        data = b"\n".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
        if data.strip() == b"[DONE]":
            self.done = True
        elif b'"usage"' in data:
            self.input_tokens, self.output_tokens = _usage(data)
            self.cost = self._upstream.cost(self.input_tokens, self.output_tokens)

    def _finish(self, ok: bool | None, problem: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if ok is False:
            self._upstream._observe("broke_off")
        if ok and self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
        self._upstream._release(ok, problem)


class Upstream:
    """One configured upstream: pooled client session, concurrency cap, circuit breaker, retries."""

    def __init__(self, config: UpstreamConfig, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        """``metrics`` (the server's) counts calls by outcome and retries, and follows the breaker's state."""
        self.name = config.name
        self.config = config
        self._metrics = metrics
        self.breaker = CircuitBreaker(config.failure_threshold, config.error_rate_threshold, config.error_window,
                                      config.cooldown_s, clock)
        self._budget = RetryBudget(config.retry_budget, clock)
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0
        self._last_problem = ""

    def __repr__(self) -> str:
        return (f"Upstream(name={self.name!r}, kind={self.config.kind!r}, base_url={self.config.base_url!r}, "
                f"breaker={self.breaker.state!r}, in_flight={self._in_flight})")

    @property
    def in_flight(self) -> int:
        """Calls holding a concurrency slot (a stream holds one until it ends)."""
        return self._in_flight

    def model_for(self, local_model: str) -> str | None:
        """The upstream's name for ``local_model``, or ``None`` if this upstream does not serve it."""
        models = self.config.models
        if local_model in models:
            return models[local_model]
        if "*" in models:
            return local_model if models["*"] == "*" else models["*"]
        return None

    def available(self) -> bool:
        """Whether a call now would be admitted: the breaker allows and the concurrency cap is not reached."""
        return self._in_flight < self.config.max_concurrency and self.breaker.would_allow()

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """The price of a call with these token counts."""
        return (input_tokens * self.config.price_input_per_million
                + output_tokens * self.config.price_output_per_million) / 1e6

    async def start(self) -> None:
        """Open the client session (calls open it on first use otherwise)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.config.max_concurrency)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def openai(self, path: str, payload: dict, local_model: str) -> UpstreamResult:
        """POST ``payload`` (``"model"`` rewritten to the upstream's name) to ``path``; the answer, 4xx included."""
        body, headers = self._openai_request(path, payload, local_model, stream=False)
        response, data = await self._call(self._url(path), data=body, headers=headers, stream=False)
        input_tokens, output_tokens = _usage(data) if response.status < 300 else (0, 0)
        return self._result(response, data, input_tokens, output_tokens)

    async def openai_stream(self, path: str, payload: dict, local_model: str) -> tuple[dict[str, str], UpstreamStream]:
        """POST ``payload`` with ``"stream": true``; once the upstream answered 200, its headers and the
        :class:`UpstreamStream` of its events. Other answers raise :class:`UpstreamRejected` (4xx, 429) or
        :class:`UpstreamUnavailable` (5xx, connection errors, timeouts). ``timeout_s`` bounds the wait for the
        headers and then each wait for more of the body, not the whole stream."""
        body, headers = self._openai_request(path, payload, local_model, stream=True)
        response, data = await self._call(self._url(path), data=body, headers=headers, stream=True)
        if data is not None:  # not a 200: already read and released
            result = self._result(response, data, 0, 0)
            answer = f"{response.status} {response.reason or ''}".rstrip()
            raise UpstreamRejected(f"upstream {self.name!r} answered {answer}", result)
        stream = UpstreamStream(self, response)
        return stream.headers, stream

    async def kserve_infer(self, local_model: str, body: bytes, content_type: str,
                           headers: dict[str, str]) -> UpstreamResult:
        """POST the raw KServe v2 ``body`` to ``/v2/models/<upstream model>/infer``, passing through
        ``Inference-Header-Content-Length`` and ``Accept``; the answer's body and headers as they came."""
        model = self._upstream_model(local_model)
        lowered = {key.lower(): value for key, value in headers.items()}
        sent = {"Content-Type": content_type or "application/json", **self._auth()}
        sent.update({name: lowered[name.lower()] for name in KSERVE_PASSED_HEADERS if name.lower() in lowered})
        url = self._url(f"/v2/models/{urllib.parse.quote(model, safe='')}/infer")
        response, data = await self._call(url, data=body, headers=sent, stream=False)
        return self._result(response, data, 0, 0)

    # -- one call: admission, attempts, verdict -------------------------------------------------------------------

    def _openai_request(self, path: str, payload: dict, local_model: str, stream: bool) -> tuple[bytes, dict]:
        upstream_payload = {**payload, "model": self._upstream_model(local_model)}
        if stream:
            upstream_payload["stream"] = True
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
                   **self._auth()}
        return orjson.dumps(upstream_payload), headers

    def _upstream_model(self, local_model: str) -> str:
        model = self.model_for(local_model)
        if model is None:
            raise ModelNotFound(f"upstream {self.name!r} does not serve model {local_model!r}; "
                                f"its models are: {', '.join(self.config.models)}")
        return model

    def _url(self, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"upstream path {path!r} must start with '/'")
        return self.config.base_url + path

    def _auth(self) -> dict[str, str]:
        secret = self.config.credential
        return {"Authorization": f"Bearer {secret.reveal()}"} if secret else {}

    def _result(self, response: aiohttp.ClientResponse, body: bytes, input_tokens: int,
                output_tokens: int) -> UpstreamResult:
        return UpstreamResult(status=response.status, body=body, content_type=response.headers.get("Content-Type", ""),
                              headers=_relayed(response.headers), input_tokens=input_tokens,
                              output_tokens=output_tokens, cost=self.cost(input_tokens, output_tokens))

    def _observe(self, outcome: str | None = None) -> None:
        if self._metrics is not None:
            if outcome is not None:
                self._metrics.upstream_call(self.name, outcome)
            self._metrics.upstream_breaker_state(self.name, self.breaker.state)

    def _admit(self) -> None:
        if self._in_flight >= self.config.max_concurrency:
            self._observe("refused")
            raise UpstreamUnavailable(f"upstream {self.name!r} is at its concurrency cap "
                                      f"({self.config.max_concurrency} calls in flight)", retry_after_s=1.0)
        if not self.breaker.allow():
            self._observe("refused")
            wait = self.breaker.retry_after_s()
            raise UpstreamUnavailable(f"upstream {self.name!r} is failing and its circuit breaker is "
                                      f"{self.breaker.state.replace('_', '-')} (last problem: {self._last_problem}); "
                                      f"retry in {wait:.1f} s", retry_after_s=wait)
        self._in_flight += 1
        self._budget.record_call()
        self._observe()  # allow() may have half-opened the breaker

    def _release(self, ok: bool | None, problem: str = "") -> None:
        """End an admitted call: free its slot and give the breaker its verdict (``None``: no verdict)."""
        self._in_flight -= 1
        before = self.breaker.state
        if ok is None:
            self.breaker.abandon()
            self._observe()
            return
        if not ok:
            self._last_problem = problem
        self.breaker.record(ok)
        self._observe()
        after = self.breaker.state
        if after == "open" and before != "open":
            log.warning("upstream %s: circuit breaker opened (%s); failing fast for %.1f s",
                        self.name, self._last_problem, self.config.cooldown_s)
        elif after == "closed" and before == "half_open":
            log.info("upstream %s: trial call succeeded, circuit breaker closed", self.name)

    async def _call(self, url: str, *, data: bytes, headers: dict[str, str],
                    stream: bool) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """One admitted call with its retries: the response and its body, or ``None`` as the body of a 200
        streaming response left open (its :class:`UpstreamStream` then owns the slot and the verdict)."""
        self._admit()
        verdict: bool | None = None  # None (cancelled): no verdict for the breaker
        problem = ""
        handed_off = False
        outcome = "cancelled"
        try:
            response, body = await self._attempts(url, data, headers, stream)
            verdict = response.status != 429  # a saturated upstream counts as failing; other 4xx are the caller's
            problem = "" if verdict else "answered 429 Too Many Requests"
            outcome = "ok" if response.status < 400 else "rate_limited" if response.status == 429 else "client_error"
            handed_off = body is None
            return response, body
        except _AttemptsFailed as exc:
            verdict, problem, outcome = False, exc.problem, "failed"
            raise UpstreamUnavailable(f"upstream {self.name!r}: {problem}", retry_after_s=1.0) from None
        finally:
            self._observe(outcome)
            if not handed_off:
                self._release(verdict, problem)

    async def _attempts(self, url: str, data: bytes, headers: dict[str, str],
                        stream: bool) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """Send until an answer below 500 (or a streaming 200) arrives; raise :class:`_AttemptsFailed` otherwise."""
        session = await self._session_or_start()
        limit = self.config.timeout_s
        timeout = (aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit) if stream
                   else aiohttp.ClientTimeout(total=limit))
        attempt = 1
        while True:
            try:
                async with asyncio.timeout(limit):  # until the response headers
                    response = await session.post(url, data=data, headers=headers, timeout=timeout,
                                                  allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = _describe(exc, limit)
                retryable = isinstance(exc, (aiohttp.ClientConnectionError, TimeoutError))
                reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
            else:
                if stream and response.status == 200:
                    return response, None
                try:
                    body = await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:  # after the first byte: never retried
                    raise _AttemptsFailed(f"broke off its answer ({_describe(exc, limit)})") from None
                finally:
                    response.release()
                if response.status < 500:
                    return response, body
                problem = f"answered {response.status} {response.reason or ''}".rstrip()
                retryable = response.status in RETRY_STATUSES
                reason = "status"
            if not retryable or attempt > self.config.retries or self.breaker.state == "open" \
                    or not self._budget.spend():
                raise _AttemptsFailed(f"{problem} (after {attempt} attempt{'s' if attempt > 1 else ''})")
            if self._metrics is not None:
                self._metrics.upstream_retry(self.name, reason)
            delay = min(MAX_BACKOFF_S, self.config.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            log.info("upstream %s: %s; retry %d of %d in %.3f s", self.name, problem, attempt, self.config.retries,
                     delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def _session_or_start(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            await self.start()
        assert self._session is not None
        return self._session


def _relayed(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(key): value for key, value in headers.items() if key.lower() not in DROPPED_HEADERS}


def _usage(body: bytes) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` from an OpenAI JSON body's ``usage`` object, else zeros."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0, 0
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return 0, 0

    def count(key: str) -> int:
        n = usage.get(key)
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")


def _describe(exc: BaseException, timeout_s: float) -> str:
    """A connection error or timeout in words (aiohttp's messages carry the URL, never request headers)."""
    if isinstance(exc, TimeoutError):
        return f"timed out (timeout_s = {timeout_s:g})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

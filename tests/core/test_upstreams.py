"""Cloud upstreams against real HTTP servers on loopback: an OpenAI-compatible one, a KServe v2 one, and their
failure modes (503s, slowness, a broken-off answer, a closed port)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
import time

import orjson
import pytest
from aiohttp import web

from appliance.config import ConfigError
from appliance.breaker import CircuitBreaker
from appliance.errors import UpstreamRejected, UpstreamUnavailable
from appliance.upstreams import Upstream
from appliance.upstream_config import parse_upstreams
from waiting import ManualClock

SECRET = "sk-test-0123456789abcdef"
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


class FakeServer:
    """OpenAI-compatible and KServe v2 endpoints whose behaviour each test sets."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.fail_first = 0  # answer this many calls with fail_status first
        self.fail_status = 503
        self.status = 200  # answer status once the failures are through (non-200: an OpenAI error body)
        self.delay_s = 0.0  # before the headers
        self.stall_after_headers = False
        self.gate_stream = False  # after the first event, wait for `release`
        self.release = asyncio.Event()
        self.sent: list[bytes] = []
        self.port = 0
        app = web.Application()
        app.router.add_post("/prefix/v1/chat/completions", self.openai)
        app.router.add_post("/prefix/v1/embeddings", self.openai)
        app.router.add_post("/v2/models/{model}/infer", self.infer)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True, access_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": {"message": "overloaded"}}, status=self.fail_status)
        await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response({"error": {"message": "max_tokens is too large"}}, status=self.status)
        payload = orjson.loads(body)
        if self.stall_after_headers:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"id": "partial", ')
            await asyncio.sleep(5)
            return response
        if payload.get("stream"):
            return await self.stream(request, payload["model"])
        if request.path.endswith("/embeddings"):
            return web.json_response({"object": "list", "model": payload["model"],
                                      "data": [{"embedding": [0.1, 0.2], "index": 0}],
                                      "usage": {"prompt_tokens": 7, "total_tokens": 7}})
        return web.json_response({"id": "c1", "object": "chat.completion", "model": payload["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                                  "usage": USAGE})

    async def stream(self, request: web.Request, model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [b'data: {"model": "%s", "choices": [{"delta": {"content": "%s"}}]}\n\n' % (model.encode(), word)
                  for word in (b"one", b"two", b"three")]
        events += [b'data: {"choices": [], "usage": %s}\n\n' % orjson.dumps(USAGE), b"data: [DONE]\n\n"]
        for i, event in enumerate(events):
            await response.write(event)
            self.sent.append(event)
            if i == 0 and self.gate_stream:
                await asyncio.wait_for(self.release.wait(), 5)
            else:
                await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append({"path": request.path, "headers": dict(request.headers), "body": body,
                           "model": request.match_info["model"]})
        header = b'{"model_name": "remote", "outputs": [{"name": "y", "datatype": "BYTES", "shape": [1], ' \
                 b'"parameters": {"binary_data_size": 4}}]}'
        return web.Response(body=header + b"\x00\xff\x10\x80", headers={
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})


@pytest.fixture
async def server():
    fake = await FakeServer().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def make_upstream():
    made: list[Upstream] = []

    def make(base_url: str, *, environ: dict | None = None, clock=time.monotonic, metrics=None,
             **settings) -> Upstream:
        table = {"kind": "openai", "base_url": base_url, "models": {"smollm2-135m": "gpt-4o-mini", "*": "*"},
                 "backoff_s": 0.001, **settings}
        upstream = Upstream(parse_upstreams({"cloud": table}, "test.toml", environ or {})["cloud"], clock=clock,
                            metrics=metrics)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(text: str = "hello", **extra) -> dict:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": text}], **extra}


# -- configuration -------------------------------------------------------------------------------------------------

def parse(environ: dict | None = None, **settings) -> dict:
    table = {"kind": "openai", "base_url": "https://api.example.com/", "models": {"a": "b"}, **settings}
    return parse_upstreams({"cloud": table}, "/etc/appliance.toml", environ or {})


def test_config_defaults_and_normalization():
    config = parse(timeout_s=5, price_input_per_million=0.15)["cloud"]
    assert config.base_url == "https://api.example.com"
    assert config.timeout_s == 5.0 and isinstance(config.timeout_s, float)
    assert config.retries == 2 and config.max_concurrency == 16
    assert not config.credential  # no credential at all is allowed


@pytest.mark.parametrize(("settings", "field", "words"), [
    ({"colour": "red"}, "upstreams.cloud.colour", "unknown setting"),
    ({"kind": "anthropic"}, "upstreams.cloud.kind", "one of 'openai', 'kserve'"),
    ({"base_url": "ftp://host/x"}, "upstreams.cloud.base_url", "http:// or https://"),
    ({"base_url": 8080}, "upstreams.cloud.base_url", "http:// or https://"),
    ({"timeout_s": "30"}, "upstreams.cloud.timeout_s", "a number"),
    ({"retries": -1}, "upstreams.cloud.retries", "an integer from 0 to 10"),
    ({"max_concurrency": 2.5}, "upstreams.cloud.max_concurrency", "an integer"),
    ({"error_rate_threshold": 1.5}, "upstreams.cloud.error_rate_threshold", "a number from"),
    ({"models": ["a"]}, "upstreams.cloud.models", "table of"),
    ({"models": {"a": 1}}, "upstreams.cloud.models", "table of"),
    ({"models": {}}, "upstreams.cloud.models", "non-empty"),
    ({"api_key_env": "A", "api_key_file": "/k"}, "upstreams.cloud.api_key_file", "set at most one"),
])
def test_config_errors_name_field_value_origin_and_allowed(settings, field, words):
    with pytest.raises(ConfigError) as caught:
        parse(**settings)
    message = str(caught.value)
    assert field in message and words in message and "/etc/appliance.toml" in message


def test_config_structure_errors():
    with pytest.raises(ConfigError, match=r"\[upstreams\] in t.toml must be a table"):
        parse_upstreams(["x"], "t.toml", {})
    with pytest.raises(ConfigError, match=r"\[upstreams.cloud\] in t.toml must be a table"):
        parse_upstreams({"cloud": "openai"}, "t.toml", {})
    with pytest.raises(ConfigError, match=r"upstreams.cloud.models is missing \(from t.toml\)"):
        parse_upstreams({"cloud": {"kind": "openai", "base_url": "http://h"}}, "t.toml", {})
    with pytest.raises(ConfigError, match="upstream name 'bad name'"):
        parse_upstreams({"bad name": {}}, "t.toml", {})


def test_credential_sources_and_their_errors(tmp_path):
    assert parse({"OPENAI_KEY": f"  {SECRET}\n"}, api_key_env="OPENAI_KEY")["cloud"].credential.reveal() == SECRET
    key_file = tmp_path / "key"
    key_file.write_text(f"\n{SECRET}\n")
    assert parse(api_key_file=str(key_file))["cloud"].credential.reveal() == SECRET
    with pytest.raises(ConfigError, match="upstreams.cloud.api_key_env = 'NOPE'.*environment variable NOPE is not set"):
        parse(api_key_env="NOPE")
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=f"upstreams.cloud.api_key_file = '{missing}'.*cannot read"):
        parse(api_key_file=str(missing))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        parse(api_key_file=str(tmp_path / "empty"))


def test_credential_never_shown():
    config = parse({"OPENAI_KEY": SECRET}, api_key_env="OPENAI_KEY")["cloud"]
    upstream = Upstream(config)
    for text in (repr(config), str(config), repr(dataclasses.asdict(config)), repr(upstream), str(config.credential)):
        assert SECRET not in text
    assert "OPENAI_KEY" in repr(config)
    with pytest.raises(ConfigError) as caught:  # a password in the URL is refused without echoing it
        parse(base_url=f"https://user:{SECRET}@api.example.com")
    assert SECRET not in str(caught.value) and "api_key_env" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse({"OPENAI_KEY": "sk bad"}, api_key_env="OPENAI_KEY")
    assert "sk bad" not in str(caught.value) and "whitespace" in str(caught.value)


# -- OpenAI-compatible ---------------------------------------------------------------------------------------------

async def test_openai_bearer_mapping_usage_and_cost(server, make_upstream):
    upstream = make_upstream(server.url + "/prefix/", environ={"K": SECRET}, api_key_env="K",
                             price_input_per_million=1.0, price_output_per_million=4.0)
    payload = chat()
    result = await upstream.openai("/v1/chat/completions", payload, "smollm2-135m")
    assert result.status == 200 and result.content_type.startswith("application/json")
    call = server.calls[0]
    assert call["path"] == "/prefix/v1/chat/completions"
    assert call["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert orjson.loads(call["body"])["model"] == "gpt-4o-mini"
    assert payload["model"] == "smollm2-135m"  # the caller's dict is left alone
    assert orjson.loads(result.body)["model"] == "gpt-4o-mini"  # the body as the upstream sent it
    assert (result.input_tokens, result.output_tokens) == (12, 5)
    assert result.cost == pytest.approx((12 * 1.0 + 5 * 4.0) / 1e6)
    assert "Content-Length" not in result.headers and "Content-Type" in result.headers

    embedded = await upstream.openai("/v1/embeddings", {"model": "minilm", "input": "x"}, "minilm")
    assert orjson.loads(server.calls[1]["body"])["model"] == "minilm"  # "*" passes the name through
    assert (embedded.input_tokens, embedded.output_tokens) == (7, 0)


def test_model_mapping():
    exact = Upstream(parse(models={"a": "b"})["cloud"])
    assert exact.model_for("a") == "b" and exact.model_for("c") is None
    fixed = Upstream(parse(models={"*": "gpt-4o-mini", "big": "gpt-4o"})["cloud"])
    assert fixed.model_for("anything") == "gpt-4o-mini" and fixed.model_for("big") == "gpt-4o"


async def test_no_credential_sends_no_authorization(server, make_upstream):
    upstream = make_upstream(server.url + "/prefix")
    await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert "Authorization" not in server.calls[0]["headers"]


async def test_client_error_returned_not_retried_and_breaker_success(server, make_upstream):
    server.status = 400
    upstream = make_upstream(server.url + "/prefix", failure_threshold=1)
    result = await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert result.status == 400 and b"max_tokens" in result.body
    assert len(server.calls) == 1 and upstream.breaker.state == "closed"


async def test_429_returned_and_counted_as_failure(server, make_upstream):
    server.fail_first, server.fail_status = 1, 429
    upstream = make_upstream(server.url + "/prefix", failure_threshold=1)
    result = await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert result.status == 429 and len(server.calls) == 1
    assert upstream.breaker.state == "open"


# -- streaming -----------------------------------------------------------------------------------------------------

async def test_stream_relayed_chunk_by_chunk_with_usage(server, make_upstream):
    server.gate_stream = True
    upstream = make_upstream(server.url + "/prefix", price_output_per_million=2.0)
    headers, stream = await upstream.openai_stream("/v1/chat/completions", chat(), "smollm2-135m")
    assert headers["Content-Type"].startswith("text/event-stream")
    assert orjson.loads(server.calls[0]["body"])["stream"] is True
    first = await anext(stream)
    assert first.startswith(b"data: ") and b'"one"' in first and first.endswith(b"\n\n")
    assert len(server.sent) == 1  # the server is still waiting for us: the chunk was relayed as it came
    server.release.set()
    rest = [event async for event in stream]
    assert [first, *rest] == server.sent and rest[-1] == b"data: [DONE]\n\n"
    assert b'"gpt-4o-mini"' in first  # the body as the upstream sent it
    assert (stream.input_tokens, stream.output_tokens, stream.done) == (12, 5, True)
    assert stream.cost == pytest.approx(10 / 1e6)
    assert upstream.in_flight == 0 and upstream.breaker.state == "closed"


async def test_stream_early_aclose_releases_the_slot(server, make_upstream):
    server.gate_stream = True
    upstream = make_upstream(server.url + "/prefix", max_concurrency=1)
    _, stream = await upstream.openai_stream("/v1/chat/completions", chat(), "smollm2-135m")
    await anext(stream)
    assert upstream.in_flight == 1 and not upstream.available()
    with pytest.raises(UpstreamUnavailable, match="concurrency cap") as caught:  # refused at once, not queued
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert caught.value.status == 503 and caught.value.retry_after_s == 1.0
    assert len(server.calls) == 1
    await stream.aclose()
    assert upstream.in_flight == 0 and upstream.available()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    server.gate_stream = False
    result = await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert result.status == 200


async def test_stream_dropped_without_aclose_releases_the_slot(server, make_upstream):
    server.gate_stream = True
    upstream = make_upstream(server.url + "/prefix", max_concurrency=1)
    _, stream = await upstream.openai_stream("/v1/chat/completions", chat(), "smollm2-135m")
    await anext(stream)
    del stream
    gc.collect()
    assert upstream.in_flight == 0 and upstream.available()


async def test_stream_non_200_raises_with_the_answer(server, make_upstream):
    server.status = 400
    upstream = make_upstream(server.url + "/prefix")
    with pytest.raises(UpstreamRejected) as caught:
        await upstream.openai_stream("/v1/chat/completions", chat(), "smollm2-135m")
    assert caught.value.upstream_status == 400 and b"max_tokens" in caught.value.result.body
    assert upstream.in_flight == 0 and upstream.breaker.state == "closed"


async def test_stream_stalling_mid_body_fails_without_retry(server, make_upstream):
    server.gate_stream = True  # never released: the upstream stalls after the first event
    upstream = make_upstream(server.url + "/prefix", timeout_s=0.3, retries=3, failure_threshold=1)
    _, stream = await upstream.openai_stream("/v1/chat/completions", chat(), "smollm2-135m")
    assert b'"one"' in await anext(stream)
    with pytest.raises(UpstreamUnavailable, match="broke off the stream .timed out"):
        await anext(stream)
    assert len(server.calls) == 1 and upstream.in_flight == 0 and upstream.breaker.state == "open"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


# -- retries -------------------------------------------------------------------------------------------------------

async def test_retries_on_503_then_succeeds(server, make_upstream):
    server.fail_first = 2
    upstream = make_upstream(server.url + "/prefix", retries=2)
    result = await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert result.status == 200 and len(server.calls) == 3


async def test_retries_on_503_in_streams_before_headers(server, make_upstream):
    server.fail_first = 1
    upstream = make_upstream(server.url + "/prefix", retries=1)
    _, stream = await upstream.openai_stream("/v1/chat/completions", chat(), "smollm2-135m")
    assert [event async for event in stream][-1] == b"data: [DONE]\n\n" and len(server.calls) == 2


async def test_503_after_retries_is_unavailable(server, make_upstream):
    server.fail_first = 10
    upstream = make_upstream(server.url + "/prefix", retries=1)
    with pytest.raises(UpstreamUnavailable, match=r"'cloud': answered 503 .*after 2 attempts"):
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert len(server.calls) == 2


async def test_timeout_before_headers_is_retried(server, make_upstream):
    server.delay_s = 1.0
    upstream = make_upstream(server.url + "/prefix", timeout_s=0.2, retries=1)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="timed out"):
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert len(server.calls) == 2 and time.monotonic() - started < 0.9


async def test_no_retry_after_the_first_byte(server, make_upstream):
    server.stall_after_headers = True
    upstream = make_upstream(server.url + "/prefix", timeout_s=0.3, retries=3)
    with pytest.raises(UpstreamUnavailable, match="broke off its answer"):
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert len(server.calls) == 1 and upstream.in_flight == 0


async def test_retry_budget_limits_retries(server, make_upstream):
    clock = ManualClock(1000.0)
    server.fail_first = 1000
    upstream = make_upstream(server.url + "/prefix", retries=5, retry_budget=0.0, failure_threshold=1000,
                             error_window=1000, clock=clock)
    for expected_calls in (4, 5):  # 1 + the floor of 3 retries per minute; then no retry at all
        with pytest.raises(UpstreamUnavailable):
            await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
        assert len(server.calls) == expected_calls
    clock.advance(61)  # the window slides on
    with pytest.raises(UpstreamUnavailable):
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert len(server.calls) == 9


# -- circuit breaker -----------------------------------------------------------------------------------------------

async def test_breaker_opens_on_closed_port_then_fails_fast(make_upstream):
    upstream = make_upstream(f"http://127.0.0.1:{closed_port()}", retries=0, failure_threshold=3, cooldown_s=30)
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable, match="'cloud': cannot connect to 127.0.0.1"):
            await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert upstream.breaker.state == "open" and not upstream.available()
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="circuit breaker is open") as caught:
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert time.monotonic() - started < 0.05
    assert 29 < caught.value.retry_after_s <= 30 and "cannot connect" in caught.value.message


async def test_breaker_half_opens_after_cooldown_and_closes_on_success(server, make_upstream):
    clock = ManualClock(1000.0)
    server.fail_first, server.fail_status = 2, 500
    upstream = make_upstream(server.url + "/prefix", retries=0, failure_threshold=2, cooldown_s=10, clock=clock)
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable, match="answered 500"):
            await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert upstream.breaker.state == "open"
    clock.advance(4)
    with pytest.raises(UpstreamUnavailable, match="circuit breaker") as caught:
        await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert caught.value.retry_after_s == pytest.approx(6)
    assert len(server.calls) == 2  # failed fast: no request reached the server
    clock.advance(6)
    assert upstream.breaker.state == "half_open" and upstream.available()
    result = await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
    assert result.status == 200 and upstream.breaker.state == "closed" and len(server.calls) == 3


def test_breaker_half_open_admits_one_trial_and_failure_reopens():
    clock = ManualClock(1000.0)
    breaker = CircuitBreaker(failure_threshold=1, error_rate_threshold=1.0, error_window=10, cooldown_s=5,
                             clock=clock)
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state == "open" and not breaker.allow() and breaker.retry_after_s() == 5
    clock.advance(5)
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record(False)
    assert breaker.state == "open" and breaker.retry_after_s() == 5
    clock.advance(5)
    assert breaker.allow()
    breaker.abandon()  # a cancelled trial frees the slot for another
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_opens_on_error_rate_once_the_window_is_full():
    breaker = CircuitBreaker(failure_threshold=100, error_rate_threshold=0.5, error_window=4, cooldown_s=5,
                             clock=ManualClock(1000.0))
    for ok in (False, True, False):
        breaker.record(ok)
    assert breaker.state == "closed"  # 2 of 3, but the window is not full yet
    breaker.record(True)
    assert breaker.state == "open"  # 2 of 4


# -- KServe v2 ------------------------------------------------------------------------------------------------------

async def test_kserve_binary_pass_through(server, make_upstream):
    upstream = make_upstream(server.url, kind="kserve", models={"resnet": "resnet50-v2"})
    header = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}'
    body = header + b"\x00\x00\x80\x3f"
    result = await upstream.kserve_infer("resnet", body, "application/octet-stream", {
        "inference-header-content-length": str(len(header)), "Accept": "application/octet-stream",
        "X-Other": "not passed"})
    call = server.calls[0]
    assert call["model"] == "resnet50-v2" and call["body"] == body
    assert call["headers"]["Inference-Header-Content-Length"] == str(len(header))
    assert call["headers"]["Accept"] == "application/octet-stream" and "X-Other" not in call["headers"]
    assert call["headers"]["Content-Type"] == "application/octet-stream"
    assert result.status == 200 and result.content_type == "application/octet-stream"
    split = int(result.headers["Inference-Header-Content-Length"])
    assert orjson.loads(result.body[:split])["model_name"] == "remote" and result.body[split:] == b"\x00\xff\x10\x80"
    assert result.cost == 0.0


# -- the credential in logs and errors -----------------------------------------------------------------------------

async def test_credential_not_in_logs_or_errors(server, make_upstream, caplog):
    caplog.set_level(logging.DEBUG)
    environ = {"K": SECRET}
    server.fail_first = 4
    flaky = make_upstream(server.url + "/prefix", environ=environ, api_key_env="K", retries=1, failure_threshold=2)
    dead = make_upstream(f"http://127.0.0.1:{closed_port()}", environ=environ, api_key_env="K", retries=1,
                         failure_threshold=1)
    messages = []
    for upstream in (flaky, flaky, flaky, dead, dead):
        with pytest.raises(UpstreamUnavailable) as caught:
            await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")
        messages.append(str(caught.value))
    assert any("circuit breaker opened" in record.getMessage() for record in caplog.records)
    assert any("retry 1 of 1" in record.getMessage() for record in caplog.records)
    assert all(SECRET not in text for text in [*messages, caplog.text])
    assert server.calls[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


async def test_calls_retries_and_the_breaker_are_in_the_metrics(server, make_upstream):
    from appliance.telemetry import Metrics

    metrics = Metrics()
    value = metrics.registry.get_sample_value
    server.fail_first = 2
    upstream = make_upstream(server.url + "/prefix", retries=2, metrics=metrics)
    assert (await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")).status == 200
    assert value("appliance_upstream_requests_total", {"upstream": "cloud", "outcome": "ok"}) == 1
    assert value("appliance_upstream_retries_total", {"upstream": "cloud", "reason": "status"}) == 2
    assert value("appliance_upstream_breaker_state", {"upstream": "cloud"}) == 0
    broken = make_upstream(f"http://127.0.0.1:{closed_port()}", retries=1, failure_threshold=2, cooldown_s=30,
                           metrics=Metrics())
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            await broken.openai("/v1/chat/completions", chat(), "smollm2-135m")
    seen = broken._metrics.registry.get_sample_value
    assert seen("appliance_upstream_requests_total", {"upstream": "cloud", "outcome": "failed"}) == 2
    assert seen("appliance_upstream_requests_total", {"upstream": "cloud", "outcome": "refused"}) == 1
    assert seen("appliance_upstream_retries_total", {"upstream": "cloud", "reason": "connect"}) == 2
    assert seen("appliance_upstream_breaker_state", {"upstream": "cloud"}) == 2  # open


async def test_a_429_is_counted_as_rate_limited(server, make_upstream):
    from appliance.telemetry import Metrics

    metrics = Metrics()
    server.status = 429
    upstream = make_upstream(server.url + "/prefix", metrics=metrics)
    assert (await upstream.openai("/v1/chat/completions", chat(), "smollm2-135m")).status == 429
    assert metrics.registry.get_sample_value("appliance_upstream_requests_total",
                                             {"upstream": "cloud", "outcome": "rate_limited"}) == 1

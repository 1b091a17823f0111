"""OpenTelemetry traces over real HTTP on loopback: the span tree of a request (a SERVER span, a child per step),
its attributes, cache hits, refused requests, a client's traceparent, sampling, a streamed generation whose execute
step lasts as long as the stream, what never goes into a span (the prompt, error messages), tracing off (no header,
no import), the settings' checks, the OTLP exporter flushed at stop, once per worker process, and the export
process: what it is sent is exported or counted as dropped, and it is started again when it dies."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import requests
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import tiny_models
from appliance.api.middleware import ANONYMOUS, TRACING
from appliance.config import ConfigError, TracingConfig, load_config
from appliance.keys import KeyStore
from appliance.otlp_encoding import OtlpEncoder
from appliance.otlp_http import OtlpHttpSender, OtlpHttpSettings
from appliance.trace_export import ProcessSink, RecordingSink, SpanMaker, resource_of
from appliance.tracing import RequestSpans, Tracing
from appliance.types import Trace, Usage
from conftest import RunningServer, free_port, make_config
from fake_decoders import FixedCacheDecoder
from waiting import wait_until

ADD_ONE = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
INFER = "/v2/models/add_one/infer"
MARKER = "zq7MARKERxk"  # sent as input; must appear in no span
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
STEP_DELAY_S = 0.02  # each decoder call of the tiny generative model


@pytest.fixture()
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def traced(server_factory, repo: Path, exporter: InMemorySpanExporter, **options) -> RunningServer:
    """A server with tracing on whose spans go to ``exporter``."""
    tracing = {"enabled": True, **options.pop("tracing", {})}
    return server_factory(repo, tracing=tracing, span_exporter=lambda config: exporter, **options)


def ids(response: requests.Response) -> tuple[int, int]:
    """The trace id and span id of a response's ``traceparent``."""
    version, trace_id, span_id, flags = response.headers["traceparent"].split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and len(flags) == 2
    return int(trace_id, 16), int(span_id, 16)


def sampled(response: requests.Response) -> bool:
    """The ``traceparent``'s sampled flag (bit 0; trace-context level 2 may set bit 1, "random", too)."""
    return bool(int(response.headers["traceparent"].rsplit("-", 1)[1], 16) & 1)


def spans_of(running: RunningServer, exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    """The exported spans of one trace, once its SERVER span has ended (it ends as the handler returns, which
    for a stream is after the client read its last byte)."""
    def finished() -> list[ReadableSpan] | None:
        running.app[TRACING].flush()
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        return spans if any(s.kind == SpanKind.SERVER for s in spans) else None

    return wait_until(finished, 10, "the request's span to be exported")


def tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The SERVER span and its children in the order they started; every span is one of them."""
    (root,) = [s for s in spans if s.kind == SpanKind.SERVER]
    children = sorted((s for s in spans if s is not root), key=lambda s: s.start_time)
    for child in children:
        assert child.parent is not None and child.parent.span_id == root.context.span_id, child.name
        assert child.kind == SpanKind.INTERNAL and root.start_time <= child.start_time <= child.end_time
        assert child.end_time <= root.end_time, child.name
    return root, children


def every_text(spans: list[ReadableSpan]) -> str:
    """Everything the spans carry, as one text: names, attributes, events, status descriptions, resources."""
    parts = []
    for span in spans:
        parts += [span.name, str(span.status.description), json.dumps(dict(span.attributes or {}), default=str),
                  json.dumps(dict(span.resource.attributes), default=str)]
        for event in span.events:
            parts += [event.name, json.dumps(dict(event.attributes or {}), default=str)]
    return "\n".join(parts)


def test_an_infer_request_is_a_server_span_with_a_child_per_step(standard_repo, server_factory, exporter, tmp_path):
    _, token = KeyStore(tmp_path / "state0" / "keys.json").create(name="web", tenant="shop", lane="batch")
    running = traced(server_factory, standard_repo, exporter)
    response = requests.post(running.url + INFER, json=ADD_ONE, headers={"Authorization": f"Bearer {token}"},
                             timeout=10)
    assert response.status_code == 200
    trace_id, span_id = ids(response)
    root, children = tree(spans_of(running, exporter, trace_id))
    assert [c.name for c in children] == ["authenticate", "route", "cache", "admit", "execute", "account"]
    assert root.context.span_id == span_id and root.parent is None  # the header names this request's span
    assert root.name == "POST /v2/models/{model}/infer"
    attributes = root.attributes
    assert attributes["http.request.method"] == "POST" and attributes["http.route"] == "/v2/models/{model}/infer"
    assert attributes["http.response.status_code"] == 200
    assert attributes["appliance.request_id"] == response.headers["x-request-id"]
    assert (attributes["appliance.model"], attributes["appliance.version"], attributes["appliance.place"]) == (
        "add_one", "1", "local")
    assert attributes["appliance.route.reason"] == "named in the request"
    assert attributes["appliance.route.kind"] == "named"
    assert attributes["appliance.tenant"] == "shop" and attributes["appliance.lane"] == "batch"
    assert attributes["appliance.tokens.prompt"] == 0 and attributes["appliance.cost"] == 0.0
    assert attributes["appliance.compute_s"] > 0 and attributes["appliance.batch_size"] >= 1
    assert token not in every_text(children + [root])  # the tenant, never the key
    assert children[4].attributes["appliance.place"] == "local"
    assert root.status.status_code == StatusCode.UNSET
    assert all(c.status.status_code == StatusCode.UNSET for c in children)
    assert root.resource.attributes["service.name"] == "appliance"
    assert root.resource.attributes["process.pid"] == os.getpid()  # this test's server runs in a thread here


def test_a_cache_hit_is_looked_up_and_accounted_but_not_executed(standard_repo, server_factory, exporter):
    running = traced(server_factory, standard_repo, exporter, cache={"enabled": True})
    first = requests.post(running.url + INFER, json=ADD_ONE, timeout=10)
    second = requests.post(running.url + INFER, json=ADD_ONE, timeout=10)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert ids(first)[0] != ids(second)[0]  # one trace per request
    _, missed = tree(spans_of(running, exporter, ids(first)[0]))
    assert [c.name for c in missed] == ["authenticate", "route", "cache", "admit", "execute", "account"]
    root, children = tree(spans_of(running, exporter, ids(second)[0]))
    assert [c.name for c in children] == ["authenticate", "route", "cache", "account"]
    assert root.attributes["appliance.cache"] == "hit" and root.attributes["appliance.place"] == "cache"


def test_refused_requests_keep_their_status_and_name_the_error_not_its_message(standard_repo, server_factory,
                                                                               exporter, tmp_path):
    _, token = KeyStore(tmp_path / "state0" / "keys.json").create(name="web", tenant="shop")
    running = traced(server_factory, standard_repo, exporter)
    unknown = requests.post(running.url + INFER, json=ADD_ONE, headers={"Authorization": f"Bearer {MARKER}"},
                            timeout=10)
    assert unknown.status_code == 401
    root, children = tree(spans_of(running, exporter, ids(unknown)[0]))
    assert [c.name for c in children] == ["authenticate"]
    assert root.attributes["http.response.status_code"] == 401 and root.attributes["error.type"] == "Unauthorized"
    assert root.status.status_code == StatusCode.UNSET  # a 4xx is the client's, not the server's, error
    assert children[0].status.status_code == StatusCode.ERROR
    assert children[0].status.description == children[0].attributes["error.type"] == "Unauthorized"
    # The message quotes the header's value back to the client; the span must not.
    bad_lane = requests.post(running.url + INFER, json=ADD_ONE, timeout=10,
                             headers={"Authorization": f"Bearer {token}", "x-appliance-lane": MARKER})
    assert bad_lane.status_code == 400 and MARKER in bad_lane.text
    spans = spans_of(running, exporter, ids(bad_lane)[0])
    root, _ = tree(spans)
    assert root.attributes["http.response.status_code"] == 400 and root.attributes["error.type"] == "BadRequest"
    assert MARKER not in every_text(spans)


def test_a_bad_input_fails_its_step_and_a_server_error_fails_the_request(standard_repo, server_factory, exporter):
    running = traced(server_factory, standard_repo, exporter)
    wrong = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    response = requests.post(running.url + INFER, json=wrong, timeout=10)
    assert response.status_code == 400
    root, children = tree(spans_of(running, exporter, ids(response)[0]))
    assert [c.name for c in children] == ["authenticate", "route"]  # the model's check is part of resolving
    assert children[1].status.status_code == StatusCode.ERROR and children[1].status.description == "BadRequest"
    missing = requests.post(f"{running.url}/v2/models/nothing/infer", json=ADD_ONE, timeout=10)
    assert missing.status_code == 404
    root, _ = tree(spans_of(running, exporter, ids(missing)[0]))
    assert root.attributes["error.type"] == "ModelNotFound" and root.status.status_code == StatusCode.UNSET


def test_a_client_traceparent_continues_its_trace(standard_repo, server_factory, exporter):
    running = traced(server_factory, standard_repo, exporter)
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"}
    response = requests.post(running.url + INFER, json=ADD_ONE, headers=headers, timeout=10)
    trace_id, span_id = ids(response)
    assert trace_id == int(CLIENT_TRACE, 16) and span_id != int(CLIENT_SPAN, 16)
    assert sampled(response)
    root, children = tree(spans_of(running, exporter, trace_id))
    assert root.parent is not None and root.parent.span_id == int(CLIENT_SPAN, 16) and root.parent.is_remote
    assert root.context.span_id == span_id and root.context.trace_state.get("vendor") == "abc"
    assert len(children) == 6
    # A client's unsampled trace is continued (its id passed on) but not recorded; a malformed one is ignored.
    unsampled = requests.post(running.url + INFER, json=ADD_ONE, timeout=10,
                              headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert ids(unsampled)[0] == int(CLIENT_TRACE, 16) and not sampled(unsampled)
    malformed = requests.post(running.url + INFER, json=ADD_ONE, timeout=10,
                              headers={"traceparent": f"00-{CLIENT_TRACE}-nothex-01"})
    assert malformed.status_code == 200 and ids(malformed)[0] != int(CLIENT_TRACE, 16) and sampled(malformed)
    tree(spans_of(running, exporter, ids(malformed)[0]))
    assert {s.context.span_id for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER} == {
        span_id, ids(malformed)[1]}


def test_sampling_follows_the_ratio_for_new_traces_and_the_client_for_its_own(standard_repo, server_factory,
                                                                              exporter):
    running = traced(server_factory, standard_repo, exporter, tracing={"sample_ratio": 0.0})
    new = requests.post(running.url + INFER, json=ADD_ONE, timeout=10)
    assert new.status_code == 200 and not sampled(new)  # its ids are told, its spans not recorded
    continued = requests.post(running.url + INFER, json=ADD_ONE, timeout=10,
                              headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    tree(spans_of(running, exporter, ids(continued)[0]))
    assert not [s for s in exporter.get_finished_spans() if s.context.trace_id == ids(new)[0]]


def test_new_traces_are_capped_per_second_and_a_clients_sampled_trace_never_is(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("appliance.tracing.time.monotonic", lambda: clock[0])
    tracing = Tracing(TracingConfig(enabled=True, max_traces_per_second=5), sink=RecordingSink())
    asyncio.run(tracing.start())

    def recorded(count: int, headers: dict[str, str] | None = None) -> int:
        return sum(isinstance(tracing.begin("POST", "/r", "/r", "i", headers or {}), RequestSpans)
                   for _ in range(count))

    assert recorded(20) == 5  # a second's worth at once, then sampled out
    client = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    assert recorded(20, client) == 20  # the client's decision holds over the cap
    clock[0] += 0.5
    assert recorded(20) == 2  # refilled as time passes (2.5 new traces' worth)
    clock[0] += 60
    assert recorded(20) == 5  # never more than a second's worth saved up
    uncapped = Tracing(TracingConfig(enabled=True, max_traces_per_second=0), sink=RecordingSink())
    asyncio.run(uncapped.start())
    assert all(isinstance(uncapped.begin("GET", "/r", "/r", "i", {}), RequestSpans) for _ in range(2000))


# -- a streamed generation, on a tiny generative model whose decoder is slow on purpose ----------------------------

WORDS = tiny_models.WORDS


class SlowDecoder(FixedCacheDecoder):
    """A :class:`~appliance.engines.base.Decoder` that always favours one word, taking ``STEP_DELAY_S`` a call and
    noting when each call ended (``time.time_ns``, the clock spans use)."""

    description = "slow fake decoder"

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__(rows, capacity)
        self.calls: list[int] = []

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        time.sleep(STEP_DELAY_S)
        logits = np.zeros((len(input_ids), len(WORDS)), np.float32)
        logits[:, 5] = 10.0
        self.calls.append(time.time_ns())
        return logits


@pytest.fixture(scope="module")
def generative_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-gen``: a word-level tokenizer, a chat template that joins the messages, no weights."""
    root = tmp_path_factory.mktemp("gen-repo")
    tiny_models.write_word_generator(root, "tiny-gen", 'task = "generate"\n[batching]\nmax_batch_size = 0\n'
                                     "[tokenizer]\nmax_seq_length = 64\n[generation]\nmax_running = 2\n"
                                     "kv_capacity = 64\nprefill_chunk = 64\n[warmup]\nruns = 0\n")
    return root


def test_a_streamed_generation_executes_until_its_stream_closes(generative_repo, server_factory, exporter):
    made: list[SlowDecoder] = []

    def decoder_factory(spec, config, generation, limits) -> SlowDecoder:
        made.append(SlowDecoder(limits.slots, limits.capacity))
        return made[-1]

    running = traced(server_factory, generative_repo, exporter, decoder_factory=decoder_factory)
    tokens = 8
    body = {"model": "tiny-gen", "messages": [{"role": "user", "content": f"w1 w2 {MARKER} w3"}],
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}, "stop": [MARKER]}
    with requests.post(f"{running.url}/v1/chat/completions", json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200 and response.headers["Content-Type"] == "text/event-stream"
        trace_id, span_id = ids(response)  # on a stream's headers too, which go before the first chunk
        events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == tokens
    spans = spans_of(running, exporter, trace_id)
    root, children = tree(spans)
    assert root.context.span_id == span_id and root.name == "POST /v1/chat/completions"
    assert [c.name for c in children] == ["authenticate", "route", "cache", "admit", "execute", "account"]
    execute, account = children[4], children[5]
    steps = [at for at in made[0].calls if at >= execute.start_time]  # not the warm-up's calls
    assert len(steps) >= tokens
    # The handler got its stream back before the first step; execute ends when the stream closes, after the last.
    assert execute.end_time >= steps[-1] and account.start_time >= steps[-1]
    assert execute.end_time - execute.start_time >= (tokens - 1) * STEP_DELAY_S * 1e9
    assert root.attributes["appliance.tokens.prompt"] == usage["prompt_tokens"] == 4
    assert root.attributes["appliance.tokens.completion"] == tokens
    assert root.attributes["appliance.cache"] == "bypass"
    assert MARKER not in every_text(spans)  # neither the prompt nor the stop string


# -- tracing off, settings, and the OTLP exporter in the serving processes -----------------------------------------

def test_tracing_off_sends_no_header_and_never_imports_opentelemetry(server, standard_repo, tmp_path):
    response = requests.post(server.url + INFER, json=ADD_ONE, timeout=10)
    assert response.status_code == 200 and "traceparent" not in response.headers
    script = f"""
import asyncio, sys
import aiohttp
from aiohttp import web
from appliance.app import create_app
from appliance.config import load_config

async def main():
    config = load_config(None, {{"APPLIANCE_PATHS_MODEL_REPOSITORY": {str(standard_repo)!r},
                                "APPLIANCE_PATHS_STATE_DIR": {str(tmp_path / "state")!r},
                                "APPLIANCE_ONNXRUNTIME_INTRA_OP_THREADS": "1",
                                "APPLIANCE_SERVER_ACCESS_LOG": "false"}})
    runner = web.AppRunner(create_app(config, gpu_probe=lambda: None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{{port}}{INFER}", json={ADD_ONE!r}) as response:
            assert response.status == 200, response.status
            assert "traceparent" not in response.headers
    await runner.cleanup()
    loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
    assert not loaded, loaded
    print("clean")

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1:] == ["clean"], result.stderr[-2000:]


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("APPLIANCE_TRACING_SAMPLE_RATIO", "1.5", "tracing.sample_ratio = 1.5 (from environment variable "
                                              "APPLIANCE_TRACING_SAMPLE_RATIO) is not allowed: expected a number "
                                              "from 0 to 1"),
    ("APPLIANCE_TRACING_ENDPOINT", "localhost:4318", "is not an http or https URL"),
    ("APPLIANCE_TRACING_ENDPOINT", "http://collector:4318",
     "set it to 'http://collector:4318/v1/traces'"),
    ("APPLIANCE_TRACING_SERVICE_NAME", "", "tracing.service_name = ''"),
    ("APPLIANCE_TRACING_ENABLED", "sometimes", "expected true or false"),
])
def test_bad_tracing_settings_say_what_to_change(variable, value, says):
    with pytest.raises(ConfigError) as error:
        load_config(None, {"APPLIANCE_TRACING_ENABLED": "true", variable: value})
    assert says in str(error.value)


def test_tracing_is_off_unless_enabled_and_defaults_to_the_standard_collector():
    tracing = load_config(None, {}).tracing
    assert not tracing.enabled and tracing.endpoint == "http://localhost:4318/v1/traces"
    assert tracing.service_name == "appliance" and tracing.sample_ratio == 1.0 and tracing.max_traces_per_second == 200
    assert "[tracing]" in load_config(None, {}).to_toml()


class OtlpSink:
    """A stand-in OTLP/HTTP collector on loopback: keeps each export it is sent (decompressed) and answers 200, or
    the statuses in ``refusals`` first, one per export; ``headers`` holds each export's request headers."""

    def __init__(self) -> None:
        self.exports: list[tuple[str, str, bytes]] = []  # path, content type, body
        self.headers: list[dict[str, str]] = []
        self.refusals: list[int] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.headers.append({key.lower(): value for key, value in self.headers.items()})
                if sink.refusals:
                    self.send_response(sink.refusals.pop(0))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                sink.exports.append((self.path, self.headers["Content-Type"], body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[dict, object]]:
        """Every span received, with its resource's attributes."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        found = []
        for path, content_type, body in self.exports:
            assert path == "/v1/traces" and content_type == "application/x-protobuf"
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value for a in resource_spans.resource.attributes}
                found += [(resource, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return found


@pytest.fixture()
def sink() -> Iterator[OtlpSink]:
    running = OtlpSink()
    yield running
    running.server.shutdown()


def test_the_otlp_exporter_sends_what_is_pending_when_the_server_stops(standard_repo, tmp_path, sink):
    config = make_config(standard_repo, tmp_path / "state", tracing={"enabled": True, "endpoint": sink.endpoint})
    running = RunningServer(config).start()
    try:
        response = requests.post(running.url + INFER, json=ADD_ONE, timeout=10)
        assert response.status_code == 200
    finally:
        running.stop()  # well within the batch processor's 5 s delay: only the flush at shutdown sends it
    names = {span.name for _, span in sink.spans() if span.trace_id == ids(response)[0].to_bytes(16, "big")}
    assert names == {"POST /v2/models/{model}/infer", "authenticate", "route", "cache", "admit", "execute", "account"}


def test_each_worker_process_makes_its_own_provider(tmp_path, sink):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, tiny_models.BATCHED.format(max_batch=8, delay_us=0),
                              tiny_models.add_constant)
    port = free_port()
    environ = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo),
               "APPLIANCE_PATHS_STATE_DIR": str(tmp_path / "state"), "APPLIANCE_SERVER_PORT": str(port),
               "APPLIANCE_SERVER_WORKERS": "2", "APPLIANCE_SERVER_ACCESS_LOG": "false",
               "APPLIANCE_TRACING_ENABLED": "true", "APPLIANCE_TRACING_ENDPOINT": sink.endpoint}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=environ,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, 180, "a worker to become ready")

        def from_both() -> set[int] | None:
            # The first worker answers before the second listens; a new connection each time then reaches either.
            for _ in range(4):
                assert requests.post(url + INFER, json=ADD_ONE, timeout=10).status_code == 200
            time.sleep(0.1)
            pids = {resource["process.pid"].int_value for resource, _ in sink.spans()}
            return pids if len(pids) >= 2 else None

        # Each worker's batch processor sends within its 5 s delay.
        seen = wait_until(from_both, 60, "spans from both workers")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert len(seen) == 2 and process.pid not in seen  # the supervisor makes no provider; each worker its own


# -- the export process: what it was sent is exported, or counted as dropped -----------------------------------------

def packed_requests(count: int) -> tuple[list[bytes], set[bytes]]:
    """``count`` ended requests' records as a serving process packs them (two steps each), and their trace ids."""
    ended: list[bytes] = []
    trace_ids = set()
    for index in range(count):
        trace_id = random.getrandbits(128) | 1
        spans = RequestSpans(ended.append, msgpack.packb, trace_id, random.getrandbits(64) | 1, None, "",
                             ("POST", "/v2/models/{model}/infer", "/v2/models/m/infer", f"r{index}"))
        with spans.step("route"):
            pass
        with spans.step("execute", {"appliance.place": "local"}):
            pass
        spans.end(200, Trace(model="m", version="1", place="local"), ANONYMOUS)
        trace_ids.add(trace_id.to_bytes(16, "big"))
    return ended, trace_ids


def test_a_request_records_each_step_once_whether_they_overlap_or_are_ended_twice():
    ended: list[bytes] = []
    spans = RequestSpans(ended.append, msgpack.packb, 7, 9, None, "", ("POST", "/x", "/x", "r"))
    with spans.step("route"):
        pass
    execute = spans.step("execute", {"appliance.place": "local"})
    with spans.step("cache"):  # opened while execute is: its own record
        pass
    execute.end()
    with spans.step("account"):  # after an end(): a holder that ends execute again must not end this one
        execute.end(ValueError("late"))
    execute.end(ValueError("later"))
    with pytest.raises(KeyError), spans.step("admit"):
        raise KeyError("x")
    spans.end(200, Trace(), ANONYMOUS)
    steps = msgpack.unpackb(ended[0])[7]
    assert [(name, error) for name, _, _, _, error in steps] == [
        ("route", None), ("cache", None), ("execute", None), ("account", None), ("admit", "KeyError")]
    assert all(0 < start <= end for _, start, end, _, _ in steps)
    assert steps[2][3] == {"appliance.place": "local"} and steps[0][3] is None


def server_spans(sink: OtlpSink) -> list[object]:
    return [span for _, span in sink.spans() if span.kind == span.SPAN_KIND_SERVER]


def test_the_export_process_exports_what_it_was_sent_and_outlives_a_sigterm(sink):
    records, trace_ids = packed_requests(300)
    dropped: list[int] = []

    async def scenario() -> int:
        export = ProcessSink(TracingConfig(enabled=True, endpoint=sink.endpoint), 4242, dropped.append)
        await export.start()
        export.send(records[:150])
        await export.ready()
        os.kill(export.pid, signal.SIGTERM)  # a service stop signals every process of the unit
        await asyncio.sleep(0.3)
        export.send(records[150:])
        pid = export.pid
        await export.stop()  # the socket closes: the export process sends what it holds and exits
        return pid

    pid = asyncio.run(scenario())
    spans = sink.spans()
    assert {span.trace_id for span in server_spans(sink)} == trace_ids and not dropped
    assert len(spans) == 3 * 300 and {resource["process.pid"].int_value for resource, _ in spans} == {4242}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # it exited and was reaped


def test_an_export_process_that_falls_behind_makes_the_server_drop_and_count_traces_not_wait(sink):
    dropped: list[int] = []

    async def scenario() -> int:
        export = ProcessSink(TracingConfig(enabled=True, endpoint=sink.endpoint), 1, dropped.append,
                             max_unsent_bytes=64 << 10)
        await export.start()
        os.kill(export.pid, signal.SIGSTOP)  # as if starved of CPU
        sent = 0
        try:
            while not dropped:
                assert sent < 100_000, "the writes never backed up"
                records, _ = packed_requests(200)
                started = time.perf_counter()
                export.send(records)
                assert time.perf_counter() - started < 0.1  # never waits for the export process
                sent += len(records)
                await asyncio.sleep(0.01)  # the event loop writes what the socket takes
            for _ in range(3):  # and goes on dropping while it stays behind
                export.send(packed_requests(200)[0])
                sent += 200
        finally:
            os.kill(export.pid, signal.SIGCONT)
        await export.stop()
        return sent

    sent = asyncio.run(scenario())
    exported = len(server_spans(sink))
    assert sum(dropped) >= 600 and exported > 0
    assert exported + sum(dropped) == sent  # each request's spans either exported or counted: none lost silently


def test_an_export_process_that_dies_is_counted_and_started_again(sink):
    dropped: list[int] = []

    async def scenario() -> None:
        export = ProcessSink(TracingConfig(enabled=True, endpoint=sink.endpoint), 1, dropped.append,
                             restart_after_s=0.0)
        await export.start()
        first = export.pid
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.3)
        export.send(packed_requests(5)[0])  # refused, counted, and a new export process started
        await wait_for_async(lambda: export.pid != first and export._restart is None)
        records, trace_ids = packed_requests(5)
        export.send(records)
        await export.stop()
        assert {span.trace_id for span in server_spans(sink)} == trace_ids

    asyncio.run(scenario())
    assert dropped == [5]


async def wait_for_async(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_server_counts_the_traces_it_dropped_in_its_metrics(standard_repo, server_factory, sink):
    running = server_factory(standard_repo, tracing={"enabled": True, "endpoint": sink.endpoint})
    assert "appliance_traces_dropped_total 0.0" in requests.get(running.url + "/metrics", timeout=10).text


# -- OTLP: the export process's encoding is the SDK's; its sending honours the OTLP settings and retries ----------

def varied_records() -> list[tuple]:
    """Records of requests as unlike as the server makes them: new and continued traces (with a tracestate), a
    failed request and step, steps with and without attributes, attribute values of every type the record holds."""
    ended: list[bytes] = []
    usage = Usage(0.00025, 0.0125, 3)
    for index in range(6):
        continued = index % 2 == 1
        parent_id = random.getrandbits(64) | 1 if continued else None
        spans = RequestSpans(ended.append, msgpack.packb, random.getrandbits(128) | 1, random.getrandbits(64) | 1,
                             parent_id, "vendor=a1,other=b2" if continued else "",
                             ("POST", "/v1/chat/completions" if index % 3 else "", f"/p/{index}", f"r{index}"))
        with spans.step("authenticate"):
            pass
        with spans.step("execute", {"appliance.place": "local", "appliance.model": f"m{index % 2}"}):
            pass
        if index == 4:
            try:
                with spans.step("account"):
                    raise KeyError("never recorded")
            except KeyError as error:
                spans.failed(error)
        spans.settled(12 + index, index, 0.5 * index, 0.25 if index == 2 else 0.0)
        spans.end(500 if index == 4 else 200, Trace(model="m", version="3", place="local", route="complexity",
                                                   route_kind="score", cache="miss", usage=usage), ANONYMOUS)
    return [msgpack.unpackb(record, use_list=False) for record in ended]


def without_step_ids(encoded: bytes):
    """An export with its INTERNAL spans' ids cleared (each encoder makes its own random ones)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(encoded)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if span.kind == span.SPAN_KIND_INTERNAL:
                    assert len(span.span_id) == 8 and span.span_id != bytes(8)
                    span.span_id = b""
    return request


def test_the_export_process_encodes_the_spans_the_sdk_would():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    records = varied_records()
    resource = resource_of(TracingConfig(enabled=True, service_name="box"), 77)
    reference = encode_spans(SpanMaker(resource).spans(records)).SerializeToString()
    encoder = OtlpEncoder(resource, "appliance")
    ours = encoder.encode(records)
    assert without_step_ids(ours) == without_step_ids(reference)
    spans = [span for scope in without_step_ids(ours).resource_spans[0].scope_spans for span in scope.spans]
    assert len(spans) == 6 * 3 + 1 and {span.status.code for span in spans} == {0, 2}  # not a vacuous match
    assert without_step_ids(encoder.encode(records)) == without_step_ids(reference)  # from its cached values too


def test_attribute_values_that_are_equal_keep_their_own_types():
    encoder = OtlpEncoder(resource_of(TracingConfig(enabled=True), 1), "appliance")
    values = [encoder._attribute("k", value).value for value in (1, 1.0, True, "1")]
    assert [value.WhichOneof("value") for value in values] == ["int_value", "double_value", "bool_value",
                                                               "string_value"]


def test_otlp_settings_come_from_the_environment_signal_first():
    settings = OtlpHttpSettings.from_environment("http://c:4318/v1/traces", {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20general,x-b=2",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20traces",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "GZIP",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem"})
    assert settings.headers == {"authorization": "Bearer traces"} and settings.timeout_s == 3.0
    assert settings.compression == "gzip" and settings.certificate == "/etc/ca.pem" and settings.client_key is None
    unusable = OtlpHttpSettings.from_environment("http://c:4318/v1/traces", {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
                                                                            "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"})
    assert unusable.timeout_s == 10.0 and unusable.compression == "none"


def test_the_sender_compresses_sends_the_headers_and_retries_what_may_pass_later(sink):
    waits: list[float] = []
    sender = OtlpHttpSender(OtlpHttpSettings(sink.endpoint, {"authorization": "Bearer t"}, timeout_s=30,
                                             compression="gzip"), sleep=waits.append)
    body = OtlpEncoder(resource_of(TracingConfig(enabled=True), 5), "appliance").encode(varied_records())
    sink.refusals = [503, 429]
    assert sender.send(body)
    assert len(sink.headers) == 3 and len(waits) == 2  # waited before each retry
    assert all(h["authorization"] == "Bearer t" and h["content-encoding"] == "gzip" for h in sink.headers)
    assert [export[2] for export in sink.exports] == [body] and len(server_spans(sink)) == 6
    sink.refusals = [400]  # the collector will never take it: dropped at once, the next export goes on
    assert not sender.send(body) and len(waits) == 2
    assert sender.send(body) and len(sink.exports) == 2
    sender.close()


def test_the_sender_gives_up_on_a_collector_that_is_not_there_within_its_timeout():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    waits: list[float] = []
    sender = OtlpHttpSender(OtlpHttpSettings(f"http://127.0.0.1:{port}/v1/traces", timeout_s=5), sleep=waits.append,
                            clock=lambda: sum(waits))  # time passes only while it waits
    assert not sender.send(b"")
    assert len(waits) >= 2 and sum(waits) < 5  # tried again, and stopped before the timeout

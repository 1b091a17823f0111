"""Errors in one place: undecodable bodies, a feature that is off, one status-to-type table for JSON and streams,
and upstream failures on requests the appliance sent to the cloud (502 naming the upstream, never its 401/404)."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Iterator

import openai
import orjson
import pytest
import requests
from aiohttp import web

from appliance.api.errors import error_response, stream_error
from appliance.errors import (BadRequest, DeadlineExceeded, Forbidden, ModelNotFound, RateLimited, Unauthorized,
                              UpstreamFailed, openai_error_type)
from appliance.keys import KeyStore
from appliance.config import load_config
from conftest import RunningServer

ADD_ONE = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
COMPLEX = ("Explain step by step why this Python function is slow, compare two fixes and analyze the trade-offs: "
           "```python\ndef total(xs):\n    return sum([x * x for x in xs])\n```\nThen solve 12 * 7 + 3 = ? and "
           "prove the result.")


@pytest.mark.parametrize("error", [BadRequest("x"), Unauthorized("x"), Forbidden("x"), ModelNotFound("x"),
                                   RateLimited("x"), DeadlineExceeded("x"), UpstreamFailed("x")])
def test_json_bodies_and_stream_events_share_one_type_table(error):
    body = orjson.loads(error_response(error.status, error.message, openai=True).body)["error"]
    event = orjson.loads(stream_error(error).removeprefix(b"data: "))["error"]
    assert body["type"] == event["type"] == openai_error_type(error.status)
    assert event["code"] == error.status and body["message"] == event["message"] == "x"


def test_undecodable_bodies_are_400_on_v2_and_v1(server):
    broken = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    v2 = requests.post(f"{server.url}/v2/models/add_one/infer", data=b"not gzip at all", headers=broken, timeout=10)
    assert v2.status_code == 400 and "Content-Encoding 'gzip'" in v2.json()["error"]
    v1 = requests.post(f"{server.url}/v1/embeddings", data=b"\x1f\x8b garbage", headers=broken, timeout=10)
    assert v1.status_code == 400 and v1.json()["error"]["type"] == "invalid_request_error"
    good = requests.post(f"{server.url}/v2/models/add_one/infer", data=gzip.compress(orjson.dumps(ADD_ONE)),
                         headers=broken, timeout=10)
    assert good.status_code == 200 and good.json()["outputs"][0]["data"] == [2, 3, 4, 5]


def test_usage_with_the_ledger_off_says_so(standard_repo, server_factory):
    running = server_factory(standard_repo, ledger={"enabled": False})
    response = requests.get(f"{running.url}/v1/usage", timeout=10)
    assert response.status_code == 404
    assert "ledger is off" in response.json()["error"]["message"] and "not ready" not in response.text


def test_models_retrieve_by_name_and_alias(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    listed = {model.id for model in client.models.list()}
    name = sorted(listed)[0]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


class FakeUpstream:
    """An OpenAI-compatible upstream on loopback that answers every call with ``status``."""

    def __init__(self) -> None:
        self.status = 401
        self.calls = 0
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        threading.Thread(target=self._serve, daemon=True).start()
        assert self._ready.wait(10)

    async def _answer(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.json_response({"error": {"message": f"upstream says {self.status}"}}, status=self.status)

    def _serve(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/{tail:.*}", self._answer)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
            self._ready.set()
            await asyncio.Event().wait()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())


@pytest.fixture(scope="module")
def routed(tmp_path_factory, smollm2_repo) -> Iterator[tuple[RunningServer, FakeUpstream, str]]:
    """A server whose router sends complex chats to the fake upstream, and a key that lets data leave."""
    fake = FakeUpstream()
    state = tmp_path_factory.mktemp("routed-state")
    _, token = KeyStore(state / "keys.json").create(name="c", tenant="t", cloud=True)
    config_file = state / "config.toml"
    config_file.write_text(f"""
[server]
port = 0
[paths]
model_repository = "{smollm2_repo}"
state_dir = "{state}"
[onnxruntime]
intra_op_threads = 1
[cache]
enabled = false
[routing]
cloud_upstream = "chat"
[upstreams.chat]
kind = "openai"
base_url = "{fake.url}"
models = {{ "*" = "*" }}
retries = 0
failure_threshold = 1000
""")
    running = RunningServer(load_config(config_file, environ={})).start()
    yield running, fake, token
    running.stop()


def _chat(url: str, token: str, stream: bool) -> requests.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": COMPLEX}], "max_tokens": 4, "stream": stream}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"},
                         timeout=60)


@pytest.mark.parametrize("status", [401, 403, 404, 400, 500])
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_failure_is_502_naming_the_upstream(routed, status, stream):
    running, fake, token = routed
    fake.status = status
    before = fake.calls
    response = _chat(running.url, token, stream)
    assert fake.calls > before, "the request did not reach the upstream"
    assert response.status_code == 502, response.text
    assert "WWW-Authenticate" not in response.headers and int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert "'chat'" in error["message"] and "may be retried" in error["message"]
    assert f"answered {status}" in error["message"] or f"HTTP {status}" in error["message"]
    assert error["type"] == "server_error"
    if status in (401, 403):
        assert "credential" in error["message"]

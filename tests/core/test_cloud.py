"""Routing, admission, cloud overflow, data policy and the cost ledger, end to end.

The cloud upstream is a second appliance process on loopback (a real server); its own access log shows what
reached it. The local server runs the tiny add_one model behind an engine that takes 50 ms per call (one row at a
time), so a burst of requests saturates it, and both smollm2-135m tiers for routing.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

import tiny_models
from appliance.config import load_config
from appliance.engine_factory import create_engine
from appliance.keys import KeyStore
from conftest import RunningServer, free_port
from waiting import wait_until

SLOW_S = 0.05
BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
COMPLEX = ("Explain step by step why this Python function is slow, compare two fixes and analyze the trade-offs: "
           "```python\ndef total(xs):\n    return sum([x * x for x in xs])\n```\nThen solve 12 * 7 + 3 = ? and "
           "prove the result.")


class SlowEngine:
    """The real ONNX Runtime engine, taking ``SLOW_S`` longer per call: a model with a known service time."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, inputs):
        time.sleep(SLOW_S)
        return self._engine.run(inputs)


def slow_factory(spec, config):
    engine = create_engine(spec, config)
    return SlowEngine(engine) if spec.name == "slow" else engine


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, standard_repo, smollm2_repo):
    """A second appliance on loopback: the cloud. Its stdout is its access log."""
    root = tmp_path_factory.mktemp("upstream")
    repo = root / "repo"
    repo.mkdir()
    for source in (standard_repo / "add_one", smollm2_repo / "smollm2-135m"):
        os.symlink(source, repo / source.name)
    port = free_port()
    log = root / "access.log"
    env = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo), "APPLIANCE_PATHS_STATE_DIR": str(root / "s"),
           "APPLIANCE_SERVER_PORT": str(port), "APPLIANCE_CACHE_ENABLED": "false"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env, stdout=out,
                                   stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, "the upstream appliance exited"
        try:
            return requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(ready, 120, "the upstream appliance to start")
    yield url, log
    process.terminate()
    process.wait(30)


def upstream_requests(upstream: tuple[str, Path], path: str) -> int:
    """Requests for ``path`` in the upstream's access log, counting every one it answered before this call.

    The log is flushed on a timer, in the order requests finished: once a marker request sent now shows in it,
    so do all those before.
    """
    url, log = upstream
    marker = f"marker-{uuid.uuid4().hex}"
    requests.get(f"{url}/v2/health/live", headers={"x-request-id": marker}, timeout=10)

    def written() -> list[dict] | None:
        text = log.read_text()
        lines = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.startswith("{")]
        return lines if any(line.get("request_id") == marker for line in lines) else None

    lines = wait_until(written, 30, "the upstream's access log to be flushed")
    return sum(1 for line in lines if line.get("type") == "access" and line["path"] == path)


def local_config(tmp: Path, repo: Path, upstream_url: str, **extra: str):
    text = f"""
[server]
port = 0
[paths]
model_repository = "{repo}"
state_dir = "{tmp / 'state'}"
[onnxruntime]
intra_op_threads = 1
[cache]
enabled = false
[admission]
interactive_max_wait_ms = 150
batch_max_wait_ms = 2000
[routing]
cloud_upstream = "chat"
[upstreams.edge]
kind = "kserve"
base_url = "{extra.get('kserve_url', upstream_url)}"
models = {{ slow = "add_one" }}
price_input_per_million = 0
failure_threshold = 2
cooldown_s = 600
retries = 0
[upstreams.chat]
kind = "openai"
base_url = "{upstream_url}"
models = {{ auto = "smollm2-135m", "*" = "*" }}
price_input_per_million = 1.0
price_output_per_million = 2.0
"""
    (tmp / "config.toml").write_text(text)
    return load_config(tmp / "config.toml", environ={})


def local_repo(root: Path, smollm2_repo: Path) -> Path:
    repo = root / "repo"
    tiny_models.write_version(repo, "slow", 1, tiny_models.BATCHED.format(max_batch=1, delay_us=0),
                              tiny_models.add_constant)
    for name in ("smollm2-135m", "smollm2-135m-fast"):
        os.symlink(smollm2_repo / name, repo / name)
    return repo


@pytest.fixture(scope="module")
def local(tmp_path_factory, smollm2_repo, upstream):
    root = tmp_path_factory.mktemp("local")
    store = KeyStore(root / "state" / "keys.json")
    tokens = {name: store.create(name=name, tenant=tenant, cloud=cloud, admin=admin, cache_scope="none")[1]
              for name, tenant, cloud, admin in (("cloudy", "acme", True, False), ("private", "acme", False, False),
                                                 ("meter", "metered", False, False), ("ops", "ops", False, True))}
    tokens["auto-only"] = store.create(name="auto-only", tenant="acme", models=("auto",))[1]
    tokens["slow-only"] = store.create(name="slow-only", tenant="acme", models=("slow",), cloud=True)[1]
    running = RunningServer(local_config(root, local_repo(root, smollm2_repo), upstream[0]),
                            engine_factory=slow_factory).start()
    yield running, tokens
    running.stop()


def auth(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def burst(url: str, calls: list[dict[str, str]]) -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda h: requests.post(f"{url}/v2/models/slow/infer", json=BODY, headers=h,
                                                     timeout=60), calls))


def test_overload_spills_to_the_cloud_only_where_policy_allows(local, upstream):
    running, tokens = local
    before = upstream_requests(upstream, "/v2/models/add_one/infer")
    calls = ([auth(tokens["cloudy"])] * 16 + [auth(tokens["private"])] * 8
             + [auth(tokens["cloudy"], **{"x-appliance-data": "local-only"})] * 8)
    responses = burst(running.url, calls)
    cloudy, private, pinned = responses[:16], responses[16:24], responses[24:]
    for response in cloudy:
        if response.status_code == 200:
            assert response.json()["outputs"][0]["data"] == [2, 3, 4, 5]
        else:  # waited its lane's maximum at the gate: too late to send elsewhere within the budget
            assert response.status_code == 429 and "waited" in response.json()["error"]
    spilled = [r for r in cloudy if r.headers["x-appliance-model"] == "edge:add_one"]
    assert spilled, "no request overflowed to the cloud"
    assert all(r.headers["x-appliance-route"].startswith("overflow: model slow") for r in spilled)
    for response in private + pinned:
        assert response.headers.get("x-appliance-model") in (None, "slow")
        if response.status_code != 200:
            assert response.status_code in (429, 503) and int(response.headers["Retry-After"]) >= 1
            assert "slow" in response.json()["error"]
    assert any(r.status_code == 429 for r in private + pinned), "the local-only burst was never shed"
    # The upstream saw exactly the spilled requests: none of the local-only ones.
    assert upstream_requests(upstream, "/v2/models/add_one/infer") - before == len(spilled)


def test_the_breaker_opens_on_a_dead_upstream_and_local_traffic_goes_on(tmp_path, smollm2_repo, upstream):
    port = free_port()  # bound and closed again: nothing listens there
    config = local_config(tmp_path, local_repo(tmp_path, smollm2_repo), upstream[0],
                          kserve_url=f"http://127.0.0.1:{port}")
    _, token = KeyStore(tmp_path / "state" / "keys.json").create(name="c", tenant="t", cloud=True)
    running = RunningServer(config, engine_factory=slow_factory).start()
    try:
        first = burst(running.url, [auth(token)] * 12)
        statuses = [r.status_code for r in first]
        assert 502 in statuses  # the first spills hit the closed port: the upstream failed, not the caller
        failed = next(r for r in first if r.status_code == 502)
        assert "'edge'" in failed.json()["error"] and "may be retried" in failed.json()["error"]
        assert failed.headers["Retry-After"] and "WWW-Authenticate" not in failed.headers
        assert statuses.count(200) >= 1
        later = burst(running.url, [auth(token)] * 12)
        # Open breaker: no more spills; the overflow is shed locally with the admission estimate.
        assert all(r.status_code in (200, 429) for r in later), [r.status_code for r in later]
        assert all(r.headers.get("x-appliance-model") == "slow" for r in later if r.status_code == 200)
        single = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(token), timeout=10)
        assert single.status_code == 200 and single.headers["x-appliance-model"] == "slow"
        assert single.headers["x-appliance-route"] == "named in the request"  # local, untouched by the breaker
    finally:
        running.stop()


def chat(url: str, token: str, content: str, **options) -> requests.Response:
    payload = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
               "temperature": 0, **options}
    return requests.post(f"{url}/v1/chat/completions", json=payload, headers=auth(token), timeout=120,
                         stream=bool(options.get("stream")))


ROUTES = [
    ("Hi!", "smollm2-135m-fast"),
    ("What is the capital of France?", "smollm2-135m-fast"),
    (COMPLEX, "smollm2-135m"),
    ("Write a Python function that parses a CSV file and explain why you chose that approach step by step.",
     "smollm2-135m"),
]


@pytest.mark.parametrize(("prompt", "model"), ROUTES)
def test_routing_decisions_for_a_table_of_prompts(local, prompt, model):
    running, tokens = local
    response = chat(running.url, tokens["private"], prompt)
    assert response.status_code == 200
    assert response.headers["x-appliance-model"] == model == response.json()["model"]
    assert response.headers["x-appliance-route"].startswith("score ")


def test_a_complex_prompt_streams_through_the_cloud_when_allowed(local, upstream):
    running, tokens = local
    before = upstream_requests(upstream, "/v1/chat/completions")
    response = chat(running.url, tokens["cloudy"], COMPLEX, stream=True, max_tokens=8)
    assert response.status_code == 200 and response.headers["x-appliance-model"] == "chat:smollm2-135m"
    assert "cloud upstream chat" in response.headers["x-appliance-route"]
    events = [line for line in response.iter_lines() if line]
    assert events[-1] == b"data: [DONE]" and len(events) >= 4
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e[6:])["choices"])
    assert text
    assert upstream_requests(upstream, "/v1/chat/completions") == before + 1
    # The same prompt from a key whose data stays here runs on the mid tier and says why.
    private = chat(running.url, tokens["private"], COMPLEX)
    assert private.headers["x-appliance-model"] == "smollm2-135m"
    assert "cloud is not allowed" in private.headers["x-appliance-route"]


def test_n_choices_come_back_from_the_cloud_whole_and_streamed(local):
    running, tokens = local
    whole = chat(running.url, tokens["cloudy"], COMPLEX, n=2, max_tokens=6, ignore_eos=True)
    assert whole.status_code == 200 and whole.headers["x-appliance-model"] == "chat:smollm2-135m", whole.text
    choices = whole.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["message"]["content"] for c in choices)
    assert whole.json()["usage"]["completion_tokens"] == 12
    streamed = chat(running.url, tokens["cloudy"], COMPLEX, n=2, max_tokens=6, ignore_eos=True, stream=True)
    texts, finishes = {0: "", 1: ""}, {}
    for line in streamed.iter_lines():
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["message"]["content"] for c in choices}  # greedy: the same text both ways
    assert finishes == {0: "length", 1: "length"}


def test_the_ledger_totals_equal_the_sum_of_per_request_usage(local):
    running, tokens = local
    usages = [chat(running.url, tokens["meter"], prompt, max_tokens=3).json()["usage"]
              for prompt in ("one", "two words", "three more words")]
    for _ in range(2):
        assert requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(tokens["meter"]),
                             timeout=10).status_code == 200
    refused = requests.get(f"{running.url}/v1/usage", headers=auth(tokens["meter"]), timeout=10)
    assert refused.status_code == 403
    report = requests.get(f"{running.url}/v1/usage", params={"tenant": "metered", "group_by": "model,place"},
                          headers=auth(tokens["ops"]), timeout=10).json()
    rows = {row["model"]: row for row in report["data"]}
    generated = [row for model, row in rows.items() if model.startswith("smollm2")]
    assert sum(r["requests"] for r in generated) == 3
    assert sum(r["input_tokens"] for r in generated) == sum(u["prompt_tokens"] for u in usages)
    assert sum(r["output_tokens"] for r in generated) == sum(u["completion_tokens"] for u in usages)
    assert rows["slow"]["requests"] == 2 and rows["slow"]["place"] == "local"
    assert report["totals"]["requests"] == 5
    metrics = requests.get(f"{running.url}/metrics", timeout=10).text
    assert 'appliance_usage_requests_total{model="slow",place="local",tenant="metered"} 2.0' in metrics
    assert "appliance_route_decisions_total" in metrics


def test_cloud_spend_is_attributed_to_the_cloud(local):
    running, tokens = local
    report = requests.get(f"{running.url}/v1/usage", params={"tenant": "acme", "group_by": "place"},
                          headers=auth(tokens["ops"]), timeout=10).json()
    places = {row["place"]: row for row in report["data"]}
    assert places["cloud"]["requests"] >= 1 and places["local"]["requests"] >= 1


def test_bad_policy_headers_are_refused(local):
    running, tokens = local
    for header, value in (("x-appliance-lane", "urgent"), ("x-appliance-data", "anywhere"),
                          ("x-appliance-workflow", "a b")):
        response = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY,
                                 headers=auth(tokens["cloudy"], **{header: value}), timeout=10)
        assert response.status_code == 400 and header in response.json()["error"]


def test_upstream_config_errors_name_the_field(tmp_path):
    (tmp_path / "c.toml").write_text('[upstreams.x]\nkind = "grpc"\nbase_url = "http://h"\nmodels = {}\n')
    from appliance.config import ConfigError

    with pytest.raises(ConfigError, match="upstreams.x.kind"):
        load_config(tmp_path / "c.toml", environ={})


def test_a_model_that_is_not_ready_fails_over_to_the_cloud_where_allowed(local):
    running, tokens = local
    unload = requests.post(f"{running.url}/v2/repository/models/slow/unload", headers=auth(tokens["ops"]), timeout=30)
    assert unload.status_code == 200
    try:
        moved = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(tokens["cloudy"]),
                              timeout=30)
        assert moved.status_code == 200 and moved.json()["outputs"][0]["data"] == [2, 3, 4, 5]
        assert moved.headers["x-appliance-model"] == "edge:add_one"
        assert moved.headers["x-appliance-route"].startswith("failover: model 'slow' is unavailable")
        kept = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(tokens["private"]),
                             timeout=30)
        assert kept.status_code == 503 and "load it" in kept.json()["error"]
    finally:
        load = requests.post(f"{running.url}/v2/repository/models/slow/load", headers=auth(tokens["ops"]), timeout=60)
        assert load.status_code == 200


def test_model_lists_hold_for_routers_and_for_models_that_are_not_ready(local):
    running, tokens = local
    # A key that may use the router may use what it routes to, but not name those models itself.
    assert chat(running.url, tokens["auto-only"], "Hi!").status_code == 200
    named = requests.post(f"{running.url}/v1/chat/completions", headers=auth(tokens["auto-only"]), timeout=60,
                          json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 2})
    assert named.status_code == 403
    # A key without the router may not reach the cloud through it.
    assert chat(running.url, tokens["slow-only"], COMPLEX).status_code == 403
    # A model outside the key's list is 403 whatever its state: no failover, nothing said about it.
    unload = requests.post(f"{running.url}/v2/repository/models/slow/unload", headers=auth(tokens["ops"]), timeout=30)
    assert unload.status_code == 200
    try:
        hidden = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(tokens["auto-only"]),
                               timeout=30)
        assert hidden.status_code == 403
    finally:
        assert requests.post(f"{running.url}/v2/repository/models/slow/load", headers=auth(tokens["ops"]),
                             timeout=60).status_code == 200


def test_a_cloud_stream_is_accounted_even_when_the_client_did_not_ask_for_usage(local):
    running, tokens = local
    before = requests.get(f"{running.url}/v1/usage", params={"place": "cloud", "group_by": "place"},
                          headers=auth(tokens["ops"]), timeout=10).json()["totals"]
    response = chat(running.url, tokens["cloudy"], COMPLEX, stream=True, max_tokens=5)
    events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != b"data: [DONE]"]
    assert events and not any(e.get("usage") and not e.get("choices") for e in events)  # not asked, not sent
    after = requests.get(f"{running.url}/v1/usage", params={"place": "cloud", "group_by": "place"},
                         headers=auth(tokens["ops"]), timeout=10).json()["totals"]
    assert after["output_tokens"] - before.get("output_tokens", 0) == 5

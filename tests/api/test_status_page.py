"""The status page: ``GET /v1/status`` through real HTTP (its shape, who sees what, values that follow traffic) and
the page itself in a real headless Chromium (Debian's ``chromium`` driven by Playwright), which must draw the box,
follow its traffic without a reload, log no error and fetch nothing from outside the box.

The box: tiny tensor models (``add_one``; ``slow``, 50 ms a call, one at a time, so that a burst overflows), a tiny
generative model (``tiny-chat``: a word-level tokenizer and a fake decoder that takes a few milliseconds a step, so
that time to first token and inter-token latency are real measurements), a second appliance on loopback as the
kserve cloud upstream, a fake NVML module standing for one GPU, API keys, the response cache and the cost ledger
on, and a reading of the metrics every 0.25 s for the history.

The browser test saves a screenshot of the page as ``test-artifacts/status-page.png`` at the repository root
(git-ignored; ``APPLIANCE_TEST_ARTIFACTS`` names another folder).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests

import tiny_models
from appliance.config import load_config
from appliance.engine_factory import create_engine
from appliance.gpu_telemetry import NvmlReader
from appliance.keys import KeyStore
from conftest import RunningServer, free_port, make_config
from fake_decoders import FixedCacheDecoder
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("APPLIANCE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
WORDS = tiny_models.WORDS
STEP_S = 0.004


class StepDecoder(FixedCacheDecoder):
    """A :class:`~appliance.engines.base.Decoder` that predicts the word after the last one, ``STEP_S`` a call."""

    description = "step decoder (tests)"

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__(rows, capacity)
        self.kv_dtype = np.dtype(np.float16)

    def kv_cache_bytes(self, capacity: int | None = None) -> int:
        """What a real cache of these rows would take (3 MiB per row at full length)."""
        return self.rows * (capacity or self.max_capacity) * 3 * 2**20 // self.max_capacity

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        time.sleep(STEP_S)
        logits = np.zeros((len(input_ids), len(WORDS)), np.float32)
        logits[np.arange(len(input_ids)), 2 + (input_ids[:, -1] - 1) % (len(WORDS) - 2)] = 1.0
        return logits


class FakeNvml:
    """What nvidia-ml-py offers, for one GPU whose utilization moves with each reading (no GPU needed)."""

    NVMLError = RuntimeError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.readings = 0

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Fake GPU (tests)"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        self.readings += 1
        return SimpleNamespace(gpu=30 + 7 * (self.readings % 5), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=5 * 2**30, total=24 * 2**30, free=19 * 2**30)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 87_000  # milliwatts

    def nvmlShutdown(self) -> None:
        """Nothing held."""


def _engines(spec, config):
    engine = create_engine(spec, config)
    if spec.name != "slow":
        return engine

    class Slow:
        def __getattr__(self, name):
            return getattr(engine, name)

        def run(self, inputs):
            time.sleep(0.05)
            return engine.run(inputs)

    return Slow()


def _repository(root: Path, standard_repo: Path) -> Path:
    os.symlink(standard_repo / "add_one", root / "add_one")
    tiny_models.write_version(root, "slow", 1, tiny_models.BATCHED.format(max_batch=1, delay_us=0),
                              tiny_models.add_constant)
    tiny_models.write_word_generator(root, "tiny-chat", 'task = "generate"\ntier = "small"\n[batching]\n'
                                     "max_batch_size = 0\n[tokenizer]\nmax_seq_length = 64\n[generation]\n"
                                     "max_running = 4\nkv_capacity = 64\nprefill_chunk = 64\n[warmup]\nruns = 0\n")
    return root


@pytest.fixture(scope="module")
def box(standard_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict]]:
    """The appliance under test and its keys: ``ops`` (admin), ``shop`` (add_one, slow and auto; may use the
    cloud) and ``viewer`` (no admin, add_one only)."""
    cloud = RunningServer(make_config(standard_repo, tmp_path_factory.mktemp("cloud-state"))).start()
    root = tmp_path_factory.mktemp("status-box")
    (root / "repo").mkdir()
    repo = _repository(root / "repo", standard_repo)
    store = KeyStore(root / "state" / "keys.json")
    tokens = {"ops": store.create(name="ops", tenant="ops", admin=True, cloud=True)[1],
              "shop": store.create(name="shop-web", tenant="shop", models=("add_one", "slow", "auto"),
                                   cloud=True)[1],
              "viewer": store.create(name="viewer", tenant="team-b", models=("add_one",))[1]}
    (root / "config.toml").write_text(f"""
[server]
port = 0
[paths]
model_repository = "{repo}"
state_dir = "{root / 'state'}"
[onnxruntime]
intra_op_threads = 1
[admission]
interactive_max_wait_ms = 150
[ledger]
device_rate_per_hour = 3600.0
[upstreams.edge]
kind = "kserve"
base_url = "{cloud.url}"
models = {{ slow = "add_one" }}
retries = 0
""")
    running = RunningServer(load_config(root / "config.toml", environ={}), engine_factory=_engines,
                            decoder_factory=lambda spec, config, generation, limits: StepDecoder(limits.slots,
                                                                                                 limits.capacity),
                            gpu_probe=lambda: NvmlReader(FakeNvml()), status_interval_s=0.25).start()
    yield running, tokens
    running.stop()
    cloud.stop()


def auth(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def status(server: RunningServer, token: str, **params: str) -> dict:
    response = requests.get(f"{server.url}/v1/status", headers=auth(token), params=params, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def infer(server: RunningServer, token: str, data: list[float], **headers: str) -> requests.Response:
    body = {"inputs": [{**BODY["inputs"][0], "data": data}]}
    response = requests.post(f"{server.url}/v2/models/add_one/infer", json=body, headers=auth(token, **headers),
                             timeout=30)
    assert response.status_code == 200, response.text
    return response


def chat(server: RunningServer, token: str, model: str = "tiny-chat") -> None:
    # Sampled, so no cache answers it; <eos> barred, so every stream has the 12 tokens that inter-token latency
    # needs (about one sampled stream in 35 would otherwise end at its first token).
    body = {"model": model, "messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 12,
            "stream": True, "temperature": 0.7, "logit_bias": {"0": -100}}
    with requests.post(f"{server.url}/v1/chat/completions", json=body, headers=auth(token), stream=True,
                       timeout=30) as response:
        assert response.status_code == 200, response.text
        assert b"[DONE]" in b"".join(response.iter_lines())


def burst(server: RunningServer, token: str, count: int = 12) -> list[requests.Response]:
    url = f"{server.url}/v2/models/slow/infer"
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: requests.post(url, json=BODY, headers=auth(token), timeout=60), range(count)))


def model(payload: dict, name: str) -> dict:
    return next(entry for entry in payload["models"] if entry["name"] == name)


# -- the JSON endpoint ----------------------------------------------------------------------------------------------

def test_the_page_is_public_self_contained_and_carries_no_data(box):
    server, _ = box
    for path in ("/", "/ui"):
        page = requests.get(server.url + path, timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
        html = page.text
        assert 'data-keys="required"' in html  # keys exist: the page asks for one before it fetches anything
        assert "add_one" not in html and "tiny-chat" not in html and "shop" not in html
        references = re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?([^"')\s>]+)""", html)
        assert all(ref.startswith("data:") for ref in references), references
        assert re.findall(r"https?://[^\s\"'`]+", html) == ["http://www.w3.org/2000/svg"]  # a namespace, not a fetch


def test_status_needs_a_key_and_checks_its_query(box):
    server, tokens = box
    anonymous = requests.get(f"{server.url}/v1/status", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    for query, problem in (({"window_s": "5"}, "window_s"), ({"window_s": "x"}, "window_s"),
                           ({"since": "1"}, "since")):
        bad = requests.get(f"{server.url}/v1/status", headers=auth(tokens["ops"]), params=query, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == problem


def test_an_admin_sees_the_box_and_its_figures_follow_the_traffic(box):
    server, tokens = box
    before = status(server, tokens["ops"])
    assert before["object"] == "status" and before["caller"] == {"name": "ops", "tenant": "ops", "admin": True}
    assert before["server"]["ready"] and before["server"]["keys_required"]
    assert {m["name"] for m in before["models"]} == {"add_one", "slow", "tiny-chat"}
    add_one = model(before, "add_one")
    assert add_one["state"] == "READY" and add_one["version"] == 1 and add_one["device"] == "cpu"
    assert add_one["runtime"]["kind"] == "onnxruntime" and add_one["runtime"]["providers"]
    assert add_one["resident_since"] <= time.time()
    gates = add_one["lanes"]
    assert gates["capacity"] == 256 and gates["active"] == 0 and set(gates["lanes"]) == {"interactive", "batch"}
    assert gates["lanes"]["interactive"]["max_wait_s"] == pytest.approx(0.15)
    chat_model = model(before, "tiny-chat")
    assert chat_model["tier"] == "small" and chat_model["kv_cache"]["rows"] == 4
    assert chat_model["kv_cache"]["bytes"] == 4 * 3 * 2**20 and chat_model["kv_cache"]["dtype"] == "float16"
    assert before["upstreams"] == [{"name": "edge", "kind": "kserve", "breaker": "closed", "available": True,
                                    "in_flight": 0, "max_concurrency": 16, "models": ["slow"],
                                    "recent_calls": before["upstreams"][0]["recent_calls"],
                                    "base_url": before["upstreams"][0]["base_url"]}]
    assert before["gpus"] == [{"index": "0", "name": "Fake GPU (tests)", "utilization_ratio": pytest.approx(0.37),
                               "memory_used_bytes": 5 * 2**30, "memory_total_bytes": 24 * 2**30,
                               "temperature_celsius": 61, "power_watts": 87}]
    assert before["cost"]["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert before["routing_quality"]["sample_ratio"] == 0 and before["routing_quality"]["bands"] == []

    for i in range(6):
        infer(server, tokens["shop"], [i, 0, 0, 0], **{"x-appliance-workflow": "status-test"})  # misses
    for _ in range(4):
        infer(server, tokens["shop"], [0, 0, 0, 0], **{"x-appliance-workflow": "status-test"})  # hits
    chat(server, tokens["ops"])
    chat(server, tokens["shop"], "auto")  # a complexity decision
    spilled = [r for r in burst(server, tokens["shop"]) if r.headers.get("x-appliance-model") == "edge:add_one"]
    assert spilled, "no request overflowed to the cloud"

    after = status(server, tokens["ops"])
    recent, earlier = after["recent"], before["recent"]
    assert recent["requests"] - earlier["requests"] == 10 + 2 + 12
    assert model(after, "add_one")["recent"]["requests"] - add_one["recent"]["requests"] == 10
    assert recent["cache"]["hit"] - earlier["cache"]["hit"] >= 3  # the first of the four stored the answer
    assert recent["cache_hit_ratio"] is not None and recent["cache_hit_ratio"] > 0
    assert recent["ttft_p50_s"] is not None and recent["itl_p50_s"] >= STEP_S * 0.5
    assert recent["tokens_per_s"] > 0 and recent["request_p99_s"] >= recent["request_p50_s"] > 0
    routes, routes_before = recent["routes"], earlier["routes"]
    assert routes["complexity"]["local"] - routes_before["complexity"]["local"] == 1
    assert routes["overflow"]["cloud"] - routes_before["overflow"]["cloud"] == len(spilled)
    assert 0 < recent["fallback_ratio"] < 1
    assert recent["upstream_calls"]["edge"]["ok"] >= len(spilled)
    workflows = {row["workflow"]: row for row in after["cost"]["by_workflow"]}
    assert workflows["status-test"]["requests"] == 10 and workflows["status-test"]["cost"] > 0
    tenants = {row["tenant"]: row for row in after["cost"]["by_tenant"]}
    assert tenants["shop"]["cost"] > 0 and after["cost"]["total"] >= tenants["shop"]["cost"]

    # The history: points every 0.25 s, some of them holding this traffic.
    def overflowed() -> dict | None:
        history = status(server, tokens["ops"])["history"]
        return history if any(history["routes_per_s"].get("overflow", ())) else None

    history = wait_until(overflowed, 10, "a history point with the overflow")
    assert history["interval_s"] == 0.25 and len(history["t"]) == len(history["request_p99_s"])
    assert max(v or 0 for v in history["requests_per_s"]) > 0 and any(history["request_p50_s"])


def test_a_key_without_admin_sees_its_models_and_no_cost(box):
    server, tokens = box
    payload = status(server, tokens["viewer"])
    assert payload["caller"] == {"name": "viewer", "tenant": "team-b", "admin": False}
    assert "cost" not in payload and "cost" not in json.dumps(payload)  # nor anything named like it
    assert [m["name"] for m in payload["models"]] == ["add_one"]
    assert payload["upstreams"] and "base_url" not in payload["upstreams"][0]
    assert payload["upstreams"][0]["models"] == []  # the upstream maps "slow", which this key may not use
    shop = status(server, tokens["shop"])
    assert "cost" not in shop and {m["name"] for m in shop["models"]} == {"add_one", "slow"}


def test_with_admin_only_metrics_the_status_needs_an_admin_key(standard_repo, server_factory, tmp_path):
    store = KeyStore(tmp_path / "state0" / "keys.json")  # the factory's first server keeps its state there
    user, admin = store.create(name="app", tenant="t")[1], store.create(name="ops", tenant="o", admin=True)[1]
    server = server_factory(standard_repo, server={"metrics_access": "admin"})
    refused = requests.get(f"{server.url}/v1/status", headers=auth(user), timeout=10)
    assert refused.status_code == 403 and "metrics_access" in refused.json()["error"]["message"]
    assert status(server, admin)["models"]


def test_the_page_ships_in_the_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "status_page.html" in setuptools["package-data"]["appliance.api"]
    import importlib.resources

    assert "<script>" in importlib.resources.files("appliance.api").joinpath("status_page.html").read_text()


# -- the page, in a real browser ------------------------------------------------------------------------------------

def test_the_page_draws_the_box_and_follows_its_traffic_in_a_real_browser(box):
    """Chromium loads ``/``, is asked for a key, draws the models, follows traffic without a reload, and logs no
    error; every request it makes goes to this server. The screenshot lands in ``test-artifacts/``."""
    from playwright.sync_api import sync_playwright

    server, tokens = box
    errors: list[str] = []
    fetched: list[str] = []
    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 1000})
            # Matched in the browser's driver (a predicate in Python would hold every request until Python
            # looked): anything not for this server is recorded and refused.
            context.route(re.compile(rf"^(?!{re.escape(server.url)}/)"),
                          lambda route: (outside.append(route.request.url), route.abort()))
            page = context.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.on("request", lambda request: fetched.append(request.url))
            page.goto(server.url + "/", wait_until="load")

            def polls() -> int:
                return page.evaluate("window.applianceStatus ? window.applianceStatus.polls : 0")

            assert page.locator("#login").is_visible()  # keys exist: asked for one first
            page.fill("#login-key", tokens["ops"])
            page.press("#login-key", "Enter")
            wait_until(lambda: polls() >= 1, 20, "the page to draw its first answer")
            assert not page.locator("#login").is_visible()
            card = page.locator('[data-model="add_one"]')
            assert "ready" in card.inner_text() and "onnxruntime" in card.inner_text()
            assert "KV cache" in page.locator('[data-model="tiny-chat"]').inner_text()
            assert "12.0 MiB of 12.0 MiB float16 on cpu" in page.locator('[data-model="tiny-chat"]').inner_text()
            assert "breaker closed" in page.locator('[data-upstream="edge"]').inner_text()
            assert "Fake GPU (tests)" in page.locator('[data-gpu="0"]').inner_text()
            page.evaluate("window.testProbe = 'still the first load'")
            requests_before = int(card.get_attribute("data-requests"))

            stop = threading.Event()

            def traffic() -> None:
                n = 0
                while not stop.is_set():
                    infer(server, tokens["shop"], [n % 5, 1, 2, 3], **{"x-appliance-workflow": "checkout"})
                    if n % 8 == 0:
                        chat(server, tokens["ops"])
                    if n % 20 == 0:
                        burst(server, tokens["shop"], 8)
                    n += 1

            sender = threading.Thread(target=traffic)
            sender.start()
            try:
                wait_until(lambda: int(page.locator('[data-model="add_one"]').get_attribute("data-requests"))
                           >= requests_before + 20, 60, "the page to show add_one's new requests")
                first = polls()
                page.wait_for_timeout(4000)  # a few more polls, so that the charts hold a stretch of traffic
                assert polls() > first
            finally:
                stop.set()
                sender.join(60)
            wait_until(lambda: page.locator("#ch-latency svg path").count() >= 2, 10, "the latency chart")
            assert page.evaluate("window.testProbe") == "still the first load"  # updated in place, never reloaded
            assert fetched.count(server.url + "/") == 1
            assert page.locator("#kpi-requests .value").inner_text() not in ("–", "0/s")
            assert page.locator("#kpi-fallback .value").inner_text() not in ("–", "0%")
            assert "checkout" in page.locator("#cost-workflows").inner_text()
            assert "shop" in page.locator("#cost-tenants").inner_text()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert outside == [] and all(url.startswith(server.url + "/") for url in fetched), fetched
    assert any(url.startswith(server.url + "/v1/status?") for url in fetched)


# -- several worker processes ---------------------------------------------------------------------------------------

def test_with_two_workers_the_figures_and_lanes_are_those_of_both(standard_repo, tmp_path):
    """``appliance serve`` with two worker processes: whichever worker answers, the request counts and the lanes are
    the sums over both (each has its own gate and queue of 256), while the live state is the answering worker's."""
    port = free_port()
    env = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(standard_repo),
           "APPLIANCE_PATHS_STATE_DIR": str(tmp_path / "state"), "APPLIANCE_SERVER_PORT": str(port),
           "APPLIANCE_SERVER_WORKERS": "2", "APPLIANCE_CACHE_ENABLED": "false",
           "APPLIANCE_ONNXRUNTIME_INTRA_OP_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    close = {"Connection": "close"}  # a new connection each time, so the kernel spreads them over the workers

    def get_status() -> dict | None:
        assert process.poll() is None, process.stderr.read()
        try:
            response = requests.get(f"{url}/v1/status", headers=close, timeout=5)
        except requests.ConnectionError:
            return None
        return response.json() if response.status_code == 200 and response.json()["server"]["ready"] else None

    try:
        ready: set[int] = set()

        def both_ready() -> bool:
            status = get_status()  # the requests below must come after both workers' first status readings
            if status is not None:
                ready.add(status["server"]["worker"]["index"])
            return ready == {0, 1}

        wait_until(both_ready, 120, "two workers to start")
        for _ in range(30):
            assert requests.post(f"{url}/v2/models/add_one/infer", json=BODY, headers=close,
                                 timeout=10).status_code == 200

        def summed() -> set[tuple[int, float, float]] | None:
            seen = set()
            for _ in range(12):
                payload = get_status()
                gates = model(payload, "add_one")["lanes"]
                seen.add((payload["server"]["worker"]["index"], model(payload, "add_one")["recent"]["requests"],
                          gates["capacity"]))
            workers = {index for index, _, _ in seen}
            return seen if workers == {0, 1} and {(n, c) for _, n, c in seen} == {(30, 512)} else None

        wait_until(summed, 30, "both workers to report 30 requests and 2 x 256 places")
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert re.search(r'appliance_lane_queue_capacity\{model="add_one",version="1"\} 512\.0', metrics)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0

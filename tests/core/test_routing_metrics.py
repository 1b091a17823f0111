"""What /metrics says about routing and admission: every decision counted where it is made (named, overflow,
failover: the fallback rate), and the lanes' queues read from the live gates (``appliance_lane_*``), in one process
and summed over worker processes.

The cloud is a second appliance on loopback serving ``add_one`` (a kserve upstream). The local server runs the
tiny add_one graph as ``slow`` (50 ms a call, one row at a time) and as ``gated`` (each call waits until the test
opens its gate), so that overflow and queues happen for real, through HTTP.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import tiny_models
from appliance.config import load_config
from appliance.engine_factory import create_engine
from appliance.keys import KeyStore
from conftest import RunningServer, make_config
from waiting import wait_until

BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
SLOW_S = 0.05


class _Wrapped:
    """The real ONNX Runtime engine, with something done before each call."""

    def __init__(self, engine, before) -> None:
        self._engine, self._before = engine, before

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, inputs):
        self._before()
        return self._engine.run(inputs)


def _engines(gate: threading.Event):
    def factory(spec, config):
        engine = create_engine(spec, config)
        if spec.name == "slow":
            return _Wrapped(engine, lambda: time.sleep(SLOW_S))
        if spec.name == "gated":
            return _Wrapped(engine, lambda: gate.wait(30))
        return engine

    return factory


def _repo(root: Path) -> Path:
    for name in ("slow", "gated"):
        tiny_models.write_version(root, name, 1, tiny_models.BATCHED.format(max_batch=1, delay_us=0),
                                  tiny_models.add_constant)
    return root


def samples(url: str, name: str, headers: dict[str, str] | None = None) -> dict[frozenset, float]:
    """Every sample called ``name`` on ``url``/metrics, by its labels."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
    return {frozenset(sample.labels.items()): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def value(found: dict[frozenset, float], **labels: str) -> float:
    """The sum of the samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for key, v in found.items() if wanted <= key)


@pytest.fixture(scope="module")
def cloud(standard_repo, tmp_path_factory) -> Iterator[RunningServer]:
    running = RunningServer(make_config(standard_repo, tmp_path_factory.mktemp("cloud-state"))).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(cloud, tmp_path_factory) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    root = tmp_path_factory.mktemp("routing-local")
    store = KeyStore(root / "state" / "keys.json")
    tokens = {name: store.create(name=name, tenant="acme", cloud=cloud_ok, admin=admin, cache_scope="none")[1]
              for name, cloud_ok, admin in (("cloudy", True, False), ("private", False, False), ("ops", False, True))}
    (root / "config.toml").write_text(f"""
[server]
port = 0
[paths]
model_repository = "{_repo(root / 'repo')}"
state_dir = "{root / 'state'}"
[onnxruntime]
intra_op_threads = 1
[cache]
enabled = false
[admission]
interactive_max_wait_ms = 150
[upstreams.edge]
kind = "kserve"
base_url = "{cloud.url}"
models = {{ slow = "add_one" }}
retries = 0
""")
    always_open = threading.Event()
    always_open.set()
    running = RunningServer(load_config(root / "config.toml", environ={}), engine_factory=_engines(always_open)).start()
    yield running, tokens
    running.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def decisions(url: str) -> dict[frozenset, float]:
    return samples(url, "appliance_route_decisions_total")


def test_overflow_is_counted_once_per_spilled_request_and_gives_the_fallback_rate(local):
    running, tokens = local
    before = decisions(running.url)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: requests.post(f"{running.url}/v2/models/slow/infer", json=BODY,
                                                          headers=auth(tokens["cloudy"]), timeout=60), range(16)))
    spilled = [r for r in responses if r.headers.get("x-appliance-model") == "edge:add_one"]
    assert spilled, "no request overflowed to the cloud"
    assert all(r.status_code == 200 for r in spilled)
    after = decisions(running.url)

    def delta(**labels: str) -> float:
        return value(after, **labels) - value(before, **labels)

    assert delta(kind="named", place="local", router="-") == 16  # every request: one first decision
    assert delta(kind="overflow", place="cloud") == len(spilled)  # and one more for each that fell back
    assert delta(kind="failover") == 0 and delta(kind="complexity") == 0
    fallback_rate = (delta(kind="overflow") + delta(kind="failover")) / (delta(kind="named") + delta(kind="complexity"))
    assert fallback_rate == pytest.approx(len(spilled) / 16)
    rejected = samples(running.url, "appliance_admission_rejected_total")
    assert value(rejected, model="slow", lane="interactive") >= len(spilled)


def test_failover_is_counted_only_when_the_request_really_goes_to_the_cloud(local):
    running, tokens = local
    unload = requests.post(f"{running.url}/v2/repository/models/slow/unload", headers=auth(tokens["ops"]), timeout=30)
    assert unload.status_code == 200
    try:
        before = decisions(running.url)
        moved = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(tokens["cloudy"]),
                              timeout=30)
        assert moved.status_code == 200 and moved.headers["x-appliance-route"].startswith("failover:")
        kept = requests.post(f"{running.url}/v2/models/slow/infer", json=BODY, headers=auth(tokens["private"]),
                             timeout=30)
        assert kept.status_code == 503  # its key keeps data on the device: no cloud route, no failover
        after = decisions(running.url)
        assert value(after, kind="failover", place="cloud") - value(before, kind="failover", place="cloud") == 1
        assert value(after, kind="named") - value(before, kind="named") == 2
    finally:
        load = requests.post(f"{running.url}/v2/repository/models/slow/load", headers=auth(tokens["ops"]), timeout=60)
        assert load.status_code == 200


def test_the_lanes_queues_are_read_from_the_live_gates(server_factory, tmp_path):
    gate = threading.Event()
    gate.set()  # open for the warmup
    running = server_factory(_repo(tmp_path / "repo"), engine_factory=_engines(gate),
                             admission={"interactive_max_wait_ms": 30000, "batch_max_wait_ms": 30000,
                                        "max_waiting": 9})

    def lanes() -> dict[str, float]:
        found = {name: samples(running.url, f"appliance_lane_{name}") for name in
                 ("queue_depth", "estimated_wait_seconds", "queue_capacity", "active", "active_limit")}
        return {"interactive": value(found["queue_depth"], model="gated", lane="interactive"),
                "batch": value(found["queue_depth"], model="gated", lane="batch"),
                "wait_interactive": value(found["estimated_wait_seconds"], model="gated", lane="interactive"),
                "wait_batch": value(found["estimated_wait_seconds"], model="gated", lane="batch"),
                "capacity": value(found["queue_capacity"], model="gated", version="1"),
                "active": value(found["active"], model="gated"), "limit": value(found["active_limit"], model="gated")}

    idle = lanes()  # before any request reached the model: its gate and capacity already show
    assert idle == {"interactive": 0, "batch": 0, "wait_interactive": 0, "wait_batch": 0, "capacity": 9,
                    "active": 0, "limit": 1}
    gate.clear()
    url = f"{running.url}/v2/models/gated/infer"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(requests.post, url, json=BODY, timeout=60)
        wait_until(lambda: lanes()["active"] == 1, 30, "the first request to hold the model")
        queued = [pool.submit(requests.post, url, json=BODY, headers={"x-appliance-lane": lane}, timeout=60)
                  for lane in ("interactive", "batch", "interactive", "batch", "interactive")]
        busy = wait_until(lambda: (now := lanes())["interactive"] == 3 and now["batch"] == 2 and now, 30,
                          lambda: f"3 interactive and 2 batch requests queued; /metrics says {lanes()}")
        assert busy["active"] == 1 and busy["limit"] == 1 and busy["capacity"] == 9
        assert 0 < busy["wait_interactive"] < busy["wait_batch"]  # batch waits behind the interactive ones too
        gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200] * 6
    assert wait_until(lambda: lanes()["active"] == 0 and lanes(), 30) == idle


WORKER = """
import asyncio, os
from appliance.admission import Admission
from appliance.config import AdmissionConfig
from appliance.telemetry import Metrics


async def main():
    metrics = Metrics()
    admission = Admission(AdmissionConfig(max_waiting=7))
    gate = admission.gate("m", 3, 1, 1, 0.5)
    serving = {("m", 3)}
    metrics.watch_lanes(lambda: admission.states(serving))
    await gate.acquire("interactive", 10)
    waiters = [asyncio.ensure_future(gate.acquire(lane, 10)) for lane in ("interactive", "batch", "batch")]
    await asyncio.sleep(0)
    metrics.flush()  # what the flush timer does every 0.2 s
    if os.environ["RETIRE"] == "1":  # the version is retired once its queue drained
        for _ in range(4):
            gate.release(0.5)
        await asyncio.gather(*waiters)
        serving.clear()
        metrics.flush()
    else:
        for waiter in waiters:
            waiter.cancel()


asyncio.run(main())
"""


def test_with_several_workers_the_lane_gauges_are_summed_from_the_shared_files(tmp_path):
    from prometheus_client.multiprocess import MultiProcessCollector

    def workers(folder: Path, retire: str) -> dict[tuple[str, str], float]:
        folder.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "RETIRE": retire}
        for _ in range(2):  # two worker processes, each with a gate of its own
            subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, timeout=60)
        return {(sample.name, sample.labels.get("lane", "")): sample.value
                for family in MultiProcessCollector(None, path=str(folder)).collect() for sample in family.samples
                if sample.name.startswith("appliance_lane_") and sample.labels["model"] == "m"}

    summed = workers(tmp_path / "busy", "0")
    assert summed[("appliance_lane_queue_depth", "interactive")] == 2  # one waiting in each worker
    assert summed[("appliance_lane_queue_depth", "batch")] == 4
    assert summed[("appliance_lane_queue_capacity", "")] == 14 and summed[("appliance_lane_active", "")] == 2
    assert summed[("appliance_lane_active_limit", "")] == 2
    # The longest wait any worker would give: a new batch request there has the running one and three queued
    # ahead of it, on one slot of 0.5 s.
    assert summed[("appliance_lane_estimated_wait_seconds", "batch")] == pytest.approx(2.0)
    retired = workers(tmp_path / "retired", "1")
    assert retired and set(retired.values()) == {0.0}

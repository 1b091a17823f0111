"""Model control over HTTP: index, load, unload, version swap under traffic, failed loads keep the old version."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest
import requests
import tritonclient.http as triton

import tiny_models


def infer_add(url: str, value: float = 0.0) -> requests.Response:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]}
    return requests.post(f"{url}/v2/models/add_one/infer", json=body, timeout=30)


def index(url: str) -> dict[str, dict]:
    return {e["name"]: e for e in requests.post(f"{url}/v2/repository/index", timeout=10).json()}


def test_index_lists_models_with_state(server):
    entries = index(server.url)
    assert set(entries) == {"add_one", "int_double", "two_io", "fixed"}
    assert all(e["state"] == "READY" and e["version"] == "1" for e in entries.values())
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert {m["name"] for m in client.get_model_repository_index()} == set(entries)
    ready_only = requests.post(f"{server.url}/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert len(ready_only) == 4


def test_unload_then_load(server_factory, fresh_repo):
    running = server_factory(fresh_repo)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    client.unload_model("add_one")
    response = infer_add(running.url)
    assert response.status_code == 503
    assert "load it with POST /v2/repository/models/add_one/load" in response.json()["error"]
    assert not client.is_model_ready("add_one")
    assert index(running.url)["add_one"]["state"] == "UNAVAILABLE"
    assert requests.post(f"{running.url}/v2/repository/models/add_one/unload", timeout=10).status_code == 200
    client.load_model("add_one")
    assert client.is_model_ready("add_one")
    assert infer_add(running.url, 1).json()["outputs"][0]["data"] == [2.0] * 4
    missing = requests.post(f"{running.url}/v2/repository/models/ghost/load", timeout=10)
    assert missing.status_code == 404 and "ghost" in missing.json()["error"]


def test_version_swap_under_traffic_fails_no_request(server_factory, fresh_repo):
    running = server_factory(fresh_repo)
    stop = threading.Event()
    results: list[tuple[int, str, float]] = []

    def traffic() -> None:
        session = requests.Session()
        while not stop.is_set():
            body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
            response = session.post(f"{running.url}/v2/models/add_one/infer", json=body, timeout=30)
            payload = response.json()
            version = payload.get("model_version", "")
            value = payload["outputs"][0]["data"][0] if response.status_code == 200 else float("nan")
            results.append((response.status_code, version, value))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(traffic) for _ in range(6)]
        while len(results) < 50:
            threading.Event().wait(0.01)
        tiny_models.write_version(fresh_repo, "add_one", 2, tiny_models.BATCHED.format(max_batch=64, delay_us=200),
                                  lambda p: tiny_models.add_constant(p, 2.0))
        load = requests.post(f"{running.url}/v2/repository/models/add_one/load", timeout=60)
        assert load.status_code == 200, load.text
        assert load.json()["version"] == "2"
        seen = len(results)
        while len(results) < seen + 50:
            threading.Event().wait(0.01)
        stop.set()
        for worker in workers:
            worker.result()
    assert all(status == 200 for status, _, _ in results), {s for s, _, _ in results}
    # Each answer comes whole from one version: v1 adds 1, v2 adds 2.
    assert all((version, value) in {("1", 1.0), ("2", 2.0)} for _, version, value in results)
    assert results[-1][1:] == ("2", 2.0)
    assert index(running.url)["add_one"]["version"] == "2"


@pytest.mark.parametrize(
    "breakage,expected",
    [
        ("garbage-onnx", "failed to load model 'add_one' version 2"),
        ("bad-toml", "max_batch_size"),
        ("declared-mismatch", "do not match the model's"),
    ],
)
def test_failed_load_keeps_old_version_serving(server_factory, fresh_repo, breakage, expected, caplog):
    running = server_factory(fresh_repo)
    folder = fresh_repo / "add_one" / "2"
    folder.mkdir()
    if breakage == "garbage-onnx":
        (folder / "model.toml").write_text(tiny_models.BATCHED.format(max_batch=8, delay_us=0))
        (folder / "model.onnx").write_bytes(b"not an onnx model")
    elif breakage == "bad-toml":
        (folder / "model.toml").write_text("[batching]\nmax_batch_size = -3\n")
        tiny_models.add_constant(folder / "model.onnx", 2.0)
    else:
        (folder / "model.toml").write_text('[[inputs]]\nname = "OTHER"\ndatatype = "FP32"\n')
        tiny_models.add_constant(folder / "model.onnx", 2.0)
    with caplog.at_level("ERROR", logger="appliance.repository"):
        response = requests.post(f"{running.url}/v2/repository/models/add_one/load", timeout=60)
    assert response.status_code == 400
    assert expected in response.json()["error"]
    assert "version 1 keeps serving" in response.json()["error"]
    assert any("failed to load" in record.getMessage() for record in caplog.records)
    served = infer_add(running.url)
    assert served.status_code == 200 and served.json()["model_version"] == "1"
    assert index(running.url)["add_one"]["state"] == "READY"


def test_model_failing_at_start_is_reported_and_others_serve(server_factory, fresh_repo):
    broken = fresh_repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.toml").write_text('task = "tensor"\n')
    (broken / "model.onnx").write_bytes(b"\x00\x01")
    running = server_factory(fresh_repo)
    entry = index(running.url)["broken"]
    assert entry["state"] == "UNAVAILABLE" and "failed" in entry["reason"]
    response = requests.post(f"{running.url}/v2/models/broken/infer", json={"inputs": []}, timeout=10)
    assert response.status_code in (400, 503)
    assert infer_add(running.url).status_code == 200


def test_warmup_runs_declared_batch_sizes(server_factory, tmp_path):
    repo = tmp_path / "repo"
    toml = tiny_models.BATCHED.format(max_batch=32, delay_us=0) + "[warmup]\nbatch_sizes = [1, 7, 32]\nruns = 2\n"
    tiny_models.write_version(repo, "add_one", 1, toml, tiny_models.add_constant)
    running = server_factory(repo)
    metrics = requests.get(f"{running.url}/metrics", timeout=10).text
    line = next(m for m in metrics.splitlines() if m.startswith("appliance_model_warmup_duration_seconds{"))
    assert float(line.split()[-1]) > 0
    assert infer_add(running.url).status_code == 200
    np.testing.assert_array_equal(infer_add(running.url, 2).json()["outputs"][0]["data"], [3.0] * 4)

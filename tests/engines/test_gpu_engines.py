"""ONNX Runtime's CUDA execution provider with bound buffers and CUDA graphs, on a real GPU (``gpu`` marker).

Skipped, with the reason, where onnxruntime-gpu or a GPU is missing. ``bench/gpu.py`` runs these first. MiniLM
comes from ``APPLIANCE_GPU_MINILM`` (a built version folder: device machines reach no network) or else from the
session's ``minilm_repo`` build.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from appliance.engines.buckets import Buckets
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions
from conftest import RunningServer, make_config
from gpu_support import why_no_gpu
from reference_data import reference_items

ADD_ONE = Path(__file__).resolve().parents[2] / "examples" / "models" / "add_one" / "1" / "model.onnx"
BUCKETS = (1, 2, 4, 8)


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def a_gpu():
    reason = why_no_gpu()
    if reason:
        pytest.skip(reason)


def cuda_engine(model: Path, graphs: bool, warm: list[dict]) -> OnnxRuntimeEngine:
    engine = OnnxRuntimeEngine(model, OrtOptions(providers=("cuda",), io_binding=True, cuda_graphs=graphs,
                                                 batch_buckets=Buckets.of(BUCKETS), warm_shapes=warm))
    engine.load()
    assert engine.providers[0] == "CUDAExecutionProvider"
    return engine


def on_owner_thread(engine: OnnxRuntimeEngine, work):
    """Prepare ``engine`` on a thread and run ``work(engine)`` there (graphs replay on their own thread)."""
    result: list = []
    failure: list = []

    def body() -> None:
        try:
            engine.prepare_thread()
            result.append(work(engine))
        except BaseException as exc:  # reraised on the test's thread
            failure.append(exc)

    worker = threading.Thread(target=body, name="gpu-engine-0")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def test_add_one_on_cuda_is_exact_eager_and_graphed_for_every_batch():
    warm = [{"INPUT0": (size, 4)} for size in BUCKETS]
    for graphs in (False, True):
        engine = cuda_engine(ADD_ONE, graphs, warm)

        def every_batch(engine: OnnxRuntimeEngine) -> None:
            rng = np.random.default_rng(0)
            for rows in (1, 2, 3, 4, 5, 8, 9, 1):
                batch = rng.standard_normal((rows, 4)).astype(np.float32)
                np.testing.assert_array_equal(engine.run({"INPUT0": batch})["OUTPUT0"], batch + np.float32(1))

        on_owner_thread(engine, every_batch)
        if graphs:
            assert engine.bound.graphs.captured() == {"gpu-engine-0": {1, 2, 3, 4}}
        engine.close()


def test_graph_replay_equals_eager_for_every_bucket():
    warm = [{"INPUT0": (size, 4)} for size in BUCKETS]
    eager, graphed = cuda_engine(ADD_ONE, False, warm), cuda_engine(ADD_ONE, True, warm)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((size, 4)).astype(np.float32) for size in BUCKETS for _ in range(3)]
    expected = on_owner_thread(eager, lambda e: [e.run({"INPUT0": b})["OUTPUT0"] for b in batches])
    replayed = on_owner_thread(graphed, lambda e: [e.run({"INPUT0": b})["OUTPUT0"] for b in batches])
    for want, got in zip(expected, replayed):
        np.testing.assert_array_equal(got, want)


def test_no_gpu_memory_growth_over_ten_thousand_replays():
    from appliance.doctor import gpu_readings

    engine = cuda_engine(ADD_ONE, True, [{"INPUT0": (size, 4)} for size in BUCKETS])
    batch = np.ones((3, 4), np.float32)

    def replays(engine: OnnxRuntimeEngine) -> tuple[float, float]:
        for _ in range(100):
            engine.run({"INPUT0": batch})
        before = gpu_readings()[0].memory_used_bytes
        for _ in range(10_000):
            engine.run({"INPUT0": batch})
        return before, gpu_readings()[0].memory_used_bytes

    before, after = on_owner_thread(engine, replays)
    assert after - before <= 4 * 1024**2, f"GPU memory grew by {(after - before) / 1024**2:.1f} MiB"
    engine.close()


@pytest.fixture(scope="module")
def minilm_folder(request) -> Path:
    given = os.environ.get("APPLIANCE_GPU_MINILM")
    if given:
        return Path(given)
    return request.getfixturevalue("minilm_repo") / "minilm-l6" / "1"


@pytest.fixture(scope="module")
def gpu_embed_server(minilm_folder, tmp_path_factory):
    repo = tmp_path_factory.mktemp("gpu-embed-repo")
    shutil.copytree(minilm_folder, repo / "minilm-l6" / "1")
    toml = repo / "minilm-l6" / "1" / "model.toml"
    toml.write_text(toml.read_text().replace("[engine]\n", '[engine]\nproviders = ["cuda", "cpu"]\n', 1))
    running = RunningServer(make_config(repo, tmp_path_factory.mktemp("gpu-embed-state"))).start(timeout_s=300)
    yield running
    running.stop()


def test_minilm_on_cuda_with_graphs_matches_the_reference_through_http(gpu_embed_server):
    config = requests.get(f"{gpu_embed_server.url}/v2/models/minilm-l6/config", timeout=10).json()
    assert config["instance_group"][0]["kind"] == "KIND_GPU", config
    assert "cuda_graphs=on" in config["parameters"]["engine"]["string_value"], config
    items = reference_items("minilm-l6-v2")
    answer = requests.post(f"{gpu_embed_server.url}/v1/embeddings", timeout=60, json={
        "model": "minilm-l6", "input": [item["text"] for item in items], "encoding_format": "float"})
    assert answer.status_code == 200, answer.text
    for item, datum in zip(items, answer.json()["data"]):
        a, b = np.asarray(datum["embedding"], np.float64), np.asarray(item["embedding"], np.float64)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999, item["text"][:40]

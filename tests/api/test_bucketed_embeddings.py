"""MiniLM on bound buffers with batch and sequence buckets (the GPU's shape discipline, on the CPU execution
provider), through HTTP: padded rows and padded positions never change an answer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests

from conftest import RunningServer, make_config
from reference_data import reference_items

BUCKET_SETTINGS = 'io_binding = true\nbatch_buckets = [1, 2, 4, 8, 16, 32]\nsequence_buckets = [16, 32, 64, 128, 256]\n'


@pytest.fixture(scope="module")
def bucketed_embed_server(minilm_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("bucketed-embed-repo")
    shutil.copytree(minilm_repo / "minilm-l6", repo / "minilm-l6")
    toml = next((repo / "minilm-l6").glob("*/model.toml"))
    text = toml.read_text()
    assert "[engine]\n" in text
    toml.write_text(text.replace("[engine]\n", "[engine]\n" + BUCKET_SETTINGS, 1))
    running = RunningServer(make_config(repo, tmp_path_factory.mktemp("bucketed-embed-state"))).start()
    yield running
    running.stop()


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embed(server: RunningServer, texts: list[str]) -> list[list[float]]:
    answer = requests.post(f"{server.url}/v1/embeddings", json={"model": "minilm-l6", "input": texts,
                                                                "encoding_format": "float"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return [datum["embedding"] for datum in answer.json()["data"]]


def test_bucketed_vectors_match_the_reference_alone_and_in_padded_batches(bucketed_embed_server):
    items = reference_items("minilm-l6-v2")
    texts = [item["text"] for item in items]
    together = embed(bucketed_embed_server, texts)  # 16 texts of many lengths: padded rows and positions
    for item, vector in zip(items, together):
        assert cosine(vector, item["embedding"]) >= 0.9999, item["text"][:40]
    for item in items[:5]:  # one row, padded to its sequence bucket
        alone = embed(bucketed_embed_server, [item["text"]])[0]
        assert cosine(alone, item["embedding"]) >= 0.9999, item["text"][:40]
        np.testing.assert_allclose(alone, together[items.index(item)], atol=2e-5)


def test_the_config_reports_bound_buffers_on_the_cpu(bucketed_embed_server):
    config = requests.get(f"{bucketed_embed_server.url}/v2/models/minilm-l6/config", timeout=10).json()
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["backend"] == "onnxruntime"
    assert "auto: no GPU execution provider here" in config["parameters"]["runtime"]["string_value"]
    assert "io_binding buckets=1,2,4,8,16,32 cuda_graphs=off" in config["parameters"]["engine"]["string_value"]

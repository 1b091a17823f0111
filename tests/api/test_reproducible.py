"""Batch invariance as claimed, through real HTTP on the real models: where a model is not proved batch-invariant
the response cache bypasses it; in the reproducible mode (``x-appliance-reproducible: true``) a request's tokens or
vectors are bitwise those it gets alone, beside concurrent others, and are cached. Measured per model and tier by
``bench/invariance.py``."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import RunningServer, make_config

REPRODUCIBLE = {"x-appliance-reproducible": "true"}
REFRESH = {**REPRODUCIBLE, "Cache-Control": "no-cache"}  # runs on the model (no lookup), then stores
TARGET = [{"role": "user", "content": "What is the capital of France?"}]
NEIGHBOURS = [[{"role": "user", "content": "List three uses of copper. " * 20}],
              [{"role": "user", "content": "Write a haiku about rain."}],
              [{"role": "user", "content": "Count from one to twenty in words."}],
              [{"role": "user", "content": "Why is the sky blue?"}]]


@pytest.fixture(scope="module")
def cached_server(smollm2_repo, minilm_repo, standard_repo, tmp_path_factory):
    """Both decoder tiers, both encoder tiers and the tiny tensor models, with the response cache on."""
    repo = tmp_path_factory.mktemp("reproducible-repo")
    for source in (smollm2_repo, minilm_repo, standard_repo):
        for model in source.iterdir():
            (repo / model.name).symlink_to(model)
    running = RunningServer(make_config(repo, tmp_path_factory.mktemp("state"), cache={"enabled": True})).start()
    yield running
    running.stop()


def chat(url: str, model: str, messages: list[dict], headers: dict | None = None, **options) -> requests.Response:
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0, **options}
    response = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def text_of(response: requests.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def beside_neighbours(url: str, model: str, headers: dict, **sampling) -> requests.Response:
    """The target chat while four other chats (one with a long prompt that shares the prefill budget) decode."""
    with ThreadPoolExecutor(len(NEIGHBOURS) + 1) as pool:
        others = [pool.submit(chat, url, model, m, max_tokens=24) for m in NEIGHBOURS]
        beside = pool.submit(chat, url, model, TARGET, headers, **sampling).result()
        for other in others:
            other.result()
    return beside


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 11}], ids=["greedy", "seeded"])
def test_the_exact_tier_is_reproducible_beside_others_in_the_mode_and_cached_only_then(cached_server, sampling):
    url, model = cached_server.url, "smollm2-135m"
    # Not batch-invariant (one-row steps on the 4-bit kernel, batches on the float32 twin): never cached.
    assert chat(url, model, TARGET, **sampling).headers["x-cache"] == "bypass"
    alone = chat(url, model, TARGET, REFRESH, **sampling)
    assert text_of(beside_neighbours(url, model, REFRESH, **sampling)) == text_of(alone)
    repeat = chat(url, model, TARGET, REPRODUCIBLE, **sampling)
    assert repeat.headers["x-cache"] == "hit" and text_of(repeat) == text_of(alone)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 11}], ids=["greedy", "seeded"])
def test_the_fast_tier_gives_the_same_tokens_beside_others_and_is_cached(cached_server, sampling,
                                                                        fast_tier_deterministic):
    """Where its build measured it batch-invariant: the same tokens beside others with no mode asked, and cached.
    Where it did not (AVX2): bypassed by the cache like the exact tier, and reproducible and cached in the mode."""
    url, model = cached_server.url, "smollm2-135m-fast"
    mode = {} if fast_tier_deterministic else REPRODUCIBLE
    if not fast_tier_deterministic:
        assert chat(url, model, TARGET, **sampling).headers["x-cache"] == "bypass"
    fresh = {**mode, "Cache-Control": "no-cache"}
    alone = chat(url, model, TARGET, fresh, **sampling)
    assert text_of(beside_neighbours(url, model, fresh, **sampling)) == text_of(alone)
    repeat = chat(url, model, TARGET, mode, **sampling)
    assert repeat.headers["x-cache"] == "hit" and text_of(repeat) == text_of(alone)


def test_the_fast_tiers_deterministic_claim_is_what_its_build_measured(smollm2_repo, fast_tier_deterministic):
    """The fast tier is marked deterministic exactly when its rows' logits are bitwise the same in any call on
    this CPU (alone and inside calls of 2 to 8 rows of other lengths, a prompt prefilled whole or in chunks, prompts
    prefilled alone or several in one ragged call), as its build measured and recorded. The exact tier's differ on
    every CPU (the contrast: its multi-row calls run the float32 twin)."""
    import json

    from appliance.build.batch_invariance import ROWS, measure_batch_invariance
    from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder

    measured = {}
    for name in ("smollm2-135m-fast", "smollm2-135m"):
        folder = smollm2_repo / name / "1"
        decoder = OnnxRuntimeDecoder(folder / "model.onnx", json.loads((folder / "generation.json").read_text()),
                                     rows=ROWS, max_capacity=256, threads=2, dense_batches=name == "smollm2-135m")
        assert decoder.takes_query_seqlens
        measured[name] = measure_batch_invariance(decoder)
        decoder.close()
    assert measured["smollm2-135m"]["invariant"] is False and measured["smollm2-135m"]["differing"] > 0
    fast = measured["smollm2-135m-fast"]
    assert fast["invariant"] is fast_tier_deterministic, fast
    provenance = json.loads((smollm2_repo / "smollm2-135m-fast" / "1" / "provenance.json").read_text())
    recorded = provenance["parity"]["batch_invariance"]
    assert recorded["invariant"] is fast_tier_deterministic and recorded["checks"] == fast["checks"] == 21
    if not fast_tier_deterministic:  # what the build says of it: only one-row calls differ
        assert 0 < recorded["differing"] < recorded["checks"]


def embed(url: str, model: str, texts: list[str], headers: dict | None = None) -> requests.Response:
    body = {"model": model, "input": texts, "encoding_format": "base64"}
    response = requests.post(f"{url}/v1/embeddings", json=body, headers=headers or {}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def vectors(response: requests.Response) -> list[bytes]:
    return [base64.b64decode(item["embedding"]) for item in response.json()["data"]]


@pytest.mark.parametrize("model", ["minilm-l6", "minilm-l6-int8"])
def test_embeddings_are_reproducible_beside_others_only_in_the_mode_and_cached_only_then(cached_server, model):
    url = cached_server.url
    texts = ["the quick brown fox jumps over the lazy dog", "a short one"]
    assert embed(url, model, texts).headers["x-cache"] == "bypass"
    alone = vectors(embed(url, model, texts[:1], REFRESH))[0]
    crowd = [f"sentence number {n} " * (1 + n % 7) for n in range(24)]
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(embed, url, model, crowd[n::3]) for n in range(3)]
        beside = pool.submit(embed, url, model, texts, REFRESH).result()
        for other in others:
            other.result()
    assert vectors(beside)[0] == alone  # bitwise, though its own request held a shorter input too
    assert embed(url, model, texts, REPRODUCIBLE).headers["x-cache"] == "hit"


def test_tensor_rows_are_the_same_alone_and_batched_with_others(cached_server):
    """add_one is elementwise, so the dynamic batcher cannot change a row: it is marked deterministic and cached."""
    url = f"{cached_server.url}/v2/models/add_one/infer"
    rows = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)

    def infer(row: np.ndarray, headers: dict) -> requests.Response:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": row.tolist()}]}
        return requests.post(url, json=body, headers=headers, timeout=30)

    fresh = {"Cache-Control": "no-cache"}
    alone = [infer(row, fresh).json()["outputs"][0]["data"] for row in rows]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda row: infer(row, fresh).json()["outputs"][0]["data"], rows))
    assert together == alone
    assert infer(rows[0], {}).headers["x-cache"] == "hit"


def test_a_reproducible_header_that_is_not_a_boolean_is_a_400(cached_server):
    response = requests.post(f"{cached_server.url}/v1/embeddings", json={"model": "minilm-l6", "input": "hi"},
                             headers={"x-appliance-reproducible": "yes"}, timeout=30)
    assert response.status_code == 400 and "x-appliance-reproducible must be 'true' or 'false'" in response.text

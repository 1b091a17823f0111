"""The GPU decoder: SmolLM2's FP16 graph (``model.cuda.onnx``) on ONNX Runtime's CUDA execution provider, its KV
cache on the device and shared decode steps replayed from CUDA graphs (``gpu`` marker).

Skipped, with the reason, where onnxruntime-gpu or a GPU is missing. The tiers come from the session's
``smollm2_repo`` build (the GGUF wheel in the model cache: ``bench/gpu.py`` says how it gets to a device machine).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from appliance.build.parity import greedy, parity_decoder, teacher_forced_argmax
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder, Placement
from conftest import RunningServer, make_config
from gpu_support import why_no_gpu
from reference_data import reference_items

pytestmark = pytest.mark.gpu
STEPS = 32


@pytest.fixture(scope="module", autouse=True)
def a_gpu():
    reason = why_no_gpu()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def exact_folder(smollm2_repo: Path) -> Path:
    return smollm2_repo / "smollm2-135m" / "1"


def generation(folder: Path) -> dict:
    return json.loads((folder / "generation.json").read_text())


def gpu_decoder(folder: Path, rows: int, graphs: bool, capacity: int = 512) -> OnnxRuntimeDecoder:
    """The decoder the factory makes on a GPU, warmed on the calling thread (graphs replay on their own thread)."""
    placement = Placement.cuda(0, cuda_graphs=graphs)
    decoder = OnnxRuntimeDecoder(folder / "model.cuda.onnx", generation(folder), rows=rows, max_capacity=capacity,
                                 placement=placement)
    decoder.warm()
    assert decoder.session.get_providers()[0] == "CUDAExecutionProvider"
    return decoder


def test_the_gpu_graph_agrees_with_the_exact_tier_within_the_recorded_agreement(exact_folder):
    recorded = json.loads((exact_folder / "provenance.json").read_text())["parity"]
    recorded = recorded["cuda_graph_agreement_with_exact"]["teacher_forced_top1"]
    exact = parity_decoder(exact_folder / "model.onnx", generation(exact_folder), 512)
    gpu = gpu_decoder(exact_folder, rows=1, graphs=True)
    eos = generation(exact_folder)["eos_token_ids"]
    agreed = total = 0
    divergences = []
    for item in reference_items("smollm2-135m-instruct"):
        want, _ = greedy(exact, item["prompt_ids"], STEPS, eos)
        got, _ = greedy(gpu, item["prompt_ids"], STEPS, eos)
        forced = teacher_forced_argmax(gpu, item["prompt_ids"], want, eos)
        agreed += int((forced == np.array(want)).sum())
        total += len(want)
        divergences.append(next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want)))
    print(f"\ngpu graph: teacher-forced top-1 {agreed}/{total}, tokens before divergence {divergences} "
          f"(recorded on the CPU provider: {recorded:.3f})")
    assert agreed / total >= recorded - 0.05
    assert gpu.kv_dtype == np.float16 and "CUDA graphs" in gpu.description


def test_graph_replay_equals_eager_for_every_bucket(exact_folder):
    prompts = [item["prompt_ids"][:16] for item in reference_items("smollm2-135m-instruct")[:5]]
    runs = {}
    for graphs in (False, True):
        decoder = gpu_decoder(exact_folder, rows=8, graphs=graphs)
        tokens = [[int(decoder.run(row, np.array([p]), np.array([len(p) - 1], np.int32))[0].argmax())]
                  for row, p in enumerate(prompts)]
        lengths = [len(p) for p in prompts]
        logits_seen = []
        for _ in range(12):
            start, stop = decoder.decode_range(0, len(prompts))
            assert (start, stop) == ((0, 8) if graphs else (0, 5))
            ids = np.zeros((stop, 1), np.int64)
            seqlens = np.zeros(stop, np.int32)
            ids[:len(prompts), 0] = [t[-1] for t in tokens]
            seqlens[:len(prompts)] = lengths
            logits = decoder.run(0, ids, seqlens)[:len(prompts)]
            logits_seen.append(logits)
            if graphs:  # the same step again (it rewrites the same positions): only the ids come back
                np.testing.assert_array_equal(decoder.greedy_tokens(0, ids, seqlens)[:len(prompts)],
                                              logits.argmax(axis=-1))
            for row in range(len(prompts)):
                tokens[row].append(int(logits[row].argmax()))
                lengths[row] += 1
        runs[graphs] = (tokens, np.stack(logits_seen))
        if graphs:
            assert decoder._graphs is not None and decoder._graphs.runs[8] >= 12
    assert runs[True][0] == runs[False][0]
    np.testing.assert_allclose(runs[True][1], runs[False][1], atol=1e-3)


@pytest.fixture(scope="module")
def gpu_generation_server(exact_folder, tmp_path_factory):
    repo = tmp_path_factory.mktemp("gpu-generation-repo")
    shutil.copytree(exact_folder, repo / "smollm2-135m" / "1")
    running = RunningServer(make_config(repo, tmp_path_factory.mktemp("gpu-generation-state"),
                                        cache={"enabled": False})).start(timeout_s=300)
    yield running
    running.stop()


def complete(url: str, prompt: str, max_tokens: int = 24) -> str:
    answer = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": max_tokens})
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def test_eight_concurrent_streams_each_equal_their_single_stream_output(gpu_generation_server):
    url = gpu_generation_server.url
    config = requests.get(f"{url}/v2/models/smollm2-135m/config", timeout=10).json()
    assert config["instance_group"][0]["kind"] == "KIND_GPU", config
    prompts = [f"Name {n} things one finds in a kitchen." for n in range(2, 10)]
    alone = [complete(url, p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: complete(url, p), prompts))
    assert together == alone


def test_no_gpu_memory_growth_over_a_thousand_requests(gpu_generation_server):
    from appliance.doctor import gpu_readings

    url = gpu_generation_server.url
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: complete(url, f"Say {n}.", 4), range(64)))
        before = gpu_readings()[0].memory_used_bytes
        list(pool.map(lambda n: complete(url, f"Count to {n % 50}.", 4), range(1000)))
    after = gpu_readings()[0].memory_used_bytes
    assert after - before <= 16 * 1024**2, f"GPU memory grew by {(after - before) / 1024**2:.1f} MiB"

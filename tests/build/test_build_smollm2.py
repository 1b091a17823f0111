"""GGUF -> ONNX decoder import of SmolLM2-135M-Instruct (Q4_1), checked against the reference outputs.

The reference (``tests/data/smollm2-135m-instruct.json``) was computed by transformers with the GGUF
dequantized to float32; the ``exact`` variant must reproduce its greedy tokens and first-step logits, the
``fast`` variant (int8 activations) must stay within the agreement measured when it was written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from appliance.build import q4_repack
from appliance.build.gguf_decoder import (INT8_ACTIVATIONS, DecoderBuild, LlamaConfig, build_graph, import_gguf,
                                          read_gguf, render_chat)
from appliance.build.parity import greedy, parity_decoder, teacher_forced_argmax
from appliance.build.q8_form import MARGIN, Q8FormTimer
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder
from reference_data import reference_items

STEPS = 48
CAPACITY = 256  # positions of the parity decoders' rows: every reference prompt and its STEPS tokens fit

# Measured for the fast variant (accuracy_level 4) on a 2-core AMD EPYC (AVX2), ONNX Runtime 1.32:
# teacher-forced top-1 agreement with the reference 322/336, first-step top-5 logits within 0.72,
# tokens before the first divergence per item [0, 13, 21, 14, 18, 32, 8]. Bounds leave room for other CPUs'
# int8 kernels.
FAST_MIN_TEACHER_FORCED = 0.90
FAST_MAX_TOP5_ERROR = 1.5
FAST_MIN_MEDIAN_DIVERGENCE = 4


@pytest.fixture(scope="session")
def gguf_file(smollm2_gguf: Path) -> Path:
    return smollm2_gguf


@pytest.fixture(scope="session")
def reference() -> list[dict]:
    return reference_items("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def builds(smollm2_repo: Path) -> dict[str, DecoderBuild]:
    """The two tiers as the build pipeline wrote them into the repository (once per session)."""
    return {"exact": DecoderBuild.from_folder(smollm2_repo / "smollm2-135m" / "1"),
            "fast": DecoderBuild.from_folder(smollm2_repo / "smollm2-135m-fast" / "1")}


def test_import_reports_progress(gguf_file, tmp_path):
    lines: list[str] = []
    import_gguf(gguf_file, tmp_path, "fast", max_seq_len=64, progress=lines.append)
    assert lines[0].startswith("reading") and "layer 30/30" in lines and lines[-1].startswith("done in")


def test_repository_entries_and_provenance(smollm2_repo):
    import tomllib

    exact = smollm2_repo / "smollm2-135m" / "1"
    spec = tomllib.loads((exact / "model.toml").read_text())
    assert spec["task"] == "generate" and spec["tier"] == "mid"
    assert tomllib.loads((smollm2_repo / "smollm2-135m-fast" / "1" / "model.toml").read_text())["tier"] == "small"
    fast = json.loads((smollm2_repo / "smollm2-135m-fast" / "1" / "provenance.json").read_text())
    assert fast["source"]["sha256"] and fast["parity"]["agreement_with_exact"]["teacher_forced_top1"] >= 0.85


@pytest.fixture(scope="session")
def all_logits_build(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> DecoderBuild:
    """The exact variant with logits at every position (for padded multi-row prefill and chunk comparisons)."""
    return import_gguf(gguf_file, tmp_path_factory.mktemp("smollm2_all"), "exact", max_seq_len=256)


@pytest.fixture(scope="session")
def ragged_build(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> DecoderBuild:
    """The exact variant with the ``query_seqlens`` input and last-position logits only."""
    return import_gguf(gguf_file, tmp_path_factory.mktemp("smollm2_ragged"), "exact", max_seq_len=256,
                       logits="last", with_query_seqlens=True)


def _generation(build: DecoderBuild) -> dict:
    return json.loads(build.generation_path.read_text())


@pytest.fixture(scope="session")
def decoders(builds) -> dict[str, OnnxRuntimeDecoder]:
    """One parity decoder per tier (one row), shared by the tests that decode one sequence at a time."""
    return {tier: parity_decoder(build.model_path, _generation(build), CAPACITY) for tier, build in builds.items()}


@pytest.fixture(scope="session")
def all_logits_decoder(all_logits_build) -> OnnxRuntimeDecoder:
    return parity_decoder(all_logits_build.model_path, _generation(all_logits_build), CAPACITY)


def _prompt_text(build: DecoderBuild, item: dict) -> str:
    if "messages" in item:
        return render_chat(build.chat_template_path.read_text(), item["messages"], add_generation_prompt=True)
    return item["raw_prompt"]


def _divergence(ours: list[int], theirs: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


# ------------------------------------------------------------------------------------------ build outputs

def test_build_outputs_and_metadata(builds):
    build = builds["exact"]
    assert (build.num_layers, build.num_kv_heads, build.head_dim, build.vocab_size) == (30, 3, 64, 49152)
    assert build.context_length == 8192 and build.variant == "exact"
    assert build.bos_token_id == 1 and build.eos_token_ids[0] == 2
    generation = _generation(build)
    assert generation["hidden_size"] == 576 and generation["num_heads"] == 9
    assert generation["max_seq_len"] == 8192 and generation["logits"] == "last"
    model = onnx.load(str(build.model_path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    # query_seqlens: the scheduler prefills several new prompts in one ragged call
    assert inputs[:4] == ["input_ids", "seqlens_k", "total_sequence_length", "query_seqlens"]
    assert inputs[4:6] == ["past_key_values.0.key", "past_key_values.0.value"] and len(inputs) == 4 + 60
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"] and len(outputs) == 1 + 60
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": 17, "com.microsoft": 1}
    kinds = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= kinds
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {1}
    fast = onnx.load(str(builds["fast"].model_path), load_external_data=False)
    assert {a.i for n in fast.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"} == {4}


def test_repacking_is_bit_exact(gguf_file):
    _, tensors = read_gguf(gguf_file)
    for name, convert in (("blk.3.ffn_gate.weight", q4_repack.q4_1_to_nbits),
                          ("token_embd.weight", q4_repack.q8_0_to_split_nbits),
                          ("token_embd.weight", q4_repack.q8_0_to_nbits)):
        t = tensors[name]
        k, n = (int(x) for x in t.shape)
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(n, k)
        np.testing.assert_array_equal(convert(np.asarray(t.data), n, k).dequantize(), ref)


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _assert_q8_0_head(model: onnx.ModelProto, whole: bool) -> None:
    """The tied LM head reads the gather's initializers, 8-bit over the input, or split over the input twice."""
    head = next(n for n in model.graph.node if n.name == "lm_head")
    assert head.input[1] == "token_embd.qweight"
    names = {n.name for n in model.graph.node}
    if whole:
        assert (_attribute(head, "bits"), _attribute(head, "K")) == (8, 576)
        assert "lm_head/repeat_input" not in names and "lm_head/offset" not in names
    else:
        assert (_attribute(head, "bits"), _attribute(head, "K")) == (4, 2 * 576)
        assert {"lm_head/repeat_input", "lm_head/offset"} <= names


def _assert_gathers_the_table_exactly(model: onnx.ModelProto, gguf_file: Path) -> None:
    import onnxruntime as ort

    model.graph.value_info.append(onnx.helper.make_tensor_value_info("embed/reshape/out", onnx.TensorProto.FLOAT,
                                                                     ["tokens", 576]))
    embedded = onnx.utils.Extractor(model).extract_model(["input_ids"], ["embed/reshape/out"])
    session = ort.InferenceSession(embedded.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 1, 2, 17, 4096, 49151]], np.int64)
    t = read_gguf(gguf_file)[1]["token_embd.weight"]
    k, n = (int(x) for x in t.shape)
    table = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(n, k)
    np.testing.assert_array_equal(session.run(None, {"input_ids": ids})[0], table[ids[0]])


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_the_q8_0_table_takes_the_form_timed_faster_and_is_gathered_exactly(builds, gguf_file, variant):
    """The tied LM head (a Q8_0 table): split into 4-bit halves for float32 activations; for int8 ones, the form
    (8-bit or split) the build timed faster on this machine, as its provenance says."""
    folder = builds[variant].model_path.parent
    stages = json.loads((folder / "provenance.json").read_text())["stages"]
    figures = next(s for s in stages if "import GGUF" in s["stage"])["figures"]
    if variant == "fast":
        timed = {form: figures.get(f"{form}_ms_per_row", float("inf")) for form in ("8-bit", "split")}
        faster = "8-bit" if timed["8-bit"] < MARGIN * timed["split"] else "split"
        assert figures["q8_0_form"] == faster and figures["shape"] == [49152, 576]
        whole = faster == "8-bit"
    else:
        assert "q8_0_form" not in figures
        whole = False
    model = onnx.load(str(builds[variant].model_path))
    _assert_q8_0_head(model, whole)
    _assert_gathers_the_table_exactly(model, gguf_file)


def test_either_q8_0_form_gives_the_same_function(gguf_file):
    """Whatever the timing picks: the 8-bit graph's gather is exact too, and the form is refused with float32
    activations (whose 8-bit kernel is very slow)."""
    meta, tensors = read_gguf(gguf_file)
    cfg = LlamaConfig.from_metadata(meta, 49152)
    model = build_graph(tensors, cfg, accuracy_level=INT8_ACTIVATIONS, max_seq_len=256, logits="last",
                        whole_q8=True)
    _assert_q8_0_head(model, whole=True)
    _assert_gathers_the_table_exactly(model, gguf_file)
    with pytest.raises(ValueError, match="int8 activations"):
        build_graph(tensors, cfg, accuracy_level=1, max_seq_len=256, whole_q8=True)


def test_the_q8_form_timer_reports_both_forms_and_picks_the_faster():
    timer = Q8FormTimer(runs=5)
    whole = timer(1024, 576)
    figures = timer.figures
    assert figures["shape"] == [1024, 576] and figures["8-bit_ms_per_row"] > 0 and figures["split_ms_per_row"] > 0
    assert whole == (figures["8-bit_ms_per_row"] < MARGIN * figures["split_ms_per_row"])
    assert figures["q8_0_form"] == ("8-bit" if whole else "split")


@pytest.mark.parametrize(("eight_bit", "split", "form"), [(0.0030, 0.0040, "8-bit"), (0.0038, 0.0040, "split"),
                                                           (RuntimeError("no kernel for 8-bit weights"), 0.004,
                                                            "split")])
def test_the_8_bit_form_must_win_by_the_margin_and_a_form_that_fails_loses(eight_bit, split, form):
    timer = Q8FormTimer(timing=lambda rows, columns, threads, runs: {"8-bit": eight_bit, "split": split})
    assert timer(49152, 576) is (form == "8-bit")
    assert timer.figures["q8_0_form"] == form and timer.figures["split_ms_per_row"] == pytest.approx(split * 1e3)
    if isinstance(eight_bit, Exception):
        assert timer.figures["8-bit_error"] == "RuntimeError: no kernel for 8-bit weights"
        assert "8-bit_ms_per_row" not in timer.figures


def test_q4_0_repacking_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(q4_repack.q4_0_to_nbits(raw, 8, 64).dequantize(), ref)


# ------------------------------------------------------------------------------------------ tokenizer

def test_prompt_text_and_ids_match_reference(builds, reference):
    build = builds["exact"]
    tokenizer = Tokenizer.from_file(str(build.tokenizer_path))
    for item in reference:
        text = _prompt_text(build, item)
        if "prompt_text" in item:
            assert text == item["prompt_text"]
        assert tokenizer.encode(text, add_special_tokens=False).ids == item["prompt_ids"], text
        assert tokenizer.decode(item["greedy_ids"]) == item["greedy_text"]


def test_tokenizer_special_tokens_and_digits(builds):
    tokenizer = Tokenizer.from_file(str(builds["exact"].tokenizer_path))
    enc = tokenizer.encode("<|im_start|>user\nIn 2024<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert enc.tokens[-6:-1] == ["Ġ", "2", "0", "2", "4"]  # every digit on its own
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == "user\nIn 2024"


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        render_chat("{{ messages.append(1) }}", [])
    with pytest.raises(SecurityError):
        render_chat("{{ ''.__class__.__mro__ }}x{{ ().__class__.__subclasses__() }}", [])


# ------------------------------------------------------------------------------------------ parity

@pytest.fixture(scope="session")
def exact_runs(builds, decoders, reference) -> list[tuple[list[int], np.ndarray]]:
    eos = builds["exact"].eos_token_ids
    return [greedy(decoders["exact"], item["prompt_ids"], STEPS, eos) for item in reference]


def test_exact_greedy_ids_match_reference(exact_runs, reference):
    for (ids, _), item in zip(exact_runs, reference, strict=True):
        assert ids == item["greedy_ids"], f"diverges at {_divergence(ids, item['greedy_ids'])}"


def test_exact_first_step_top5_logits(exact_runs, reference):
    worst = 0.0
    for (_, logits), item in zip(exact_runs, reference, strict=True):
        ref_ids = [int(t) for t, _ in item["first_step_top5_logits"]]
        ref_values = np.array([v for _, v in item["first_step_top5_logits"]])
        np.testing.assert_allclose(logits[ref_ids], ref_values, atol=1e-3, rtol=0)
        assert list(np.argsort(-logits)[:5]) == ref_ids
        worst = max(worst, float(np.abs(logits[ref_ids] - ref_values).max()))
    print(f"\nexact: first-step top-5 logits within {worst:.2e} of the reference")


def test_fast_variant_agreement(builds, decoders, reference):
    eos = builds["fast"].eos_token_ids
    divergences, forced, top5 = [], 0, 0.0
    for item in reference:
        ids, logits = greedy(decoders["fast"], item["prompt_ids"], STEPS, eos)
        divergences.append(_divergence(ids, item["greedy_ids"]))
        choices = teacher_forced_argmax(decoders["fast"], item["prompt_ids"], item["greedy_ids"], eos)
        forced += int((choices == np.array(item["greedy_ids"])).sum())
        ref_ids = [int(t) for t, _ in item["first_step_top5_logits"]]
        top5 = max(top5, float(np.abs(logits[ref_ids] - [v for _, v in item["first_step_top5_logits"]]).max()))
    total = STEPS * len(reference)
    print(f"\nfast: tokens before divergence {divergences}; teacher-forced top-1 {forced}/{total} "
          f"({forced / total:.1%}); first-step top-5 max |error| {top5:.3f}")
    assert forced / total >= FAST_MIN_TEACHER_FORCED
    assert top5 <= FAST_MAX_TOP5_ERROR
    assert float(np.median(divergences)) >= FAST_MIN_MEDIAN_DIVERGENCE


# ------------------------------------------------------------------------------------------ KV cache contract

def _alone(decoder: OnnxRuntimeDecoder, prompt: list[int], steps: int) -> list[int]:
    return greedy(decoder, prompt, steps)[0]


def _together(decoder: OnnxRuntimeDecoder, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens of ``prompts`` prefilled row by row, then decoded in one call of exactly their rows a step."""
    lengths = [len(p) for p in prompts]
    decoder.ensure(max(lengths) + steps)
    tokens = [[int(decoder.run(row, _ids(p), np.array([len(p) - 1], np.int32))[0].argmax())]
              for row, p in enumerate(prompts)]
    for _ in range(steps - 1):
        chosen = decoder.run(0, _ids(*[[t[-1]] for t in tokens]), np.array(lengths, np.int32)).argmax(axis=-1)
        for row, row_tokens in enumerate(tokens):
            row_tokens.append(int(chosen[row]))
            lengths[row] += 1
    return tokens


def _ids(*rows: list[int]) -> np.ndarray:
    return np.array(rows, np.int64)


@pytest.mark.parametrize("prefill", ["one_padded_call", "row_by_row"])
def test_batched_decode_matches_single_stream(all_logits_build, all_logits_decoder, reference, prefill):
    """Two prompts of different lengths in rows 0 and 1 of one shared KV buffer, each row's tokens starting at
    position 0 (padding only after them), decoded together for 8 steps: same tokens as each alone."""
    build = all_logits_build
    a, b = reference[0]["prompt_ids"], reference[5]["prompt_ids"]  # 37 and 4 tokens
    decoder = parity_decoder(build.model_path, _generation(build), 64, rows=2)
    lengths = np.array([len(a), len(b)], np.int32)
    if prefill == "one_padded_call":
        ids = np.zeros((2, len(a)), np.int64)
        ids[0], ids[1, :len(b)] = a, b
        logits = decoder.logits(0, ids, lengths - 1)  # every position: row 1's last one is not the last column
        tokens = [[int(logits[0, len(a) - 1].argmax())], [int(logits[1, len(b) - 1].argmax())]]
    else:  # how a scheduler admits a request: a one-row prefill on its row
        tokens = [[int(decoder.run(1, _ids(b), lengths[1:] - 1)[0].argmax())]]
        tokens.insert(0, [int(decoder.run(0, _ids(a), lengths[:1] - 1)[0].argmax())])
    for _ in range(7):
        lengths += 1
        logits = decoder.run(0, _ids([tokens[0][-1]], [tokens[1][-1]]), lengths - 1)
        assert logits.shape == (2, build.vocab_size)
        for row in (0, 1):
            tokens[row].append(int(logits[row].argmax()))
    assert tokens[0] == _alone(all_logits_decoder, a, 8)
    assert tokens[1] == _alone(all_logits_decoder, b, 8)


def test_chunked_prefill_equals_one_prefill(all_logits_build, reference):
    """The prompt whole in row 0, in 16-token chunks in row 1: the same logits at every position."""
    build = all_logits_build
    prompt = reference[3]["prompt_ids"]
    decoder = parity_decoder(build.model_path, _generation(build), 64, rows=2)
    whole = decoder.logits(0, _ids(prompt), np.array([len(prompt) - 1], np.int32))[0]
    parts = []
    for start in range(0, len(prompt), 16):
        chunk = prompt[start:start + 16]
        parts.append(decoder.logits(1, _ids(chunk), np.array([start + len(chunk) - 1], np.int32))[0])
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-3, rtol=0)


def test_ragged_chunks_with_query_seqlens(ragged_build, decoders, reference):
    """Built with ``query_seqlens`` and last-position logits: one row decodes while another is prefilled in
    16-token chunks and a third row idles, all in the same calls."""
    a, b = reference[0]["prompt_ids"], reference[3]["prompt_ids"]
    decoder = parity_decoder(ragged_build.model_path, _generation(ragged_build), 128, rows=3)
    assert decoder.takes_query_seqlens and not decoder.all_positions and decoder.capacity == 128
    ids = np.zeros((3, len(a)), np.int64)
    ids[0] = a
    logits = decoder.logits(0, ids, np.array([len(a) - 1, 0, 0]), query_seqlens=np.array([len(a), 0, 0]),
                            total_sequence_length=128)
    assert logits.shape == (3, 1, ragged_build.vocab_size)
    out_a, len_a, out_b, len_b = [int(logits[0, 0].argmax())], len(a), [], 0
    while len(out_a) < 8 or len(out_b) < 8:
        chunk = b[len_b:len_b + 16] if len_b < len(b) else ([out_b[-1]] if len(out_b) < 8 else [])
        step_a = int(len(out_a) < 8)
        width = max(step_a, len(chunk), 1)
        ids = np.zeros((3, width), np.int64)
        ids[0, 0] = out_a[-1] if step_a else 0
        ids[1, :len(chunk)] = chunk
        seqlens = np.array([len_a + step_a - 1, max(len_b + len(chunk) - 1, 0), 0])
        logits = decoder.logits(0, ids, seqlens, query_seqlens=np.array([step_a, len(chunk), 0]),
                                total_sequence_length=128)
        if step_a:
            len_a += 1
            out_a.append(int(logits[0, 0].argmax()))
        len_b += len(chunk)
        if chunk and len_b >= len(b):
            out_b.append(int(logits[1, 0].argmax()))
    assert out_a == _alone(decoders["exact"], a, 8)
    assert out_b == _alone(decoders["exact"], b, 8)


def test_rebuilding_unchanged_tiers_does_nothing(smollm2_gguf, smollm2_repo):
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers

    lines: list[str] = []
    results = build_decoder_tiers(smollm2_gguf, smollm2_repo, "smollm2-135m", DecoderOptions(), lines.append)
    assert [(r.name, r.built) for r in results] == [("smollm2-135m", False), ("smollm2-135m-fast", False)]
    assert all("up to date" in line for line in lines)


# ------------------------------------------------------------------------------------------ the CUDA graph

# Measured when the CUDA graph was added (ONNX Runtime 1.32's CPU execution provider running the FP16 graph, 2-core
# AMD EPYC): teacher-forced top-1 agreement with the exact tier 48/48, tokens before the first divergence
# [16, 16, 16]. The bounds leave room for other CPUs' FP16 kernels; the gpu tests bound the CUDA run by the figure
# recorded in the provenance.
CUDA_MIN_TEACHER_FORCED = 0.95
CUDA_MIN_DIVERGENCE = 8


def test_the_exact_tier_carries_an_fp16_graph_for_the_cuda_provider_within_its_agreement(smollm2_repo):
    import tomllib

    folder = smollm2_repo / "smollm2-135m" / "1"
    engine = tomllib.loads((folder / "model.toml").read_text())["engine"]
    assert engine["file"] == "model.onnx" and engine["cuda_file"] == "model.cuda.onnx"
    assert "cuda_file" not in tomllib.loads((smollm2_repo / "smollm2-135m-fast" / "1" / "model.toml").read_text())[
        "engine"]
    graph = onnx.load(str(folder / "model.cuda.onnx"), load_external_data=False)
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.graph.input, *graph.graph.output]}
    assert types["past_key_values.0.key"] == types["present.29.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT and types["input_ids"] == onnx.TensorProto.INT64
    provenance = json.loads((folder / "provenance.json").read_text())
    figures = provenance["parity"]["cuda_graph_agreement_with_exact"]
    print(f"\ncuda graph (CPU execution provider): {figures}")
    assert figures["provider"] == "CPUExecutionProvider"
    assert figures["teacher_forced_top1"] >= CUDA_MIN_TEACHER_FORCED
    assert min(figures["tokens_before_divergence"]) >= CUDA_MIN_DIVERGENCE
    assert any(s["stage"].endswith("graph for the CUDA execution provider (FP16)") for s in provenance["stages"])


class SmallStartDecoder(OnnxRuntimeDecoder):
    INITIAL_CAPACITY = 16  # so that the rows below outgrow the cache while decoding together


@pytest.mark.parametrize("graph", ["model.onnx", "model.cuda.onnx"], ids=["fast_tier", "cuda_graph"])
def test_padded_decode_buckets_give_each_row_its_lone_tokens(smollm2_repo, builds, reference, graph,
                                                             fast_tier_deterministic):
    """Three rows decoded together run in the bucket of four (row 3 idle) over the device cache bound by address,
    which grows twice on the way; each row gets the tokens it gets alone. Where the fast tier is batch-invariant its
    rows must match exactly; where its build measured one-row calls computing otherwise (AVX2) they must match the
    same three rows decoded together without the idle row. The CUDA graph's FP16 rows are checked against each row
    alone on this CPU, half of its steps through its next_token output (the ids alone come back)."""
    from appliance.engines.device_memory import HostMemory
    from appliance.engines.onnxruntime_decoder import Placement

    folder = smollm2_repo / ("smollm2-135m-fast" if graph == "model.onnx" else "smollm2-135m") / "1"
    generation = _generation(builds["exact"])
    placement = Placement(device="cpu", memory=HostMemory(), buckets=True)
    decoder = SmallStartDecoder(folder / graph, generation, rows=4, max_capacity=64, spin=True, placement=placement)
    alone_decoder = parity_decoder(folder / graph, generation, 64)
    prompts = [reference[i]["prompt_ids"][:12] for i in (1, 2, 3)]
    steps = 30
    tokens = [[int(decoder.run(row, _ids(p), np.array([len(p) - 1], np.int32))[0].argmax())]
              for row, p in enumerate(prompts)]
    lengths = [len(p) for p in prompts]
    assert decoder.decode_range(0, 3) == (0, 4) and decoder.decode_range(0, 1) == (0, 1)
    for step in range(steps - 1):
        decoder.ensure(max(lengths) + 1)
        ids = _ids(*[[t[-1]] for t in tokens], [0])
        seqlens = np.array([*lengths, 0], np.int32)
        # Every other step takes the graph's own greedy choices (the CUDA graph's next_token output) where it has
        # them; the fast tier's graph has none.
        chosen = decoder.greedy_tokens(0, ids, seqlens) if step % 2 else None
        assert (chosen is None) == (graph == "model.onnx" or not step % 2)
        if chosen is None:
            chosen = decoder.run(0, ids, seqlens).argmax(axis=-1)
        for row in range(3):
            tokens[row].append(int(chosen[row]))
            lengths[row] += 1
    assert decoder.capacity == 64 and decoder.kv.generation == 3  # grown 16 -> 32 -> 64 while decoding
    assert decoder._graphs is not None and decoder._graphs.runs == {4: steps - 1}
    if graph == "model.onnx" and not fast_tier_deterministic:
        assert tokens == _together(parity_decoder(folder / graph, generation, 64, rows=3), prompts, steps)
    else:
        assert tokens == [_alone(alone_decoder, p, steps) for p in prompts]


def test_appliance_build_no_cuda_graph_writes_the_tiers_without_it(smollm2_gguf, tmp_path):
    import tomllib

    repo = tmp_path / "repo"
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "build", "--source", str(smollm2_gguf), "--name",
                             "mine", "--no-tensorrt", "--no-cuda-graph", "--models", str(repo)],
                            env={**os.environ, "APPLIANCE_PATHS_STATE_DIR": str(tmp_path / "state")},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    exact = repo / "mine" / "1"
    assert (exact / "model.onnx").is_file() and not (exact / "model.cuda.onnx").exists()
    assert "cuda_file" not in tomllib.loads((exact / "model.toml").read_text())["engine"]
    assert (repo / "mine-fast" / "1" / "model.onnx").is_file()


def test_the_fast_tier_is_marked_deterministic_only_where_its_build_measured_it_invariant():
    from appliance.build.decoder_entry import _invariance_line

    assert _invariance_line("fast", True).startswith("true  # measured batch-invariant on the building CPU")
    assert _invariance_line("fast", False).startswith("false  # not batch-invariant on the building CPU")
    assert _invariance_line("exact", True).startswith("false  # not batch-invariant:")

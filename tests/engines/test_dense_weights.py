"""The float32 twin of a MatMulNBits graph computes what the 4-bit graph computes, for every weight form the
decoder builder writes, and the exact tier's decoder uses it for multi-row calls."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from appliance.engines.dense_weights import DenseTwin, dense_twin
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder
from nbits_forms import FORMS, K, N, ROWS, forms_model, session, weight
from reference_data import reference_items

def test_twin_computes_every_weight_form_like_the_4_bit_graph():
    rng = np.random.default_rng(7)
    weights = {name: weight(rng, **form) for name, form in FORMS.items()}
    model = forms_model(weights)
    original = session(model.SerializeToString())
    twin = dense_twin(model)
    assert len(twin.weights) == len(FORMS)
    dense = onnx.load_from_string(twin.graph)
    # Only the plain products are left: the repeat, the block sums and the offset Gemms were folded in.
    assert sorted({node.op_type for node in dense.graph.node}) == ["MatMul"]
    assert twin.weight_bytes == len(FORMS) * K * N * 4
    x = rng.standard_normal((ROWS, K)).astype(np.float32)
    want = original.run(None, {"x": x})
    got = session(twin.graph, twin).run(None, {"x": x})
    for name, w, a, b in zip(weights, weights.values(), want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(b, x @ w.dequantize().T, rtol=1e-4, atol=1e-4, err_msg=name)


def test_twin_leaves_forms_it_does_not_know_alone():
    rng = np.random.default_rng(8)
    model = forms_model({"q4": weight(rng)})
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    node.attribute.remove(next(a for a in node.attribute if a.name == "block_size"))
    node.attribute.append(helper.make_attribute("block_size", 64))
    twin = dense_twin(model)
    assert not twin.weights
    assert [n.op_type for n in onnx.load_from_string(twin.graph).graph.node] == ["MatMulNBits"]


@pytest.fixture(scope="module")
def exact_decoder(smollm2_repo):
    folder = smollm2_repo / "smollm2-135m" / "1"
    generation = json.loads((folder / "generation.json").read_text())
    return OnnxRuntimeDecoder(folder / "model.onnx", generation, rows=4, max_capacity=256, dense_batches=True,
                              spin=True)


def test_exact_tier_decodes_rows_together_as_each_alone(exact_decoder, smollm2_repo):
    """Rows prefilled and decoded through the twin pick the tokens of the independent reference, and of the 4-bit
    graph decoding each row alone."""
    decoder = exact_decoder
    assert decoder.uses_dense_twin
    items = reference_items("smollm2-135m-instruct")
    eos = json.loads((smollm2_repo / "smollm2-135m" / "1" / "generation.json").read_text())["eos_token_ids"]

    def pick(row_logits: np.ndarray) -> int:  # the reference never ends early: end-of-text ids are suppressed
        row_logits[eos] = -np.inf
        return int(row_logits.argmax())

    chosen = [items[0], items[3], items[5]]  # 37, 51 and 4 prompt tokens
    steps = 12
    alone = []
    for row, item in enumerate(chosen):  # a row at a time: prefill (twin), then one-token steps (4-bit graph)
        prompt = item["prompt_ids"]
        logits = decoder.run(row, np.array([prompt]), np.array([len(prompt) - 1], np.int32))
        tokens, length = [pick(logits[0])], len(prompt)
        for _ in range(steps - 1):
            logits = decoder.run(row, np.array([[tokens[-1]]]), np.array([length], np.int32))
            length += 1
            tokens.append(pick(logits[0]))
        alone.append(tokens)
    assert alone == [item["greedy_ids"][:steps] for item in chosen]
    together = [[tokens[0]] for tokens in alone]
    lengths = np.array([len(item["prompt_ids"]) for item in chosen], np.int32)
    for _ in range(steps - 1):  # all rows in one call each step: the twin
        logits = decoder.run(0, np.array([[t[-1]] for t in together]), lengths)
        lengths += 1
        for row, tokens in enumerate(together):
            tokens.append(pick(logits[row]))
    assert together == alone


def test_exact_tier_without_memory_for_the_twin_serves_from_the_4_bit_graph(smollm2_repo, caplog):
    def no_memory(model: onnx.ModelProto, **_: object) -> DenseTwin:
        raise MemoryError("cannot allocate 540 MB")

    folder = smollm2_repo / "smollm2-135m" / "1"
    generation = json.loads((folder / "generation.json").read_text())
    with caplog.at_level("WARNING", logger="appliance.engines.onnxruntime_decoder"):
        decoder = OnnxRuntimeDecoder(folder / "model.onnx", generation, rows=2, max_capacity=64,
                                     dense_batches=True, twin_builder=no_memory)
    assert not decoder.uses_dense_twin
    assert any("cannot allocate 540 MB" in record.getMessage() for record in caplog.records)
    logits = decoder.run(0, np.ones((2, 1), np.int64), np.array([0, 0], np.int32))
    assert logits.shape == (2, generation["vocab_size"]) and np.isfinite(logits).all()


def test_the_kv_cache_size_is_reported_from_its_rows_and_positions(exact_decoder, smollm2_repo):
    generation = json.loads((smollm2_repo / "smollm2-135m" / "1" / "generation.json").read_text())
    per_position = generation["num_layers"] * 2 * generation["num_kv_heads"] * generation["head_dim"] * 4
    assert exact_decoder.kv_cache_bytes() == 4 * 256 * per_position  # rows x max_capacity, float32 K and V
    assert exact_decoder.kv_cache_bytes(exact_decoder.capacity) == 4 * exact_decoder.capacity * per_position
    assert f"{4 * 256 * per_position / 2**20:.0f} MiB at most" in exact_decoder.description


def test_a_twin_of_named_nodes_leaves_the_others_4_bit_and_takes_weights_made_before():
    rng = np.random.default_rng(9)
    weights = {name: weight(rng, **form) for name, form in FORMS.items()}
    model = forms_model(weights)
    original = session(model.SerializeToString())
    split_node = next(n.name for n in model.graph.node if n.op_type == "MatMulNBits" and "q8_0_split" in n.name)
    made = dense_twin(forms_model(weights), only={split_node})
    twin = dense_twin(model, only={split_node}, dequantized=made.weights)
    assert list(twin.weights) == [f"{split_node}.dense_weight_t"]
    assert all(twin.weights[name] is made.weights[name] for name in twin.weights)  # taken, not made again
    ops = [node.op_type for node in onnx.load_from_string(twin.graph).graph.node]
    assert ops.count("MatMulNBits") == len(FORMS) - 1 and ops.count("MatMul") >= 1 and "Concat" not in ops
    x = rng.standard_normal((ROWS, K)).astype(np.float32)
    for name, a, b in zip(weights, original.run(None, {"x": x}), session(twin.graph, twin).run(None, {"x": x})):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)

"""The one-row form of a float32 graph's split 8-bit weights: which nodes qualify, the timed choice and its margin,
the rewritten graph computing what the built one does, and the exact tier's decoder serving either form."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.engines import split_weights
from appliance.engines.dense_weights import DenseTwin
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder
from appliance.engines.split_weights import DENSE, SPLIT, choose_form, float32_split_nodes, one_row_twin
from reference_data import reference_items
from nbits_forms import FORMS, K, ROWS, forms_model, session, weight


def _forms_model(accuracy_level: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    model = forms_model({name: weight(rng, **form) for name, form in FORMS.items()})
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = accuracy_level
    return model


def _timing(split_ms: float, dense: float | Exception):
    calls = []

    def timing(piece: onnx.ModelProto, dense_piece: DenseTwin, threads: int, runs: int) -> dict:
        calls.append((piece, dense_piece))
        return {SPLIT: split_ms / 1e3, DENSE: dense if isinstance(dense, Exception) else dense / 1e3}

    return timing, calls


def test_only_float32_products_over_a_repeated_input_qualify():
    assert float32_split_nodes(_forms_model()) == ["q8_0_split"]
    assert float32_split_nodes(_forms_model(accuracy_level=4)) == []  # the int8 variant's arithmetic stays its own


@pytest.mark.parametrize(("split_ms", "dense", "form"), [
    (11.5, 6.2, DENSE),  # AVX2, as measured
    (10.0, 9.5, SPLIT),  # within the margin: the graph as built
    (10.0, RuntimeError("no kernel"), SPLIT),  # a form that cannot run loses
])
def test_the_timed_choice_takes_dense_only_by_a_clear_margin(split_ms, dense, form):
    timing, calls = _timing(split_ms, dense)
    chosen = choose_form(_forms_model(), "timed", threads=1, timing=timing)
    assert chosen.form == form and chosen.nodes == ["q8_0_split"] and len(calls) == 1
    assert chosen.ms_per_row[SPLIT] == pytest.approx(split_ms)
    if isinstance(dense, Exception):
        assert chosen.errors == {DENSE: "RuntimeError: no kernel"} and DENSE not in chosen.ms_per_row
    assert bool(chosen.weights) == (form == DENSE)  # the timing's dense weights are kept only for the dense form
    assert f"split 8-bit weights {form} in one-row steps" in chosen.description


def test_asked_forms_and_graphs_without_split_weights_are_not_timed():
    timing, calls = _timing(1.0, 0.1)
    assert choose_form(_forms_model(), DENSE, 1, timing=timing).form == DENSE
    assert choose_form(_forms_model(), SPLIT, 1, timing=timing).form == SPLIT
    untouched = choose_form(_forms_model(accuracy_level=4), "timed", 1, timing=timing)
    assert untouched.form == SPLIT and untouched.nodes == [] and "(" not in untouched.description
    assert calls == []
    with pytest.raises(ValueError, match="one of timed, split, dense"):
        choose_form(_forms_model(), "fastest", 1)


def test_the_timed_piece_and_the_one_row_graph_compute_what_the_built_graph_does():
    model = _forms_model()
    original = session(model.SerializeToString())
    captured = {}

    def timing(piece, dense_piece, threads, runs):
        captured["piece"], captured["dense"] = piece, dense_piece
        measured = split_weights.time_forms(piece, dense_piece, threads, 3)  # the real timer, briefly
        assert set(measured) == {SPLIT, DENSE} and all(isinstance(v, float) and v > 0 for v in measured.values())
        return {SPLIT: 2.0, DENSE: 1.0}

    chosen = choose_form(model, "timed", 1, timing=timing)
    x = np.random.default_rng(12).standard_normal((ROWS, K)).astype(np.float32)
    want = dict(zip([o.name for o in model.graph.output], original.run(None, {"x": x})))
    piece = captured["piece"]
    assert [i.name for i in piece.graph.input] == ["x"] and len(piece.graph.output) == 1
    product = piece.graph.output[0].name
    piece_session = ort.InferenceSession(piece.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(piece_session.run(None, {"x": x[:1]})[0], want[product][:1], rtol=1e-5, atol=1e-5)
    twin = one_row_twin(model, chosen)
    assert twin is not None and list(twin.weights) == list(captured["dense"].weights)
    assert all(twin.weights[name] is chosen.weights[name] for name in twin.weights)  # taken, not dequantized again
    ops = [node.op_type for node in onnx.load_from_string(twin.graph).graph.node]
    assert ops.count("MatMulNBits") == len(FORMS) - 1
    got = session(twin.graph, twin).run(None, {"x": x})
    for name, value in zip(want, got):
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_the_exact_tier_serves_one_row_steps_with_dense_split_weights(smollm2_repo):
    """Forced dense: the rewritten one-row graph picks the independent reference's greedy tokens, and the load
    line says which form runs; timed: both forms measured on this CPU, the choice one of them."""
    folder = smollm2_repo / "smollm2-135m" / "1"
    generation = json.loads((folder / "generation.json").read_text())
    decoder = OnnxRuntimeDecoder(folder / "model.onnx", generation, rows=1, max_capacity=128, spin=True,
                                 split_weights=DENSE)
    assert decoder.split_weights.form == DENSE and decoder.split_weights.nodes == ["lm_head"]
    assert "split 8-bit weights dense in one-row steps" in decoder.description
    item = reference_items("smollm2-135m-instruct")[3]
    prompt, steps = item["prompt_ids"], 10

    def pick(row_logits: np.ndarray) -> int:  # the reference never ends early: end-of-text ids are suppressed
        row_logits[generation["eos_token_ids"]] = -np.inf
        return int(row_logits.argmax())

    logits = decoder.run(0, np.array([prompt]), np.array([len(prompt) - 1], np.int32))
    tokens, length = [pick(logits[0])], len(prompt)
    for _ in range(steps - 1):
        logits = decoder.run(0, np.array([[tokens[-1]]]), np.array([length], np.int32))
        length += 1
        tokens.append(pick(logits[0]))
    assert tokens == item["greedy_ids"][:steps]
    decoder.close()
    timed = OnnxRuntimeDecoder(folder / "model.onnx", generation, rows=1, max_capacity=64, split_weights="timed")
    assert timed.split_weights.form in (SPLIT, DENSE) and set(timed.split_weights.ms_per_row) == {SPLIT, DENSE}
    assert timed.split_weights.weights == {}  # nothing kept beyond the session's own copy
    assert "ms split a row" in timed.description
    timed.close()

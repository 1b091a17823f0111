"""The FP16 copy (TensorRT 11's precision) of the real MiniLM built by the session's pipeline: it loads on ONNX
Runtime's CPU execution provider, keeps its inputs, outputs and the numerically sensitive ops in FP32, reproduces
the FP32 model above the default threshold, and is refused above what it measures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from appliance.build.entries import QualityBelowThreshold
from appliance.build.fp16 import (
    CONVERTER_DEFAULT_BLOCK_LIST,
    DEFAULT_MIN_COSINE,
    KEEP_FP32_OPS,
    SENSITIVE_OPS,
    convert_to_fp16,
    fp16_parity,
)
from appliance.cli import _parser

MAX_LENGTH = 256


@pytest.fixture(scope="session")
def minilm_fp16(minilm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(the FP32 model, its FP16 copy, the conversion's figures), converted once per run."""
    source = minilm_repo / "minilm-l6" / "1" / "model.onnx"
    target = tmp_path_factory.mktemp("minilm-fp16") / "model.fp16.onnx"
    return source, target, convert_to_fp16(source, target)


@pytest.fixture(scope="session")
def minilm_fp16_parity(minilm_fp16) -> dict:
    source, target, _ = minilm_fp16
    return fp16_parity(source, target, source.parent / "tokenizer.json", MAX_LENGTH, DEFAULT_MIN_COSINE)


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update((t.name, t.data_type) for t in graph.initializer)
    return types


def test_the_copy_is_fp16_with_fp32_io_and_sensitive_ops(minilm_fp16):
    source, target, figures = minilm_fp16
    model = onnx.load(str(target))
    types = element_types(model)
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [
        ("input_ids", TensorProto.INT64), ("attention_mask", TensorProto.INT64)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [
        ("sentence_embedding", TensorProto.FLOAT)]
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"
                      and n.input[1] in {t.name for t in model.graph.initializer}]
    assert matmul_weights and all(types[w] == TensorProto.FLOAT16 for w in matmul_weights)
    kept = [n for n in model.graph.node if n.op_type in KEEP_FP32_OPS]
    assert {n.op_type for n in kept} == {"LayerNormalization", "ReduceSum", "ReduceL2", "Max"}
    for node in kept:  # every float tensor in or out of a kept op is FP32
        tensors = [name for name in (*node.input, *node.output) if name and types.get(name) in
                   (TensorProto.FLOAT, TensorProto.FLOAT16)]
        assert tensors and all(types[name] == TensorProto.FLOAT for name in tensors), node.name
    assert figures["fp32_nodes"] == {"LayerNormalization": 13, "Max": 2, "ReduceL2": 1, "ReduceSum": 2}
    assert figures["keep_fp32_ops"] == list(KEEP_FP32_OPS) and figures["casts_added"] > 0
    assert 0.45 < figures["bytes_after"] / figures["bytes_before"] < 0.55
    assert figures["bytes_after"] == target.stat().st_size and figures["external_data"] is None


def test_the_copy_runs_on_the_cpu_and_matches_the_float_model(minilm_fp16, minilm_fp16_parity):
    _, target, _ = minilm_fp16
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 1012, 102]], np.int64)
    out = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert out.dtype == np.float32 and out.shape == (1, 384) and np.isfinite(out).all()
    parity = minilm_fp16_parity
    assert parity["samples"] == 8 and parity["measured_on"] == "CPUExecutionProvider"
    assert DEFAULT_MIN_COSINE <= parity["min_cosine"] <= parity["mean_cosine"] < 1.0
    assert parity["min_required"] == DEFAULT_MIN_COSINE


def test_a_threshold_above_the_measured_cosine_refuses(minilm_fp16, minilm_fp16_parity):
    source, target, _ = minilm_fp16
    measured = minilm_fp16_parity["min_cosine"]
    threshold = (measured + 1.0) / 2  # above what the copy gives
    with pytest.raises(QualityBelowThreshold) as refused:
        fp16_parity(source, target, source.parent / "tokenizer.json", MAX_LENGTH, threshold, label="minilm-l6")
    message = str(refused.value)
    assert message.startswith("minilm-l6: ") and f"{measured:.8f}" in message
    assert re.search(rf"threshold min_cosine_fp16 = {re.escape(str(threshold))};", message)
    assert "--min-cosine-fp16" in message


def test_the_block_list_starts_from_the_converters_default():
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    assert sorted(CONVERTER_DEFAULT_BLOCK_LIST) == sorted(DEFAULT_OP_BLOCK_LIST)
    assert KEEP_FP32_OPS == CONVERTER_DEFAULT_BLOCK_LIST + SENSITIVE_OPS


def test_a_fused_op_it_cannot_type_is_named(tmp_path):
    node = helper.make_node("MysteryOp", ["x"], ["y"], domain="com.microsoft", name="mystery")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="cannot type the outputs of com.microsoft.MysteryOp"):
        convert_to_fp16(tmp_path / "m.onnx", tmp_path / "m.fp16.onnx")
    assert not (tmp_path / "m.fp16.onnx").exists()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan", "high"])
def test_the_cli_threshold_is_a_cosine(value, capsys):
    assert _parser().parse_args(["build", "--defaults", "--min-cosine-fp16", "0.9995"]).min_cosine_fp16 == 0.9995
    with pytest.raises(SystemExit):
        _parser().parse_args(["build", "--defaults", "--min-cosine-fp16", value])
    assert "is not a cosine threshold: give a number in (0, 1]" in capsys.readouterr().err

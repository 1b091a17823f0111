"""The ONNX Runtime engine: specs read from the model, provider choice, session options, optimized-model cache."""

from __future__ import annotations

import logging

import numpy as np

import tiny_models
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions, choose_providers


def test_specs_come_from_the_model(tmp_path):
    engine = OnnxRuntimeEngine(tiny_models.two_in_two_out(tmp_path / "m.onnx"), OrtOptions(providers=["cpu"]))
    engine.load()
    assert [(t.name, t.datatype, t.shape) for t in engine.inputs] == [("A", "FP32", (-1, 2)), ("B", "FP32", (-1, 2))]
    assert [t.name for t in engine.outputs] == ["SUM", "DIFF"]
    out = engine.run({"A": np.ones((3, 2), np.float32), "B": np.ones((3, 2), np.float32)})
    np.testing.assert_array_equal(out["SUM"], np.full((3, 2), 2, np.float32))


def test_provider_preference_filtered_by_availability():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["tensorrt", "cuda", "cpu"], available) == ["CUDAExecutionProvider",
                                                                      "CPUExecutionProvider"]
    assert choose_providers(["tensorrt"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["cpu"], available) == ["CPUExecutionProvider"]


def test_choice_is_logged_and_unavailable_gpu_falls_back(tmp_path, caplog):
    engine = OnnxRuntimeEngine(
        tiny_models.add_constant(tmp_path / "m.onnx"),
        OrtOptions(providers=["tensorrt", "cuda", "cpu"], intra_op_threads=1),
        available_providers=lambda: ["CPUExecutionProvider"],
    )
    with caplog.at_level(logging.INFO, logger="appliance.engines.onnxruntime"):
        engine.load()
    assert engine.providers == ["CPUExecutionProvider"]
    assert any("providers=CPUExecutionProvider" in r.getMessage() and "intra_op_threads=1" in r.getMessage()
               for r in caplog.records)


def test_optimized_model_is_cached_and_reused(tmp_path, caplog):
    model = tiny_models.add_constant(tmp_path / "m.onnx")
    cache = tmp_path / "cache"
    options = OrtOptions(providers=["cpu"], graph_optimization_level="extended", optimized_model_dir=cache)
    first = OnnxRuntimeEngine(model, options)
    first.load()
    files = list(cache.glob("*.onnx"))
    assert len(files) == 1 and not list(cache.glob("*.partial"))
    with caplog.at_level(logging.INFO, logger="appliance.engines.onnxruntime"):
        second = OnnxRuntimeEngine(model, options)
        second.load()
    assert any("using cached optimized model" in r.getMessage() for r in caplog.records)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(second.run({"INPUT0": x})["OUTPUT0"], x + 1)
    tiny_models.add_constant(model, 5.0)  # new model bytes: a new cache entry, never the stale one
    third = OnnxRuntimeEngine(model, options)
    third.load()
    np.testing.assert_array_equal(third.run({"INPUT0": x})["OUTPUT0"], x + 5)
    assert len(list(cache.glob("*.onnx"))) == 2

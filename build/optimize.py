"""ONNX Runtime offline graph optimization and int8 weight quantization, as build stages."""

from __future__ import annotations

from pathlib import Path

OFFLINE_LEVELS = ("basic", "extended")  # "all" adds hardware-specific layouts, which the server applies itself


def optimize(source: Path, target: Path, level: str = "extended") -> None:
    """Write the graph as ONNX Runtime's optimizer leaves it (fusions, constant folding) to ``target``."""
    import onnxruntime as ort

    if level not in OFFLINE_LEVELS:
        raise ValueError(f"offline optimization level must be one of {OFFLINE_LEVELS}, not {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == "basic"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def quantize_int8(source: Path, target: Path, per_channel: bool = True) -> None:
    """Dynamic int8 quantization of the MatMul weights (per output channel by default)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer reports every tensor at INFO on the root logger
    try:
        quantize_dynamic(str(source), str(target), per_channel=per_channel, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)

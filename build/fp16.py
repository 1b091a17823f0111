"""An FP16 copy of an ONNX model, checked against the FP32 model it came from (for TensorRT 11, whose strongly typed
networks run in the precision the graph is written in: TensorRT 10's ``BuilderFlag.FP16`` is gone).

ONNX Runtime's own converter (``onnxruntime.transformers.float16``) does the work. Graph inputs and outputs stay
FP32 (casts at the edges), and the op types in :data:`KEEP_FP32_OPS` stay FP32 behind casts: the converter's default
block list (ops without FP16 kernels) plus normalizations and reductions, whose FP16 range or rounding is where FP16
goes wrong (TensorRT itself warns that LayerNorm in FP16 may overflow), and which cost next to nothing in FP32.
Softmax and the matrix products stay FP16: casts around them would also break TensorRT's attention fusion.

The converter needs every tensor's element type. ONNX's shape inference does not know ONNX Runtime's fused ops
(``com.microsoft`` FusedMatMul, BiasGelu, ... in graphs optimized at the extended level); their outputs are typed
here from their first input (ONNX Runtime's symbolic shape inference would do it, but needs sympy, which the
appliance does not depend on).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The converter's default block list (onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST, copied so that
# importing this module does not import onnxruntime), then the numerically sensitive ops kept in FP32.
CONVERTER_DEFAULT_BLOCK_LIST = (
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier",
    "TreeEnsembleRegressor", "TreeEnsemble", "ZipMap", "NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum",
    "Min", "Max", "Upsample",
)
SENSITIVE_OPS = (
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",  # normalizations, fused (opset 17, ONNX Runtime's) ...
    "ReduceMean", "Pow", "Sqrt",  # ... or spelled out (older exports)
    "ReduceSum", "ReduceL2",  # pooling: sums over up to max_seq_length tokens, the L2 norm over the dimensions
)
KEEP_FP32_OPS = CONVERTER_DEFAULT_BLOCK_LIST + SENSITIVE_OPS

# ONNX Runtime's fused ops whose listed outputs have the element type of their first input.
_TYPED_LIKE_FIRST_INPUT = {
    "FusedMatMul": (0,), "BiasGelu": (0,), "Gelu": (0,), "FastGelu": (0,), "QuickGelu": (0,), "BiasAdd": (0,),
    "BiasSplitGelu": (0,), "BiasSoftmax": (0,), "FusedGemm": (0,), "FusedConv": (0,), "Attention": (0,),
    "MultiHeadAttention": (0,), "SkipLayerNormalization": (0, 3), "SkipSimplifiedLayerNormalization": (0, 3),
}
# Measured on MiniLM-L6 with KEEP_FP32_OPS (build/parity.py's texts, ONNX Runtime's CPU EP): min cosine 0.9999998
# (mean 0.9999999) against FP32; 0.9999986 (mean 0.9999993) when every activation is also rounded to FP16, as FP16
# kernels store them. 0.999 leaves a thousand times that error for the GPU's kernels and still refuses a broken
# copy (an FP16 overflow gives NaN, refused, or a cosine far below).
DEFAULT_MIN_COSINE = 0.999
_WRITE_EXTERNAL_BYTES = 1_800_000_000  # past this the copy's weights go to <target>.data (protobuf's 2 GiB limit)


def convert_to_fp16(source: Path, target: Path, *, keep_fp32_ops: Sequence[str] = KEEP_FP32_OPS) -> dict[str, Any]:
    """Write an FP16 copy of ``source`` to ``target``: FP32 inputs and outputs, ``keep_fp32_ops`` in FP32.

    Returns figures for the provenance: the op types kept in FP32 (``keep_fp32_ops``), how many nodes of each the
    graph has (``fp32_nodes``), the casts the converter added, and the size before and after.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    _add_element_types(model)
    nodes_before = len(model.graph.node)
    kept = Counter(node.op_type for node in model.graph.node if node.op_type in set(keep_fp32_ops))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32_ops),
                                         disable_shape_infer=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    large = sum(len(t.raw_data) for t in converted.graph.initializer) > _WRITE_EXTERNAL_BYTES
    data = f"{target.name}.data" if large else None
    try:
        onnx.save_model(converted, str(partial), save_as_external_data=large, location=data)
        os.replace(partial, target)  # external data (if any) is already where the target names it
    finally:
        partial.unlink(missing_ok=True)
    return {"converter": "onnxruntime.transformers.float16", "keep_fp32_ops": list(keep_fp32_ops),
            "fp32_nodes": dict(sorted(kept.items())), "casts_added": len(converted.graph.node) - nodes_before,
            "bytes_before": _size(source), "bytes_after": _size(target), "external_data": data}


def fp16_parity(reference: Path, copy: Path, tokenizer: Path, max_length: int, min_cosine: float,
                label: str = "") -> dict[str, Any]:
    """The FP16 copy's cosine against the FP32 ``reference`` on build/parity.py's texts (ONNX Runtime's CPU EP);
    :class:`~appliance.build.entries.QualityBelowThreshold` when the least of them is under ``min_cosine``.

    On the CPU, ONNX Runtime runs the FP16 nodes that lack FP16 kernels in FP32 behind casts it inserts, so the
    figure mostly measures the weights' rounding to FP16 (see :data:`DEFAULT_MIN_COSINE` for the margin).
    """
    from appliance.build.entries import QualityBelowThreshold
    from appliance.build.parity import encoder_parity

    check_min_cosine(min_cosine)
    figures = {**encoder_parity(reference, copy, tokenizer, max_length), "min_required": min_cosine,
               "measured_on": "CPUExecutionProvider"}
    if not figures["min_cosine"] >= min_cosine:  # NaN (an FP16 overflow) is refused too
        raise QualityBelowThreshold(
            f"{label or copy.name}: the FP16 copy's min cosine {figures['min_cosine']:.8f} (mean "
            f"{figures['mean_cosine']:.8f}) against the FP32 model is below the threshold min_cosine_fp16 = "
            f"{min_cosine}; no plan built from it. Lower the threshold (--min-cosine-fp16), keep more op types in "
            f"FP32, or build without TensorRT (--no-tensorrt)")
    return figures


def check_min_cosine(value: float) -> float:
    """``value`` if it can be a cosine threshold (0 < value <= 1), else a ValueError naming the field and the fix."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"min_cosine_fp16 = {value!r} is not a cosine threshold; give a number in (0, 1], such "
                         f"as {DEFAULT_MIN_COSINE}")
    return float(value)


def _size(path: Path) -> int:
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _add_element_types(model) -> None:
    """Give every tensor of ``model`` its element type in ``value_info``, as the converter needs.

    ONNX's shape inference types the standard ops, on a copy without the weights (fast); it stops at each fused op
    it does not know, which is typed from its first input, and inference goes on from there.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    skeleton = helper.make_graph(list(graph.node), graph.name, list(graph.input), list(graph.output),
                                 [t for t in graph.initializer if t.data_type != TensorProto.FLOAT],
                                 value_info=list(graph.value_info))
    declared = {value.name for value in graph.input}
    skeleton.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                          for t in graph.initializer if t.data_type == TensorProto.FLOAT and t.name not in declared)
    shell = helper.make_model(skeleton, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    while True:
        shell = onnx.shape_inference.infer_shapes(shell)
        known = {v.name: v.type.tensor_type.elem_type for v in (*shell.graph.input, *shell.graph.value_info,
                                                                 *shell.graph.output)}
        known.update((t.name, t.data_type) for t in graph.initializer)
        added = []
        for node in shell.graph.node:
            if node.domain in ("", "ai.onnx"):
                continue
            if node.op_type not in _TYPED_LIKE_FIRST_INPUT:
                raise ValueError(f"the FP16 conversion cannot type the outputs of {node.domain}.{node.op_type} "
                                 f"(node {node.name!r}); convert a graph without it (before ONNX Runtime's "
                                 f"extended optimization), or build without the FP16 copy")
            element = known.get(node.input[0]) if node.input else None
            for index in _TYPED_LIKE_FIRST_INPUT[node.op_type]:
                if element and index < len(node.output) and node.output[index] and not known.get(node.output[index]):
                    added.append(helper.make_tensor_value_info(node.output[index], element, None))
                    known[node.output[index]] = element
        if not added:
            break
        shell.graph.value_info.extend(added)
    outputs = {value.name for value in graph.output}
    del graph.value_info[:]
    graph.value_info.extend(v for v in shell.graph.value_info if v.type.tensor_type.elem_type
                            and v.name not in outputs)

"""Small MatMulNBits graphs in every weight form the decoder builder writes, for the dense-weight tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from appliance.build.gguf_decoder import MS_DOMAIN, OPSET, _Graph
from appliance.build.q4_repack import BLOCK, NBitsWeight, _pack_nibbles_pairwise
from appliance.engines.dense_weights import DenseTwin

K, N, ROWS = 128, 48, 5


def weight(rng: np.random.Generator, bits: int = 4, zero_points: bool = False, offsets: bool = False,
           copies: int = 1) -> NBitsWeight:
    """A random ``N x K`` weight in one of the builder's forms (``copies`` 2: a Q8_0 weight split in 4-bit halves)."""
    blocks = K // BLOCK * copies
    packed = rng.integers(0, 256, (N, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (N, blocks)).astype(np.float32)
    zp = _pack_nibbles_pairwise(rng.integers(0, 16, (N, blocks), dtype=np.uint8)) if zero_points else None
    mins = rng.uniform(-0.2, 0.2, (K // BLOCK, N)).astype(np.float32) if offsets else None
    return NBitsWeight(N, K, bits, packed, scales, zp, mins, copies)


FORMS = {
    "q4_0": {},
    "q4_1_centred": {"offsets": True},
    "q4_1_zero_points": {"zero_points": True, "offsets": True},
    "q8_0_split": {"offsets": True, "copies": 2},
    "q8": {"bits": 8},
}


def forms_model(weights: dict[str, NBitsWeight]) -> onnx.ModelProto:
    """A float32 graph of ``x [T, K]`` through each weight (one output per weight, the node named by its key)."""
    graph = _Graph(accuracy_level=1)
    outputs = [graph.linear("x", w, name) for name, w in weights.items()]
    return helper.make_model(
        helper.make_graph(graph.nodes, "forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["T", N]) for o in outputs],
                          graph.inits),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])


def session(graph: bytes, twin: DenseTwin | None = None) -> ort.InferenceSession:
    """A CPU session of ``graph``, with ``twin``'s dense weights supplied."""
    options = ort.SessionOptions()
    if twin is not None:
        twin.supply(options)
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

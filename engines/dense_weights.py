"""A float32-weight twin of a decoder graph, for the calls that carry several rows at once.

ONNX Runtime's float32 ``MatMulNBits`` kernel (the exact tier's ``accuracy_level`` 1) is a fast fused
dequantize-and-multiply for one row of activations, but for two or more rows it dequantizes every weight block
into a scratch buffer on each call before multiplying: measured on SmolLM2-135M (2 cores, ONNX Runtime 1.32), a
decode step of 2 rows took 31 ms against 16 ms for one, and 8 rows 44 ms. The same graph with the weights
dequantized once, at load, into plain ``MatMul`` initializers streams 4 bytes per weight instead of half a byte
(slower for one row: 19 ms) but multiplies many rows almost for free (2 rows 22 ms, 8 rows 29 ms).

:func:`dense_twin` rewrites a ``MatMulNBits`` graph that way. The dequantization is exact (``(q - zp) * scale``
plus the Q4_1 block offsets that the builder keeps in a following ``Gemm``, see ``appliance.build.q4_repack``),
so both graphs compute the same function; only the order of float additions differs. The dense weights are
handed to ONNX Runtime as external initializers rather than serialized into the graph, which keeps the peak
memory of building the session near one copy of them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from appliance.build.q4_repack import BLOCK, NBitsWeight

SUPPLIED_AT_LOAD = "supplied-at-load"  # the external-data location of the dense weights: never read from disk


@dataclass
class DenseTwin:
    """The rewritten graph (serialized, weights left out) and the weights to supply as external initializers."""

    graph: bytes
    weights: dict[str, np.ndarray]  # one per MatMulNBits node turned into MatMul

    @property
    def weight_bytes(self) -> int:
        """Memory the dense weights take."""
        return sum(w.nbytes for w in self.weights.values())

    def supply(self, options: Any) -> None:
        """Hand the weights to ONNX Runtime ``SessionOptions`` (copied in when the session is created)."""
        import onnxruntime as ort

        names = list(self.weights)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(self.weights[n]) for n in names])


def dense_twin(model: onnx.ModelProto, only: Collection[str] | None = None,
               dequantized: Mapping[str, np.ndarray] | None = None) -> DenseTwin:
    """``model`` with each plain ``MatMulNBits`` (no ``g_idx`` or bias input) replaced by a float32 ``MatMul``;
    ``only``: just the nodes of those names; ``dequantized``: dense weights made before (by twin weight name, from a
    twin of a graph with the same nodes), taken instead of dequantizing again.

    A ``Concat`` that only repeats the input (split 8-bit weights) and a ``Gemm`` that only adds block offsets to
    the product are folded into the dense weight. Nodes and initializers left unused are dropped. ``model`` is
    modified in place.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    weights: dict[str, np.ndarray] = {}
    placeholders: list[onnx.TensorProto] = []
    folded: set[str] = set()  # names of Gemm nodes whose offsets went into a dense weight
    for node in graph.node:
        if node.op_type != "MatMulNBits" or any(node.input[4:]) or (only is not None and node.name not in only):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits = int(attrs.get("bits", 4))
        has_zero_points = len(node.input) > 3 and bool(node.input[3])
        if int(attrs.get("block_size", 0)) != BLOCK or bits not in (4, 8) or (bits == 8 and has_zero_points):
            continue  # forms the builder does not write
        packed, scales = constant(node.input[1]), constant(node.input[2])
        zero_points = constant(node.input[3]) if has_zero_points else None
        if packed is None or scales is None or (has_zero_points and zero_points is None):
            continue
        source, copies = node.input[0], 1
        repeat = producers.get(source)
        if repeat is not None and repeat.op_type == "Concat" and len(set(repeat.input)) == 1:
            source, copies = repeat.input[0], len(repeat.input)
        output, offsets = node.output[0], None
        users = consumers.get(output, [])
        if len(users) == 1 and users[0].op_type == "Gemm" and users[0].name and not users[0].attribute \
                and list(users[0].input[2:]) == [output]:
            offsets = constant(users[0].input[1])
            if offsets is not None:
                output = users[0].output[0]
                folded.add(users[0].name)
        n, k = int(attrs["N"]), int(attrs["K"]) // copies
        name = f"{node.name}.dense_weight_t"
        if dequantized is not None and name in dequantized:
            weights[name] = dequantized[name]
        else:
            weight = NBitsWeight(n, k, bits, packed, scales.reshape(n, -1), zero_points,
                                 offsets, copies).dequantize()
            weights[name] = np.ascontiguousarray(weight.T, dtype=np.float32)
        placeholders.append(_placeholder(name, weights[name].shape))
        node.CopyFrom(helper.make_node("MatMul", [source, name], [output], name=node.name))

    kept = [node for node in graph.node if node.name not in folded]
    outputs = {o.name for o in graph.output}
    while True:  # drop nodes nothing reads any more (the repeats, block sums and offset Gemms folded above)
        read = {name for node in kept for name in node.input} | outputs
        alive = [node for node in kept if any(output in read for output in node.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in kept for name in node.input}
    remaining = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(remaining + placeholders)
    return DenseTwin(model.SerializeToString(), weights)


def _placeholder(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=list(shape),
                              data_location=onnx.TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", SUPPLIED_AT_LOAD
    return tensor

"""Which form a float32 decoder graph's split 8-bit weights take for one-row steps, chosen on the loading machine.

A Q8_0 weight (SmolLM2's token table, which is also its LM head) enters the exact tier's graph split into two
4-bit halves over the input repeated twice (``appliance.build.q4_repack``), because ONNX Runtime's float32 kernel
for 8-bit codes is very slow. Whether that split product beats a plain float32 ``MatMul`` over the same weight
dequantized at load depends on the CPU's kernels. Measured with ONNX Runtime 1.32 on the 49152 x 576 head, one
row, two threads: on AVX2 (AMD EPYC) 11.5 ms split against 6.2 ms dense, a fifth of the exact tier's decode step;
on AVX-512 (Intel Xeon) dense was no faster. So the decoder times both forms when it loads, on the weights
themselves and in alternation (a drifting machine slows both alike), and takes the dense one only when it wins by
a clear margin: it costs 4 bytes a weight (113 MB for that head). Both forms compute the same function, the
dequantization being exact; only the order of float additions differs, as with the float32 twin of multi-row
calls (``appliance.engines.dense_weights``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from appliance.engines.dense_weights import DenseTwin, dense_twin
from appliance.engines.form_timing import time_alternating, timing_options

SPLIT, DENSE = "split", "dense"
CHOICES = ("timed", SPLIT, DENSE)
MARGIN = 0.9  # the dense form is taken when its time is under this share of the split form's
RUNS = 15  # timed calls per form, after warm-up; the 49152 x 576 head takes 3 to 12 ms a call

# (the split products alone, the same made dense, threads, runs) -> per form, the median seconds of one row or the
# error that stopped it
FormTiming = Callable[[onnx.ModelProto, DenseTwin, int, int], dict[str, "float | Exception"]]


@dataclass
class SplitWeightsForm:
    """What the one-row graph does with its float32 split weights, and the timings that decided it."""

    form: str  # SPLIT (the graph as built) or DENSE
    nodes: list[str] = field(default_factory=list)  # the split MatMulNBits nodes
    ms_per_row: dict[str, float] = field(default_factory=dict)  # by form, where timed
    errors: dict[str, str] = field(default_factory=dict)  # a form that could not run, and why
    # The dense weights the timing made, by twin weight name: the one-row graph takes them instead of dequantizing
    # again (about 1.5 s for that head)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def description(self) -> str:
        """For the load log: the form, and the timings when there were any."""
        timed = " against ".join(f"{self.ms_per_row[f]:.2f} ms {f}" for f in (DENSE, SPLIT) if f in self.ms_per_row)
        return f"split 8-bit weights {self.form} in one-row steps" + (f" ({timed} a row)" if timed else "")


def float32_split_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ``MatMulNBits`` nodes over an input repeated by a ``Concat`` (split 8-bit weights) that
    multiply in float32 (``accuracy_level`` below 4: the int8 variant's arithmetic is its own, not changed here)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        accuracy = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "accuracy_level"), 0)
        repeat = producers.get(node.input[0])
        if accuracy < 4 and repeat is not None and repeat.op_type == "Concat" and len(set(repeat.input)) == 1:
            names.append(node.name)
    return names


def choose_form(model: onnx.ModelProto, choice: str, threads: int, *, runs: int = RUNS,
                timing: FormTiming | None = None) -> SplitWeightsForm:
    """The form for ``model``'s float32 split nodes: ``choice`` SPLIT or DENSE as asked, "timed" by
    ``timing`` (default: :func:`time_forms`). A graph without such nodes keeps its form, untimed."""
    if choice not in CHOICES:
        raise ValueError(f"split weights form must be one of {', '.join(CHOICES)}, not {choice!r}")
    nodes = float32_split_nodes(model)
    if not nodes or choice != "timed":
        return SplitWeightsForm(choice if nodes and choice != "timed" else SPLIT, nodes)
    piece = _products(model, nodes)
    dense_piece = dense_twin(copy.deepcopy(piece))
    measured = (timing or time_forms)(piece, dense_piece, threads, runs)
    seconds = {form: value for form, value in measured.items() if isinstance(value, float)}
    dense = DENSE in seconds and seconds[DENSE] < MARGIN * seconds.get(SPLIT, float("inf"))
    return SplitWeightsForm(DENSE if dense else SPLIT, nodes, {f: s * 1e3 for f, s in seconds.items()},
                            {f: f"{type(e).__name__}: {e}"[:300] for f, e in measured.items()
                             if isinstance(e, Exception)},
                            dense_piece.weights if dense else {})


def one_row_twin(model: onnx.ModelProto, chosen: SplitWeightsForm) -> DenseTwin | None:
    """``model`` with its split nodes made dense, where that was chosen (``model`` is modified in place; the
    twin takes the timing's dense weights from ``chosen``, not copies)."""
    if chosen.form != DENSE or not chosen.nodes:
        return None
    return dense_twin(model, only=set(chosen.nodes), dequantized=chosen.weights)


def time_forms(piece: onnx.ModelProto, dense_piece: DenseTwin, threads: int,
               runs: int) -> dict[str, float | Exception]:
    """Median seconds of one row through ``piece`` (the split products alone) and ``dense_piece`` (the same made
    dense), the two forms' calls alternating; a form whose session fails gives its error instead."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal((1, i.type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)
            for i in piece.graph.input}

    def split() -> Any:
        return ort.InferenceSession(piece.SerializeToString(), timing_options(threads),
                                    providers=["CPUExecutionProvider"])

    def dense() -> Any:
        options = timing_options(threads)
        dense_piece.supply(options)
        return ort.InferenceSession(dense_piece.graph, options, providers=["CPUExecutionProvider"])

    return time_alternating({SPLIT: split, DENSE: dense}, feed, runs)


def _products(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """A graph of the named split products alone: for each, its repeated input as a graph input [1, K] and what
    the graph computes from it up to the node's product (with the block offsets a following ``Gemm`` adds)."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    kept: dict[int, onnx.NodeProto] = {}
    inputs, outputs = [], []
    for name in nodes:
        node = by_name[name]
        repeat = producers[node.input[0]]
        source = repeat.input[0]
        k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "K") // len(repeat.input)
        output, users = node.output[0], consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Gemm":
            output = users[0].output[0]
        wanted, stack = {output}, [output]
        while stack:  # back from the product to the repeated input: the repeat, the product, the block sums
            producer = producers.get(stack.pop())
            if producer is None or id(producer) in kept:
                continue
            kept[id(producer)] = producer
            for name_in in producer.input:
                if name_in and name_in != source and name_in not in initializers and name_in not in wanted:
                    wanted.add(name_in)
                    stack.append(name_in)
        inputs.append(helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, [1, k]))
        outputs.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    ordered = [node for node in graph.node if id(node) in kept]
    read = {name for node in ordered for name in node.input}
    piece = helper.make_graph([copy.deepcopy(n) for n in ordered], "split products", inputs, outputs,
                              [copy.deepcopy(initializers[n]) for n in read if n in initializers])
    return helper.make_model(piece, opset_imports=list(model.opset_import), ir_version=model.ir_version)

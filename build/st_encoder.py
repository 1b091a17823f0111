"""Import a sentence-transformers folder (BERT-family encoder) into one ONNX graph that returns pooled embeddings.

Reads ``modules.json`` (Transformer, Pooling, optional Normalize), ``config.json``, ``sentence_bert_config.json``,
the pooling config and ``model.safetensors`` with the ``safetensors`` package, and writes the graph with the
``onnx`` package: embeddings, the encoder layers, the pooling the folder asks for, and L2 normalization when the
folder has a Normalize module. No torch.

Graph contract: inputs ``input_ids`` and ``attention_mask`` (int64, [batch, sequence]); output
``sentence_embedding`` (float32, [batch, dimensions]). Padding positions (mask 0) never affect the result.

The tokenizer is the folder's ``tokenizer.json`` with its built-in padding and truncation removed: the scheduler
batches and pads, and the length limit is ``max_seq_length`` from ``sentence_bert_config.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
POOLING_MODES = ("mean", "cls", "max")


@dataclass
class EncoderSource:
    """What the folder declares."""

    folder: Path
    config: dict
    max_seq_length: int
    pooling: str
    normalize: bool
    dimensions: int

    @property
    def weights(self) -> Path:
        """The safetensors file."""
        return self.folder / "model.safetensors"


def read_source(folder: Path) -> EncoderSource:
    """Read and check the sentence-transformers folder; raise ``ValueError`` saying what is missing."""
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if not kinds or kinds[0] != "Transformer":
        raise ValueError(f"{folder}/modules.json must start with a Transformer module, found {kinds}")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder}: only BERT encoders with absolute positions are supported, not "
                         f"{config.get('model_type')!r}")
    if config.get("hidden_act") != "gelu":
        raise ValueError(f"{folder}: hidden_act {config.get('hidden_act')!r} is not supported (gelu is)")
    st_config = json.loads((folder / "sentence_bert_config.json").read_text())
    pooling, dimensions = "cls", config["hidden_size"]
    pooling_module = next((m for m in modules if m["type"].endswith(".Pooling")), None)
    if pooling_module is not None:
        pool = json.loads((folder / pooling_module["path"] / "config.json").read_text())
        chosen = [mode for mode in POOLING_MODES if pool.get(f"pooling_mode_{mode}_tokens" if mode != "cls"
                                                              else "pooling_mode_cls_token")]
        unsupported = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v and
                       k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens")]
        if len(chosen) != 1 or unsupported:
            raise ValueError(f"{folder}: pooling {pool} is not supported; exactly one of mean, cls, max is")
        pooling, dimensions = chosen[0], pool.get("word_embedding_dimension", dimensions)
    return EncoderSource(
        folder=folder,
        config=config,
        max_seq_length=int(st_config.get("max_seq_length", config["max_position_embeddings"])),
        pooling=pooling,
        normalize="Normalize" in kinds,
        dimensions=int(dimensions),
    )


class _Graph:
    """A small builder that keeps node, initializer and name bookkeeping out of the model description."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attributes) -> str:
        self._count += 1
        output = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"n{self._count}_{op_type}",
                                           **attributes))
        return output


def build_encoder(source: EncoderSource) -> onnx.ModelProto:
    """The ONNX graph of the encoder with pooling and normalization."""
    from safetensors.numpy import load_file

    weights = load_file(str(source.weights))
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

    def w(name: str) -> np.ndarray:
        return weights[prefix + name].astype(np.float32)

    cfg = source.config
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim, eps = hidden // heads, float(cfg["layer_norm_eps"])
    g = _Graph()
    shape_bsh = g.const("shape_bs_heads", np.array([0, 0, heads, head_dim], np.int64))
    shape_bsh_flat = g.const("shape_bs_hidden", np.array([0, 0, hidden], np.int64))

    # Embeddings: words + positions (0..seq-1) + token type 0, then LayerNorm.
    words = g.op("Gather", [g.const("word_embeddings", w("embeddings.word_embeddings.weight")), "input_ids"])
    seq_len = g.op("Shape", ["input_ids"], start=1, end=2)  # 1-D: [sequence]
    position_vectors = g.op("Slice", [g.const("position_embeddings", w("embeddings.position_embeddings.weight")),
                                      g.const("zero_1d", np.array([0], np.int64)), seq_len,
                                      g.const("axis0_1d", np.array([0], np.int64))])
    type_vector = g.const("token_type_0", w("embeddings.token_type_embeddings.weight")[0])
    x = g.op("Add", [g.op("Add", [words, position_vectors]), type_vector])
    x = g.op("LayerNormalization", [x, g.const("emb_ln_w", w("embeddings.LayerNorm.weight")),
                                    g.const("emb_ln_b", w("embeddings.LayerNorm.bias"))], axis=-1, epsilon=eps)

    # Additive attention bias from the mask: 0 where attended, a large negative number on padding.
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), mask_f]),
                        g.const("neg_large", np.array(-1e9, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes_1_2", np.array([1, 2], np.int64))])  # [b, 1, 1, s]
    scale = g.const("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))

    def linear(value: str, name: str, layer: str) -> str:
        weight = g.const(f"{layer}.{name}.w", w(f"{layer}.{name}.weight").T)
        return g.op("Add", [g.op("MatMul", [value, weight]), g.const(f"{layer}.{name}.b", w(f"{layer}.{name}.bias"))])

    def split_heads(value: str) -> str:
        return g.op("Transpose", [g.op("Reshape", [value, shape_bsh])], perm=[0, 2, 1, 3])  # [b, h, s, d]

    for index in range(cfg["num_hidden_layers"]):
        layer = f"encoder.layer.{index}"
        q = split_heads(linear(x, "attention.self.query", layer))
        k = split_heads(linear(x, "attention.self.key", layer))
        v = split_heads(linear(x, "attention.self.value", layer))
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale]),
                              bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), shape_bsh_flat])
        attended = g.op("Add", [linear(context, "attention.output.dense", layer), x])
        x = g.op("LayerNormalization", [attended, g.const(f"{layer}.aln.w", w(f"{layer}.attention.output.LayerNorm.weight")),
                                        g.const(f"{layer}.aln.b", w(f"{layer}.attention.output.LayerNorm.bias"))],
                 axis=-1, epsilon=eps)
        inner = linear(x, "intermediate.dense", layer)
        # Exact (erf) GELU, as BERT's "gelu".
        gelu = g.op("Mul", [g.op("Mul", [inner, g.const(f"{layer}.half", np.array(0.5, np.float32))]),
                            g.op("Add", [g.op("Erf", [g.op("Div", [inner, g.const(f"{layer}.sqrt2",
                                                                                    np.array(math.sqrt(2), np.float32))])]),
                                         g.const(f"{layer}.one", np.array(1.0, np.float32))])])
        out = g.op("Add", [linear(gelu, "output.dense", layer), x])
        x = g.op("LayerNormalization", [out, g.const(f"{layer}.oln.w", w(f"{layer}.output.LayerNorm.weight")),
                                        g.const(f"{layer}.oln.b", w(f"{layer}.output.LayerNorm.bias"))],
                 axis=-1, epsilon=eps)

    pooled = _pool(g, x, mask_f, source.pooling)
    if source.normalize:
        norm = g.op("ReduceL2", [pooled], axes=[-1], keepdims=1)
        pooled = g.op("Div", [pooled, g.op("Max", [norm, g.const("norm_floor", np.array(1e-12, np.float32))])])
    g.op("Identity", [pooled], name="sentence_embedding")
    graph = helper.make_graph(
        g.nodes,
        "sentence_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", source.dimensions])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="appliance.build")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _pool(g: _Graph, hidden: str, mask_f: str, pooling: str) -> str:
    if pooling == "cls":
        return g.op("Gather", [hidden, g.const("cls_index", np.array(0, np.int64))], axis=1)
    mask = g.op("Unsqueeze", [mask_f, g.const("axes_last_u", np.array([-1], np.int64))])  # [b, s, 1]
    if pooling == "max":
        masked = g.op("Add", [hidden, g.op("Mul", [g.op("Sub", [mask, g.const("one_pool", np.array(1.0, np.float32))]),
                                                   g.const("big_pool", np.array(1e9, np.float32))])])
        return g.op("ReduceMax", [masked], axes=[1], keepdims=0)
    axes = g.const("axes_seq", np.array([1], np.int64))
    total = g.op("ReduceSum", [g.op("Mul", [hidden, mask]), axes], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask, axes], keepdims=0), g.const("count_floor", np.array(1e-9, np.float32))])
    return g.op("Div", [total, count])


def write_tokenizer(source: EncoderSource, target: Path) -> None:
    """The folder's tokenizer.json without its fixed padding and truncation."""
    document = json.loads((source.folder / "tokenizer.json").read_text())
    document["padding"] = None
    document["truncation"] = None
    target.write_text(json.dumps(document, ensure_ascii=False))


def import_encoder(folder: Path, out_dir: Path) -> EncoderSource:
    """Write ``model.onnx`` and ``tokenizer.json`` for the folder into ``out_dir``; returns what was read."""
    source = read_source(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_encoder(source), out_dir / "model.onnx")
    write_tokenizer(source, out_dir / "tokenizer.json")
    return source

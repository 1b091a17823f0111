"""Llama-family GGUF -> ONNX decoder graph for ONNX Runtime, with a shared-buffer KV cache for batched decoding.

The graph is built directly from the GGUF tensors with ONNX Runtime's contrib operators (com.microsoft):
``MatMulNBits`` (the GGUF 4/8-bit blocks repacked losslessly, see ``q4_repack``), ``GroupQueryAttention`` with
rotary embedding inside it, ``SkipSimplifiedLayerNormalization``, plus ``SimplifiedLayerNormalization``. Opsets:
default domain 17, com.microsoft 1. One ``.onnx`` file (no external data; the file is far below 2 GB).

Graph I/O contract
==================

``appliance.engines.onnxruntime_decoder`` drives a graph this way, for serving and for the parity checks of the
build (``appliance.build.parity``).

Dimensions: ``B`` batch rows, ``S`` new tokens per row in this call, ``C`` KV capacity (the caller's buffer
length, ``<= max_seq_len``), ``L`` layers, ``Hkv`` KV heads, ``D`` head dim, ``V`` vocabulary.

Inputs
  ``input_ids``                      int64   [B, S]   new tokens of each row.
  ``seqlens_k``                      int32   [B]      per row: total tokens in the cache *after* this call, minus 1.
  ``total_sequence_length``          int32   [] or [1]  max over rows of (seqlens_k + 1); at most ``max_seq_len``
                                     (the rotary table size, ``generation.json``) and at most ``C``.
  ``past_key_values.{i}.key|value``  float32 [B, Hkv, C, D] for i in 0..L-1: the KV buffer of layer i.
  ``query_seqlens``                  int32   [B]      only when built with ``with_query_seqlens=True``: number of
                                     valid new tokens of each row (see "Ragged chunks").
Outputs
  ``logits``                         float32 [B, S, V] (``logits="all"``, the default) or [B, 1, V]
                                     (``logits="last"``: only the last new position of each row; see below).
  ``present.{i}.key|value``          float32 [B, Hkv, C, D]: the same buffers as the past inputs.
  ``next_token``                     int64   [B, S, 1] or [B, 1, 1], the ``cuda`` variant only: the argmax of
                                     ``logits`` (a greedy step reads these ids instead of copying the logits).

There is no ``position_ids`` input: GroupQueryAttention applies the rotary embedding itself and derives each new
token's position from ``seqlens_k`` (a row's token ``s`` of ``S`` is at position ``seqlens_k + 1 - S + s``; for
the first prompt, ``s``).

KV layout. Row ``b`` of every buffer holds that sequence's keys/values at positions ``[0, len_b)`` with any unused
space *after* them (rows are never left-padded; each row is aligned at position 0 and ends at its own length).
Bind ``present.{i}.*`` to the very same memory as ``past_key_values.{i}.*`` (ONNX Runtime ``IOBinding``, one
``OrtValue`` per buffer bound as both input and output): ``GroupQueryAttention`` then writes the new tokens in
place at positions ``[len_b - S, len_b)`` and copies nothing (``past_present_share_buffer``). Feeding plain arrays
also works, but then every call copies the caches.

Calls
  * Prefill (first prompt): ``S > 1`` and ``S == total_sequence_length`` (no past). Rows may have different
    prompt lengths: right-pad ``input_ids`` to ``S`` with any id and set ``seqlens_k[b] = len_b - 1``. The KV of
    padded positions is garbage but lies beyond ``len_b`` and is overwritten later; logits at padded positions
    are garbage. A single row can also be prefilled alone, into its row of a larger buffer, by binding
    ``buffer[b:b+1]`` views (batch 1); that is how a scheduler admits a request while other rows are decoding.
  * Decode: ``S == 1``; ``seqlens_k[b]`` = row b's length after appending its token, minus 1;
    ``total_sequence_length = max(seqlens_k) + 1`` (any larger bound up to ``C`` gives the same result). Rows of
    different lengths decode together. A free row still computes one token: give it any id and
    ``seqlens_k = 0`` (it only writes position 0 of its own row) and ignore its logits.
  * Chunked prefill (``S > 1`` with past): supported by this ONNX Runtime (1.32) for batch 1 only (the kernel
    rejects ``B > 1`` with past unless ``query_seqlens`` is given): ``seqlens_k[0] = past + S - 1``,
    ``total_sequence_length = past + S``.
  * Ragged chunks (built ``with_query_seqlens=True``): ``query_seqlens[b]`` valid tokens per row, right-padded
    to ``S``; a row with past ``P_b`` has ``seqlens_k[b] = P_b + query_seqlens[b] - 1``; ``query_seqlens[b] = 0``
    marks an idle row (cache unchanged; keep its ``seqlens_k``). This allows mixing prefill chunks and decode
    steps of several rows in one call; ``total_sequence_length`` is then only an upper bound (may be ``C``).

``logits="last"`` computes the LM head only for position ``S - 1`` of each row (or ``query_seqlens[b] - 1``
when built with ``query_seqlens``); with right-padded prefill of several rows and no ``query_seqlens``, the
shorter rows' last position is padding, so use ``"all"`` or prefill such rows one at a time.

Variants: ``exact`` computes in float32 (MatMulNBits ``accuracy_level`` 1: weights dequantized exactly, fp32
products); ``fast`` lets MatMulNBits quantize activations to int8 per block (``accuracy_level`` 4); ``cuda`` is the
graph for ONNX Runtime's CUDA execution provider, whose GroupQueryAttention takes only FP16/BF16: activations, norm
weights, scales and the KV buffers are FP16 (``float16`` wherever this contract says ``float32``, logits excepted),
over the same 4-bit weights.

Weights: Q4_1 / Q4_0 / Q8_0 GGUF tensors stay 4/8-bit in the graph and dequantize exactly (see ``q4_repack``:
Q4_1's block minimum becomes a small extra matmul on per-block sums of the input, fused with the result in one
Gemm; in the float32 variants Q8_0 becomes two 4-bit halves over the input repeated twice, because ONNX
Runtime's float32 kernel for 8-bit weights is very slow, while the fast variant takes the form its int8 kernel
multiplies faster on the building machine: ``import_gguf(whole_q8=...)``). F32/F16/BF16 and other GGUF types are
dequantized with ``gguf.quants.dequantize`` to float32. A Q8_0 token embedding is gathered (and dequantized exactly)
from the same initializers as the tied LM head. Q/K/V and gate/up projections are fused into one MatMulNBits each
(packed QKV goes straight into GroupQueryAttention).

RoPE layout. llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that the two halves of each
head's rotary pairs ("rotate half", HF layout) become adjacent elements. The graph keeps the GGUF layout and
uses ``rotary_interleaved=1``; this is exactly the HF model (the same permutation of Q and K leaves ``q . k``
unchanged and V/O are not permuted).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.build import q4_repack
from appliance.build.gguf_tokenizer import UnsupportedModel, build_tokenizer, render_chat, special_token_ids
from appliance.build.q4_repack import NBitsWeight

__all__ = ["DecoderBuild", "import_gguf", "write_variant_graph", "render_chat", "read_gguf", "LlamaConfig",
           "build_graph"]

MS_DOMAIN = "com.microsoft"
Q8FormChooser = Callable[[int, int], bool]  # (rows, columns) of a Q8_0 weight -> keep it 8-bit
OPSET = 17
INT8_ACTIVATIONS = 4  # MatMulNBits accuracy_level: activations quantized to int8 per block
# variant -> MatMulNBits accuracy_level (1: fp32 compute; it batches better than 0 on the CPU; the CUDA kernels
# ignore it)
VARIANTS = {"exact": 1, "fast": INT8_ACTIVATIONS, "cuda": 1}
# variant -> the element type of activations, norms' weights, scales and the KV cache. ONNX Runtime's CUDA kernel for
# GroupQueryAttention takes only FP16 or BF16, so the variant the CUDA execution provider runs computes in FP16 over
# the same 4-bit weights; its logits are cast back to FP32 at the graph's edge.
FLOAT_TYPES = {"exact": np.float32, "fast": np.float32, "cuda": np.float16}
_Q = gguf.GGMLQuantizationType


@dataclass
class DecoderBuild:
    """What ``import_gguf`` wrote and the facts a scheduler needs to drive the graph."""

    model_path: Path
    tokenizer_path: Path
    chat_template_path: Path
    generation_path: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    bos_token_id: int
    eos_token_ids: list[int]
    variant: str

    @classmethod
    def from_folder(cls, folder: Path) -> DecoderBuild:
        """The build written into ``folder`` (a repository version folder), read back from ``generation.json``."""
        generation = json.loads((folder / "generation.json").read_text(encoding="utf-8"))
        bos = generation.get("bos_token_id")
        return cls(
            model_path=folder / "model.onnx", tokenizer_path=folder / "tokenizer.json",
            chat_template_path=folder / "chat_template.jinja", generation_path=folder / "generation.json",
            num_layers=generation["num_layers"], num_kv_heads=generation["num_kv_heads"],
            head_dim=generation["head_dim"], vocab_size=generation["vocab_size"],
            context_length=generation["context_length"], bos_token_id=-1 if bos is None else int(bos),
            eos_token_ids=list(generation["eos_token_ids"]), variant=generation["variant"])


@dataclass
class LlamaConfig:
    """Model dimensions from the GGUF metadata (``{arch}.*`` keys)."""

    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_scaling: str
    rope_scale_factor: float
    rms_eps: float

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], vocab_rows: int) -> LlamaConfig:
        arch = str(meta["general.architecture"])
        if arch not in ("llama",):
            raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported (Llama family only)")

        def get(key: str, default: Any = None) -> Any:
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise KeyError(f"GGUF metadata lacks {arch}.{key}")
            return v

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
        if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModel("different key and value head sizes")
        if meta.get(f"{arch}.expert_count"):
            raise UnsupportedModel("mixture-of-experts Llama GGUF files are not supported")
        return cls(
            arch=arch,
            num_layers=int(get("block_count")),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_dim=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
            vocab_size=int(meta.get(f"{arch}.vocab_size", vocab_rows)),
            context_length=int(get("context_length")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=str(meta.get(f"{arch}.rope.scaling.type", "none")),
            rope_scale_factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        )


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """GGUF metadata (key -> python value) and tensors (name -> ``gguf.ReaderTensor``, memory-mapped)."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return meta, tensors


# --------------------------------------------------------------------------------------------------- weights

def _dims(t: Any) -> tuple[int, int]:
    """(rows = output features N, columns = input features K) of a 2-D GGUF tensor (GGUF lists ne0=K first)."""
    k, n = (int(x) for x in t.shape)
    return n, k


def _dense(t: Any) -> np.ndarray:
    """Any GGUF tensor as float32 in its logical (row-major, numpy) shape."""
    if t.tensor_type == _Q.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == _Q.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    shape = tuple(int(x) for x in reversed(list(t.shape)))
    return np.ascontiguousarray(arr.reshape(shape))


def _linear_weight(t: Any, whole_q8: bool = False) -> NBitsWeight | np.ndarray:
    """A projection weight: MatMulNBits form for Q4_0/Q4_1/Q8_0, else dense float32 ``W[n, k]``; ``whole_q8``: a
    Q8_0 weight as 8-bit (for int8 activations), else split into two 4-bit halves."""
    n, k = _dims(t)
    raw = np.asarray(t.data)
    if t.tensor_type == _Q.Q4_1:
        return q4_repack.q4_1_to_nbits(raw, n, k)
    if t.tensor_type == _Q.Q4_0:
        return q4_repack.q4_0_to_nbits(raw, n, k)
    if t.tensor_type == _Q.Q8_0:
        return q4_repack.q8_0_to_nbits(raw, n, k) if whole_q8 else q4_repack.q8_0_to_split_nbits(raw, n, k)
    return _dense(t)


def _concat(parts: list[NBitsWeight | np.ndarray]) -> list[NBitsWeight | np.ndarray]:
    """Fuse projections that read the same input into one (Q/K/V, gate/up) when their forms allow it."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return [np.concatenate(parts, axis=0)]
    try:
        if all(isinstance(p, NBitsWeight) for p in parts):
            return [q4_repack.concat_rows(parts)]  # type: ignore[arg-type]
    except ValueError:
        pass
    return parts


def _rope_caches(cfg: LlamaConfig, max_seq_len: int, freq_factors: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """cos/sin caches [max_seq_len, rope_dim/2], computed in float32 like the reference implementation."""
    dim = cfg.rope_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    if freq_factors is not None:
        inv_freq = (inv_freq / freq_factors.astype(np.float32)).astype(np.float32)
    positions = np.arange(max_seq_len, dtype=np.float32)
    if cfg.rope_scaling == "linear":
        positions = positions / np.float32(cfg.rope_scale_factor)
    elif cfg.rope_scaling not in ("none", ""):
        raise UnsupportedModel(f"rope scaling {cfg.rope_scaling!r} is not supported")
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


# --------------------------------------------------------------------------------------------------- graph

class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, accuracy_level: int, float_type: type[np.floating] = np.float32,
                 whole_q8: bool = False) -> None:
        self.float_type = float_type
        self.float_proto = helper.np_dtype_to_tensor_dtype(np.dtype(float_type))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self.whole_q8 = whole_q8  # Q8_0 weights as 8-bit, else split into 4-bit halves (see q4_repack)
        self._blocksums: dict[tuple[str, int], str] = {}
        self._consts: dict[tuple, str] = {}
        self._init_names: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (floating point ones in the graph's float type); a name already added is reused as is
        (how tied weights share one copy)."""
        if name not in self._init_names:
            self._init_names.add(name)
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(self.float_type)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, values: list[int]) -> str:
        key = ("i64", tuple(values))
        if key not in self._consts:
            self._consts[key] = self.init(f"const.i64.{len(self._consts)}", np.array(values, dtype=np.int64))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, *, name: str,
             domain: str = "", **attrs: Any) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def blocksum(self, x: str, k: int) -> str:
        """Per-32-block sums of ``x`` [T, K] -> [T, K/32] (one small MatMul against a 0/1 matrix), shared by
        every projection that reads ``x``."""
        key = (x, k)
        if key not in self._blocksums:
            kb = k // q4_repack.BLOCK
            ones = np.repeat(np.eye(kb, dtype=np.float32), q4_repack.BLOCK, axis=0)  # [K, K/32]
            self._blocksums[key] = self.node("MatMul", [x, self.init(f"blocksum.{k}", ones)],
                                             name=f"{x}/blocksum")[0]
        return self._blocksums[key]

    def linear(self, x: str, w: NBitsWeight | np.ndarray, name: str, *, weights: str | None = None) -> str:
        """``x @ W.T`` for ``x`` [T, K]; ``weights``: initializer name prefix (default ``name``)."""
        prefix = weights or name
        if isinstance(w, np.ndarray):
            wt = self.init(f"{prefix}.weight_t", np.ascontiguousarray(w.T.astype(np.float32)))
            return self.node("MatMul", [x, wt], name=name)[0]
        a = x
        if w.input_copies > 1:
            a = self.node("Concat", [x] * w.input_copies, name=f"{name}/repeat_input", axis=-1)[0]
        inputs = [a, self.init(f"{prefix}.qweight", w.packed), self.init(f"{prefix}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(self.init(f"{prefix}.zero_points", w.zero_points))
        y = self.node("MatMulNBits", inputs, name=name, domain=MS_DOMAIN, K=w.k * w.input_copies, N=w.n,
                      bits=w.bits, block_size=q4_repack.BLOCK, accuracy_level=self.accuracy_level)[0]
        if w.mins is None:
            return y
        # y + blocksum(x) @ offsets in one Gemm (the reason activations are kept 2-D: fewer, cheaper nodes).
        offsets = self.init(f"{prefix}.block_offsets", w.mins)
        return self.node("Gemm", [self.blocksum(x, w.k), offsets, y], name=f"{name}/offset")[0]

    def linears(self, x: str, ws: list[NBitsWeight | np.ndarray], name: str) -> list[str]:
        """Several projections of the same input; fused into one MatMul where possible, then split."""
        fused = _concat(ws)
        if len(fused) == 1 and len(ws) > 1:
            y = self.linear(x, fused[0], name)
            sizes = [w.n if isinstance(w, NBitsWeight) else w.shape[0] for w in ws]
            return self.node("Split", [y, self.const_i64(sizes)], len(ws), name=f"{name}/split", axis=-1)
        if len(ws) == 1:
            return [self.linear(x, ws[0], name)]
        return [self.linear(x, w, f"{name}.{i}") for i, w in enumerate(ws)]


def _embedding(g: _Graph, t: Any, ids: str) -> tuple[str, NBitsWeight | None]:
    """Token embedding lookup, [T, hidden] for ``ids`` [B, S].

    A Q8_0 table is kept in the MatMulNBits form the graph's linear layers use for Q8_0 (``g.whole_q8``: 8-bit, else
    split into 4-bit halves; so a tied LM head reads the same initializers) and dequantized exactly after the
    gather; returns the output and that weight (``None`` for a float table).
    """
    if t.tensor_type != _Q.Q8_0:
        table = g.init("token_embd.weight", _dense(t))
        flat = g.node("Reshape", [ids, g.const_i64([-1])], name="embed/flatten_ids")[0]
        return g.node("Gather", [table, flat], name="embed/gather", axis=0)[0], None
    if g.whole_q8:
        return _whole_q8_embedding(g, t, ids)
    n, k = _dims(t)
    kb = k // q4_repack.BLOCK
    w = q4_repack.q8_0_to_split_nbits(np.asarray(t.data), n, k)
    b = g.init("token_embd.qweight", w.packed)  # [V, 2 kb, 16]: blocks of high nibbles, then of low nibbles
    s = g.init("token_embd.scales", w.scales)  # [V, 2 kb]: 16 d, then d
    f32 = lambda v: g.init(f"embed.const.{v}", np.array(v, np.float32))  # noqa: E731
    packed = g.node("Gather", [b, ids], name="embed/gather_codes", axis=0)[0]
    packed = g.node("Cast", [packed], name="embed/cast", to=g.float_proto)[0]
    # Unpack nibbles in float (exact for 0..255, FP16 too): even elements in the low nibble, odd in the high one.
    high = g.node("Floor", [g.node("Mul", [packed, f32(0.0625)], name="embed/div16")[0]], name="embed/high")[0]
    low = g.node("Sub", [packed, g.node("Mul", [high, f32(16.0)], name="embed/high16")[0]], name="embed/low")[0]
    pairs = g.node("Concat", [g.node("Unsqueeze", [low, g.const_i64([-1])], name="embed/low_u")[0],
                              g.node("Unsqueeze", [high, g.const_i64([-1])], name="embed/high_u")[0]],
                   name="embed/pairs", axis=-1)[0]
    halves = g.node("Reshape", [pairs, g.const_i64([0, 0, 2, k])], name="embed/halves")[0]  # [B, S, 2, K]
    weights = g.init("embed.nibble_weights", np.array([[16.0], [1.0]], np.float32))
    unsigned = g.node("ReduceSum", [g.node("Mul", [halves, weights], name="embed/weigh")[0], g.const_i64([2])],
                      name="embed/combine", keepdims=0)[0]  # q + 128
    codes = g.node("Sub", [unsigned, f32(128.0)], name="embed/center")[0]
    codes = g.node("Reshape", [codes, g.const_i64([0, 0, kb, q4_repack.BLOCK])], name="embed/blocks")[0]
    scales = g.node("Gather", [s, ids], name="embed/gather_scales", axis=0)[0]
    scales = g.node("Slice", [scales, g.const_i64([kb]), g.const_i64([2 * kb]), g.const_i64([-1])],
                    name="embed/scale_d")[0]
    scales = g.node("Unsqueeze", [scales, g.const_i64([-1])], name="embed/scales_u")[0]
    values = g.node("Mul", [codes, scales], name="embed/dequantize")[0]
    return g.node("Reshape", [values, g.const_i64([-1, k])], name="embed/reshape")[0], w


def _whole_q8_embedding(g: _Graph, t: Any, ids: str) -> tuple[str, NBitsWeight]:
    """A Q8_0 table as 8-bit codes ``q + 128`` [V, K/32, 32] and scales ``d`` [V, K/32]: ``(u - 128) * d``."""
    n, k = _dims(t)
    w = q4_repack.q8_0_to_nbits(np.asarray(t.data), n, k)
    codes = g.node("Gather", [g.init("token_embd.qweight", w.packed), ids], name="embed/gather_codes", axis=0)[0]
    codes = g.node("Cast", [codes], name="embed/cast", to=g.float_proto)[0]  # [B, S, K/32, 32], exact
    codes = g.node("Sub", [codes, g.init("embed.const.128.0", np.array(128.0, np.float32))], name="embed/center")[0]
    scales = g.node("Gather", [g.init("token_embd.scales", w.scales), ids], name="embed/gather_scales", axis=0)[0]
    scales = g.node("Unsqueeze", [scales, g.const_i64([-1])], name="embed/scales_u")[0]
    values = g.node("Mul", [codes, scales], name="embed/dequantize")[0]
    return g.node("Reshape", [values, g.const_i64([-1, k])], name="embed/reshape")[0], w


def linear_model(weight: NBitsWeight, accuracy_level: int) -> onnx.ModelProto:
    """One linear layer ``y = x @ W.T`` (``x`` float32 ``[T, K]``) made of the nodes the decoder graph writes for
    ``weight``: for timing ONNX Runtime's kernels on a weight form."""
    g = _Graph(accuracy_level)
    y = g.linear("x", weight, "linear")
    graph = helper.make_graph(g.nodes, "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", weight.k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", weight.n])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])


def _kv_name(i: int, which: str, past: bool) -> str:
    return f"past_key_values.{i}.{which}" if past else f"present.{i}.{which}"


def build_graph(tensors: dict[str, Any], cfg: LlamaConfig, *, accuracy_level: int,
                max_seq_len: int, logits: str = "all", with_query_seqlens: bool = False,
                float_type: type[np.floating] = np.float32, next_token: bool = False, whole_q8: bool = False,
                progress: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """The decoder ``ModelProto`` (see the module docstring for its I/O contract); ``float_type``: the element type
    of its activations and KV cache (its logits are FP32 whatever it is); ``next_token``: add the ``next_token``
    output (greedy choices computed where the logits are); ``whole_q8``: Q8_0 weights as 8-bit rather than split
    into 4-bit halves (int8 activations only: ONNX Runtime's float32 kernel for 8-bit weights is very slow)."""
    say = progress or (lambda _msg: None)
    if logits not in ("all", "last"):
        raise ValueError("logits must be 'all' or 'last'")
    if whole_q8 and (accuracy_level != INT8_ACTIVATIONS or float_type != np.float32):
        raise ValueError("8-bit Q8_0 weights are for the graph with int8 activations (accuracy_level 4, float32)")
    g = _Graph(accuracy_level, float_type, whole_q8)

    def weight(t: Any) -> NBitsWeight | np.ndarray:
        return _linear_weight(t, g.whole_q8)

    kvh, hd, eps = cfg.num_kv_heads, cfg.head_dim, cfg.rms_eps
    kv_shape = ["batch_size", kvh, "kv_capacity", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, None),  # 0-d or [1]
    ]
    if with_query_seqlens:
        inputs.append(helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, ["batch_size"]))
    outputs = [helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, ["batch_size", "sequence_length" if logits == "all" else 1, cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for which in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(_kv_name(i, which, True), g.float_proto, kv_shape))
            outputs.append(helper.make_tensor_value_info(_kv_name(i, which, False), g.float_proto, kv_shape))

    freq_factors = _dense(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
    cos, sin = _rope_caches(cfg, max_seq_len, freq_factors)
    cos_name, sin_name = g.init("rope.cos_cache", cos), g.init("rope.sin_cache", sin)

    # Activations are 2-D [T = B*S, width] between the attention calls; GroupQueryAttention needs [B, S, width].
    ids_shape = g.node("Shape", ["input_ids"], name="ids_shape")[0]
    bs_shape = g.node("Concat", [ids_shape, g.const_i64([-1])], name="bs_shape", axis=0)[0]  # [B, S, -1]

    hidden, embed_w = _embedding(g, tensors["token_embd.weight"], "input_ids")
    residual = hidden
    normed = g.node("SimplifiedLayerNormalization",
                    [hidden, g.init("blk.0.attn_norm.weight", _dense(tensors["blk.0.attn_norm.weight"]))],
                    ["blk.0/attn_norm"], name="blk.0/attn_norm", axis=-1, epsilon=eps, stash_type=1)[0]
    for i in range(cfg.num_layers):
        say(f"layer {i + 1}/{cfg.num_layers}")
        p = f"blk.{i}"
        q, k, v = (weight(tensors[f"{p}.attn_{n}.weight"]) for n in ("q", "k", "v"))
        fused = _concat([q, k, v])
        if len(fused) == 1:  # packed QKV straight into GroupQueryAttention
            flat = [g.linear(normed, fused[0], f"{p}.attn_qkv")]
        else:
            flat = [g.linear(normed, w, f"{p}.attn_{n}") for w, n in zip((q, k, v), "qkv", strict=True)]
        gqa_in = [g.node("Reshape", [x, bs_shape], name=f"{x}/to_bsd")[0] for x in flat]
        gqa_in += [""] * (3 - len(gqa_in))
        attn_inputs = gqa_in + [_kv_name(i, "key", True), _kv_name(i, "value", True), "seqlens_k",
                                "total_sequence_length", cos_name, sin_name]
        if with_query_seqlens:
            attn_inputs += [""] * 7 + ["query_seqlens"]
        attn = g.node("GroupQueryAttention", attn_inputs,
                      [f"{p}/attn", _kv_name(i, "key", False), _kv_name(i, "value", False)],
                      name=f"{p}/attention", domain=MS_DOMAIN, num_heads=cfg.num_heads, kv_num_heads=kvh,
                      do_rotary=1, rotary_interleaved=1)[0]
        attn = g.node("Reshape", [attn, g.const_i64([-1, cfg.num_heads * hd])], name=f"{p}/attn_flat")[0]
        o = g.linear(attn, weight(tensors[f"{p}.attn_output.weight"]), f"{p}.attn_output")
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, g.init(f"{p}.ffn_norm.weight", _dense(tensors[f"{p}.ffn_norm.weight"]))],
            [f"{p}/ffn_norm", "", "", f"{p}/residual_attn"], name=f"{p}/ffn_norm", domain=MS_DOMAIN, epsilon=eps)
        gate, up = g.linears(normed, [weight(tensors[f"{p}.ffn_gate.weight"]), weight(tensors[f"{p}.ffn_up.weight"])],
                             f"{p}.ffn_gate_up")
        sig = g.node("Sigmoid", [gate], name=f"{p}/ffn_sigmoid")[0]
        silu = g.node("Mul", [gate, sig], name=f"{p}/ffn_silu")[0]
        act = g.node("Mul", [silu, up], name=f"{p}/ffn_act")[0]
        down = g.linear(act, weight(tensors[f"{p}.ffn_down.weight"]), f"{p}.ffn_down")
        if i + 1 < cfg.num_layers:
            nxt = f"blk.{i + 1}"
            gamma = g.init(f"{nxt}.attn_norm.weight", _dense(tensors[f"{nxt}.attn_norm.weight"]))
            outs = [f"{nxt}/attn_norm", "", "", f"{p}/residual_ffn"]
        else:
            gamma = g.init("output_norm.weight", _dense(tensors["output_norm.weight"]))
            outs = ["output_norm", "", "", f"{p}/residual_ffn"]
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [down, residual, gamma], outs,
                                        name=outs[0], domain=MS_DOMAIN, epsilon=eps)

    final = normed
    if logits == "last":
        final = g.node("Reshape", [final, bs_shape], name="last/to_bsd")[0]
        if with_query_seqlens:
            last = g.node("Sub", ["query_seqlens", g.init("one.i32", np.array(1, np.int32))], name="last/sub")[0]
            last = g.node("Max", [last, g.init("zero.i32", np.array(0, np.int32))], name="last/clamp")[0]
            last = g.node("Cast", [last], name="last/cast", to=TensorProto.INT64)[0]
            last = g.node("Reshape", [last, g.const_i64([-1, 1, 1])], name="last/reshape")[0]
            last = g.node("Expand", [last, g.const_i64([1, 1, cfg.hidden_size])], name="last/expand")[0]
            final = g.node("GatherElements", [final, last], name="last/gather", axis=1)[0]
        else:
            final = g.node("Slice", [final, g.const_i64([-1]), g.const_i64([2 ** 62]), g.const_i64([1])],
                           name="last/slice")[0]
        final = g.node("Reshape", [final, g.const_i64([-1, cfg.hidden_size])], name="last/flat")[0]
        logits_shape = g.const_i64([-1, 1, cfg.vocab_size])
    else:
        logits_shape = bs_shape

    say("lm head")
    if "output.weight" in tensors:
        flat_logits = g.linear(final, weight(tensors["output.weight"]), "lm_head")
    elif embed_w is not None:  # tied: reuse the embedding's initializers
        flat_logits = g.linear(final, embed_w, "lm_head", weights="token_embd")
    else:
        flat_logits = g.linear(final, weight(tensors["token_embd.weight"]), "lm_head")
    if g.float_proto == TensorProto.FLOAT:
        g.node("Reshape", [flat_logits, logits_shape], ["logits"], name="logits")
    else:
        shaped = g.node("Reshape", [flat_logits, logits_shape], name="logits/shape")[0]
        g.node("Cast", [shaped], ["logits"], name="logits", to=TensorProto.FLOAT)
    if next_token:
        g.node("ArgMax", ["logits"], ["next_token"], name="next_token", axis=-1, keepdims=1)
        outputs.append(helper.make_tensor_value_info(
            "next_token", TensorProto.INT64, ["batch_size", "sequence_length" if logits == "all" else 1, 1]))

    graph = helper.make_graph(g.nodes, f"{cfg.arch}_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="appliance.build.gguf_decoder")
    model.ir_version = 10
    return model


# --------------------------------------------------------------------------------------------------- import

def _check_first_layer(tensors: dict[str, Any]) -> None:
    """The repacking must dequantize bit-exactly like gguf's own dequantizer (checked on layer 0)."""
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        t = tensors[name]
        w = _linear_weight(t)
        if isinstance(w, NBitsWeight):
            n, k = _dims(t)
            ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(n, k)
            err = float(np.abs(w.dequantize() - ref).max())
            if err > 1e-6 * max(1.0, float(np.abs(ref).max())):
                raise AssertionError(f"repacked {name} differs from gguf dequantization by {err}")


def _write_graph(tensors: dict[str, Any], cfg: LlamaConfig, model_path: Path, variant: str, max_seq_len: int, *,
                 logits: str, with_query_seqlens: bool, progress: Callable[[str], None],
                 whole_q8: Q8FormChooser | None = None) -> None:
    table = tensors["token_embd.weight"]
    whole = (whole_q8 is not None and VARIANTS[variant] == INT8_ACTIVATIONS and table.tensor_type == _Q.Q8_0
             and whole_q8(*_dims(table)))
    model = build_graph(tensors, cfg, accuracy_level=VARIANTS[variant], max_seq_len=max_seq_len, logits=logits,
                        with_query_seqlens=with_query_seqlens, float_type=FLOAT_TYPES[variant],
                        next_token=variant == "cuda", whole_q8=whole, progress=progress)
    progress(f"writing {model_path.name}")
    tmp = model_path.with_suffix(".onnx.partial")
    onnx.save_model(model, str(tmp))
    tmp.replace(model_path)


def write_variant_graph(gguf_path: Path, model_path: Path, variant: str, max_seq_len: int | None = None,
                        progress: Callable[[str], None] | None = None, *, logits: str = "all") -> None:
    """Only the graph of ``variant`` (for example ``"cuda"``), written to ``model_path``: a second graph of a
    version whose tokenizer and ``generation.json`` :func:`import_gguf` wrote."""
    say = progress or (lambda _msg: None)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}")
    meta, tensors = read_gguf(Path(gguf_path))
    cfg = LlamaConfig.from_metadata(meta, _dims(tensors["token_embd.weight"])[0])
    _write_graph(tensors, cfg, Path(model_path), variant, int(max_seq_len or cfg.context_length), logits=logits,
                 with_query_seqlens=False, progress=say)


def import_gguf(gguf_path: Path, out_dir: Path, variant: str = "exact", max_seq_len: int | None = None,
                progress: Callable[[str], None] | None = None, *, logits: str = "all",
                with_query_seqlens: bool = False, whole_q8: Q8FormChooser | None = None) -> DecoderBuild:
    """Convert a Llama-family GGUF into ``out_dir``: ``model.onnx``, ``tokenizer.json``, ``chat_template.jinja``
    and ``generation.json``.

    ``variant``: ``"exact"`` (float32 compute), ``"fast"`` (int8 activations in the 4-bit matmuls) or ``"cuda"``
    (FP16 activations and KV cache, for ONNX Runtime's CUDA execution provider).
    ``max_seq_len``: longest sequence the graph supports (rotary table size), default the model's context length.
    ``logits``: ``"all"`` positions or only the ``"last"`` one per row. ``with_query_seqlens``: add the
    ``query_seqlens`` input for ragged multi-row chunks (see the module docstring). ``whole_q8``: for a graph with
    int8 activations over a Q8_0 token table, called with the table's ``(rows, columns)``: true keeps the graph's
    Q8_0 weights (the table, a tied LM head and any Q8_0 layer) 8-bit; otherwise (and always with float32
    activations) they are split into 4-bit halves.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}")
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"reading {gguf_path.name}")
    meta, tensors = read_gguf(gguf_path)
    cfg = LlamaConfig.from_metadata(meta, _dims(tensors["token_embd.weight"])[0])
    max_seq_len = int(max_seq_len or cfg.context_length)
    _check_first_layer(tensors)

    model_path = out_dir / "model.onnx"
    _write_graph(tensors, cfg, model_path, variant, max_seq_len, logits=logits,
                 with_query_seqlens=with_query_seqlens, progress=say, whole_q8=whole_q8)

    say("tokenizer and chat template")
    tokenizer_path = out_dir / "tokenizer.json"
    build_tokenizer(meta).save(str(tokenizer_path))
    template = meta.get("tokenizer.chat_template")
    chat_template_path = out_dir / "chat_template.jinja"
    chat_template_path.write_text(template or "", encoding="utf-8")
    special = special_token_ids(meta)
    generation = {
        **special,
        "variant": variant,
        "architecture": cfg.arch,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "max_seq_len": max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "logits": logits,
        "with_query_seqlens": with_query_seqlens,
        "has_chat_template": bool(template),
        "kv_input_names": "past_key_values.{layer}.{key|value}",
        "kv_output_names": "present.{layer}.{key|value}",
        "source": gguf_path.name,
    }
    generation_path = out_dir / "generation.json"
    generation_path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    say(f"done in {time.perf_counter() - started:.1f} s")
    return DecoderBuild(
        model_path=model_path, tokenizer_path=tokenizer_path, chat_template_path=chat_template_path,
        generation_path=generation_path, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, context_length=cfg.context_length,
        bos_token_id=int(special["bos_token_id"]) if special["bos_token_id"] is not None else -1,
        eos_token_ids=list(special["eos_token_ids"]), variant=variant)

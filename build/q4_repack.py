"""Lossless repacking of GGUF block-quantized weights into ONNX Runtime ``MatMulNBits`` initializers.

``MatMulNBits`` (com.microsoft) stores a weight ``W[N, K]`` (output features x input features) as
``B[N, K/block, block*bits/8]`` uint8, ``scales[N, K/block]`` and an optional zero point (default
``2**(bits-1)``), and dequantizes ``W = (q - zp) * scale``. For 4 bits, element ``2j`` of a block sits in the
low nibble of byte ``j`` and element ``2j+1`` in the high nibble.

GGUF layouts handled here (block size 32 for all three; rows are output features):

* ``Q4_0``: ``d:f16, qs[16]``, ``W = d * (q - 8)``; element ``j`` (0..15) is the low nibble of ``qs[j]``,
  element ``j+16`` the high nibble. Zero point 8 is MatMulNBits' default, so only the nibbles move.
* ``Q4_1``: ``d:f16, m:f16, qs[16]``, ``W = d * q + m``, same nibble order as Q4_0. The per-block minimum cannot
  be expressed as a uint8 zero point, so it is returned separately as a per-block offset ``c``:
  ``x @ W.T = MatMulNBits(x; q, d, zp) + blocksum(x) @ c`` where ``blocksum`` sums ``x`` over each 32-wide
  block of K and ``c`` is ``[K/32, N]``. Two equivalent forms: ``zp = 0, c = m`` (the codes as stored) or the
  default ``zp = 8, c = m + 8 d`` (centred codes: MatMulNBits' symmetric path, and with int8 activations the
  quantization error of ``x`` no longer multiplies the large all-positive mean of ``d * q``).
* ``Q8_0``: ``d:f16, qs[32]:int8``, ``W = d * q``. Either as 8-bit ``q + 128`` with the default zero point 128
  (``q8_0_to_nbits``), or split into two 4-bit halves (``q8_0_to_split_nbits``): with ``u = q + 128 = 16 h + l``,
  ``W = 16 d (h - 8) + d (l - 8) + 8 d``, i.e. one 4-bit MatMulNBits over the input repeated twice (``K' = 2K``,
  blocks ``[h | l]`` with scales ``[16 d | d]``) plus the block offset ``8 d``. ONNX Runtime's CPU kernel for
  8-bit weights with float32 activations is far slower than its 4-bit one (ONNX Runtime 1.32, AVX2: the
  49152 x 576 LM head took over 100 ms per token as 8-bit, about 4 ms split), so float32 graphs use the split
  form. With int8 activations (``accuracy_level`` 4) it can be the other way round (AVX-512 VNNI: 0.67 ms against
  0.92 for one row, 1.9 against 4.0 for eight), so the build times both for that graph (``appliance.build.q8_form``).

The conversions keep the integer codes and widen the f16 scales to f32 exactly; the only rounding is the
centred Q4_1 offset ``m + 8 d`` (one f32 addition; it reproduced ``gguf.quants.dequantize`` bit for bit on the
210 Q4_1 tensors of SmolLM2-135M).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass
class NBitsWeight:
    """A weight ``W[n, k]`` in MatMulNBits form, plus the Q4_1 per-block offsets when there are any."""

    n: int
    k: int
    bits: int
    packed: np.ndarray  # uint8 [n, k/32, 32*bits/8]
    scales: np.ndarray  # float32 [n, k/32]
    zero_points: np.ndarray | None  # packed uint8 [n, ceil(k/32 * bits / 8)], None: default 2**(bits-1)
    mins: np.ndarray | None  # float32 [k/32, n] per-block offsets (Q4_1, split Q8_0)
    input_copies: int = 1  # MatMulNBits sees the input repeated this many times along K (split Q8_0: 2)

    def dequantize(self) -> np.ndarray:
        """Float32 ``W[n, k]`` (for checks and fallbacks)."""
        kb = self.k // BLOCK * self.input_copies
        if self.bits == 4:
            lo = self.packed & 0x0F
            hi = self.packed >> 4
            q = np.stack([lo, hi], axis=-1).reshape(self.n, kb, BLOCK).astype(np.float32)
        else:
            q = self.packed.reshape(self.n, kb, BLOCK).astype(np.float32)
        if self.zero_points is None:
            zp = np.float32(2 ** (self.bits - 1))
        else:
            zp = _unpack_nibbles_pairwise(self.zero_points, kb).astype(np.float32)[..., None]
        w = ((q - zp) * self.scales[..., None]).reshape(self.n, self.input_copies, self.k).sum(axis=1)
        if self.mins is not None:
            w = (w.reshape(self.n, -1, BLOCK) + self.mins.T[..., None]).reshape(self.n, self.k)
        return w


def _unpack_nibbles_pairwise(packed: np.ndarray, count: int) -> np.ndarray:
    """MatMulNBits nibble order: element 2j low nibble of byte j, 2j+1 high nibble; keep ``count`` per row."""
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return both[:, :count]


def _pack_nibbles_pairwise(q: np.ndarray) -> np.ndarray:
    """Pack ``q[..., 2m]`` (values 0..15) pairwise: element 2j to the low nibble, 2j+1 to the high nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _blocks(raw: np.ndarray, n: int, k: int, block_bytes: int) -> np.ndarray:
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of the block size {BLOCK}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, block_bytes)
    return blocks


def _gguf_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 4-bit block codes ``[..., 16]`` bytes -> ``[..., 32]`` values in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32)


def q4_0_to_nbits(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    """GGUF Q4_0 rows (``raw`` uint8 ``[n, k/32*18]``) -> MatMulNBits 4-bit with the default zero point 8."""
    blocks = _blocks(raw, n, k, 18)
    scales = _f16(blocks, 0)
    q = _gguf_nibbles(blocks[..., 2:])
    return NBitsWeight(n, k, 4, _pack_nibbles_pairwise(q), scales, None, None)


def q4_1_to_nbits(raw: np.ndarray, n: int, k: int, centred: bool = True) -> NBitsWeight:
    """GGUF Q4_1 rows (``raw`` uint8 ``[n, k/32*20]``) -> MatMulNBits 4-bit plus per-block offsets.

    ``centred``: default zero point 8 with offsets ``m + 8 d``; otherwise an explicit zero point 0 with offsets
    ``m``. The offset for the centred form is rounded once to float32 (``8 d`` is exact, the sum may round).
    """
    blocks = _blocks(raw, n, k, 20)
    scales = _f16(blocks, 0)
    mins = _f16(blocks, 2)
    q = _gguf_nibbles(blocks[..., 4:])
    kb = k // BLOCK
    if centred:
        offsets = mins + np.float32(8.0) * scales
        zero_points = None
    else:
        offsets = mins
        zero_points = np.zeros((n, (kb + 1) // 2), dtype=np.uint8)
    return NBitsWeight(n, k, 4, _pack_nibbles_pairwise(q), scales, zero_points, np.ascontiguousarray(offsets.T))


def q8_0_to_nbits(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    """GGUF Q8_0 rows (``raw`` uint8 ``[n, k/32*34]``) -> MatMulNBits 8-bit with the default zero point 128."""
    blocks = _blocks(raw, n, k, 34)
    scales = _f16(blocks, 0)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int16) + 128
    return NBitsWeight(n, k, 8, q.astype(np.uint8), scales, None, None)


def q8_0_to_split_nbits(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    """GGUF Q8_0 rows -> 4-bit MatMulNBits over the input repeated twice, plus block offsets (exact)."""
    blocks = _blocks(raw, n, k, 34)
    d = _f16(blocks, 0)
    u = (np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    packed = np.concatenate([_pack_nibbles_pairwise(u >> 4), _pack_nibbles_pairwise(u & 0x0F)], axis=1)
    scales = np.concatenate([np.float32(16.0) * d, d], axis=1)
    offsets = np.ascontiguousarray((np.float32(8.0) * d).T)
    return NBitsWeight(n, k, 4, packed, scales, None, offsets, input_copies=2)


def concat_rows(parts: list[NBitsWeight]) -> NBitsWeight:
    """Stack weights that share K, bits and form along N (e.g. Q, K, V into one QKV projection)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.k, p.bits, p.zero_points is None, p.mins is None, p.input_copies) != (
                first.k, first.bits, first.zero_points is None, first.mins is None, first.input_copies):
            raise ValueError("cannot concatenate weights of different forms")
    return NBitsWeight(
        n=sum(p.n for p in parts),
        k=first.k,
        bits=first.bits,
        packed=np.concatenate([p.packed for p in parts], axis=0),
        scales=np.concatenate([p.scales for p in parts], axis=0),
        zero_points=None if first.zero_points is None else np.concatenate([p.zero_points for p in parts], axis=0),
        mins=None if first.mins is None else np.concatenate([p.mins for p in parts], axis=1),
        input_copies=first.input_copies,
    )

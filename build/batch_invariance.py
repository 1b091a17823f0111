"""Whether a decoder computes each row bitwise alike in any call, on this machine.

A decoder tier marked ``deterministic`` has its greedy and seeded answers stored by the response cache, which is
only right when a row's logits never depend on the rows beside it, how its prompt was chunked or which prompts
were prefilled with it. That depends on the CPU's kernels, not only on the graph: the fast tier's int8 4-bit
products compute a row alike in calls of one and of several rows on AVX-512 (Intel Xeon), while on an AVX2-only
AMD EPYC (ONNX Runtime 1.32) ONNX Runtime's one-row calls take another kernel and their logits differ from a
multi-row call's by up to 0.75 (calls of several rows still agree with each other bitwise). So the build measures
it on the machine it builds on (the appliance builds where it serves) and claims only what it measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROWS = 8  # the decoder measured needs at least this many rows, and 256 positions


def measure_batch_invariance(decoder: Any, seed: int = 3) -> dict[str, Any]:
    """Run ``decoder`` (an ``OnnxRuntimeDecoder`` with :data:`ROWS` rows) through calls that must agree bitwise
    if it is batch-invariant: a decode step of each row alone against the same step inside calls of 2, 5 and 8
    rows of other lengths; prompts prefilled alone against several in one ragged call (graphs that take
    ``query_seqlens``); a prompt prefilled whole against in chunks. Returns ``invariant``, the counts and the
    largest difference seen (the decoder's cache is left dirty)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 200, ROWS).astype(np.int32)
    prompts = [rng.integers(100, 5000, n) for n in lengths]
    step = rng.integers(100, 5000, (ROWS, 1))
    decoder.ensure(int(lengths.max()) + 1)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    together = None
    if decoder.takes_query_seqlens:
        padded = np.zeros((4, int(lengths[:4].max())), np.int64)
        for row, prompt in enumerate(prompts[:4]):
            padded[row, :len(prompt)] = prompt
        together = decoder.prefill_rows(0, padded, lengths[:4] - 1, lengths[:4]).copy()
    firsts = [decoder.run(row, prompt[None], np.array([len(prompt) - 1], np.int32))[0].copy()
              for row, prompt in enumerate(prompts)]
    if together is not None:
        pairs += [(together[row], firsts[row]) for row in range(4)]
    alone = [decoder.run(row, step[row:row + 1], lengths[row:row + 1])[0].copy() for row in range(ROWS)]
    for rows in (2, 5, 8):
        shared = decoder.run(0, step[:rows], lengths[:rows])
        pairs += [(shared[row].copy(), alone[row]) for row in range(rows)]
    last = ROWS - 1
    whole = decoder.run(0, prompts[last][None], np.array([lengths[last] - 1], np.int32))[0].copy()
    for cut in (1, 64):
        decoder.run(1, prompts[last][None, :cut], np.array([cut - 1], np.int32))
        chunked = decoder.run(1, prompts[last][None, cut:], np.array([lengths[last] - 1], np.int32))[0]
        pairs.append((chunked.copy(), whole))
    differing = [float(np.abs(a - b).max()) for a, b in pairs if not np.array_equal(a, b)]
    return {"invariant": not differing, "checks": len(pairs), "differing": len(differing),
            "max_abs_difference": max(differing, default=0.0)}

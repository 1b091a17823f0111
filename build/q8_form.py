"""Which form of a Q8_0 weight this machine's ONNX Runtime multiplies faster with int8 activations.

A Q8_0 weight can enter ``MatMulNBits`` as 8-bit codes or split into two 4-bit halves over the input repeated
twice (see ``appliance.build.q4_repack``). With float32 activations the split form is the only fast one; with int8
activations (the fast decoder variant) which one wins depends on the kernels ONNX Runtime has for the CPU: on
AVX-512 VNNI the 8-bit one took 0.67 ms a row for SmolLM2's 49152 x 576 LM head against 0.92 ms split. The build
times both on the machine it runs on (the appliance builds where it serves), in alternation so that a drifting
machine slows both alike, and keeps the 8-bit form only when it wins by a clear margin: close timings would
otherwise pick a different graph from one build to the next.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.build import q4_repack
from appliance.build.gguf_decoder import INT8_ACTIVATIONS, linear_model
from appliance.engines.form_timing import time_alternating, timing_options

FORMS = ("8-bit", "split")
RUNS = 30  # timed calls per form, after warm-up; a 49152 x 576 head takes about 1 ms a call
MARGIN = 0.9  # the 8-bit form is kept when its time is under this share of the split form's

# (rows, columns, threads, runs) -> per form, the median seconds of one row or the error that stopped it
FormTiming = Callable[[int, int, int, int], dict[str, float | Exception]]


@dataclass
class Q8FormTimer:
    """A chooser for ``import_gguf(whole_q8=...)`` that times both forms at the weight's shape and remembers what
    it measured (``figures``, for the build's provenance). A form whose session cannot be made or run (an ONNX
    Runtime without that kernel) loses, its error in the figures: the split form is the one every version runs."""

    threads: int = 0  # ONNX Runtime's intra-op threads, as the decoder will run (0: its default)
    runs: int = RUNS
    timing: FormTiming = field(default_factory=lambda: time_forms)
    figures: dict[str, object] = field(default_factory=dict)

    def __call__(self, rows: int, columns: int) -> bool:
        measured = self.timing(rows, columns, self.threads, self.runs)
        seconds = {form: value for form, value in measured.items() if isinstance(value, float)}
        whole = "8-bit" in seconds and seconds["8-bit"] < MARGIN * seconds.get("split", math.inf)
        self.figures = {"q8_0_form": "8-bit" if whole else "split", "shape": [rows, columns], "margin": MARGIN,
                        **{f"{form}_ms_per_row": s * 1e3 for form, s in seconds.items()},
                        **{f"{form}_error": f"{type(e).__name__}: {e}"[:300] for form, e in measured.items()
                           if isinstance(e, Exception)}}
        return whole


def time_forms(rows: int, columns: int, threads: int, runs: int) -> dict[str, float | Exception]:
    """Median seconds of one row through a random Q8_0 weight of ``rows x columns`` in each form, the forms'
    calls alternating; a form whose session fails gives its error instead."""
    feed = {"x": np.random.default_rng(0).standard_normal((1, columns)).astype(np.float32)}
    raw = _random_q8_0(rows, columns)
    return time_alternating({form: functools.partial(_session, form, raw, rows, columns, threads) for form in FORMS},
                            feed, runs, warmup=5)


def _session(form: str, raw: np.ndarray, rows: int, columns: int, threads: int) -> Any:
    import onnxruntime as ort

    if form == "8-bit":
        weight = q4_repack.q8_0_to_nbits(raw, rows, columns)
    else:
        weight = q4_repack.q8_0_to_split_nbits(raw, rows, columns)
    return ort.InferenceSession(linear_model(weight, INT8_ACTIVATIONS).SerializeToString(), timing_options(threads),
                                providers=["CPUExecutionProvider"])


def _random_q8_0(rows: int, columns: int) -> np.ndarray:
    """GGUF Q8_0 rows of random codes and small scales (``[rows, columns / 32 * 34]`` uint8)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows, columns // q4_repack.BLOCK, 34), dtype=np.uint8)
    scales = (rng.random((rows, columns // q4_repack.BLOCK)) * 0.01).astype(np.float16)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)

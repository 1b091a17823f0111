"""Which form of a Q8_0 weight this machine's ONNX Runtime multiplies faster with int8 activations.

A Q8_0 weight can enter ``MatMulNBits`` as 8-bit codes or split into two 4-bit halves over the input repeated
twice (see ``appliance.build.q4_repack``). With float32 activations the split form is the only fast one; with int8
activations (the fast decoder variant) which one wins depends on the kernels ONNX Runtime has for the CPU: on
AVX-512 VNNI the 8-bit one took 0.67 ms a row for SmolLM2's 49152 x 576 LM head against 0.92 ms split. The build
times both on the machine it runs on (the appliance builds where it serves) and keeps the faster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from appliance.build import q4_repack
from appliance.build.gguf_decoder import INT8_ACTIVATIONS, linear_model

RUNS = 30  # timed calls per form, after warm-up; a 49152 x 576 head takes about 1 ms a call


FormTiming = Callable[[str, int, int, int, int], float]  # (form, rows, columns, threads, runs) -> seconds a row


@dataclass
class Q8FormTimer:
    """A chooser for ``import_gguf(whole_q8=...)`` that times both forms at the weight's shape and remembers what
    it measured (``figures``, for the build's provenance). A form whose session cannot be made or run (an ONNX
    Runtime without that kernel) counts as infinitely slow, its error in the figures: the split form is the one
    every version runs."""

    threads: int = 0  # ONNX Runtime's intra-op threads, as the decoder will run (0: its default)
    runs: int = RUNS
    timing: FormTiming = field(default_factory=lambda: _time_form)
    figures: dict[str, object] = field(default_factory=dict)

    def __call__(self, rows: int, columns: int) -> bool:
        seconds: dict[str, float] = {}
        errors: dict[str, str] = {}
        for form in ("8-bit", "split"):
            try:
                seconds[form] = self.timing(form, rows, columns, self.threads, self.runs)
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; the build must go on
                seconds[form], errors[f"{form}_error"] = math.inf, f"{type(exc).__name__}: {exc}"[:300]
        whole = seconds["8-bit"] < seconds["split"]
        self.figures = {"q8_0_form": "8-bit" if whole else "split", "shape": [rows, columns],
                        **{f"{form}_ms_per_row": s * 1e3 for form, s in seconds.items() if math.isfinite(s)},
                        **errors}
        return whole


def _time_form(form: str, rows: int, columns: int, threads: int, runs: int) -> float:
    """Median seconds of one row through a random Q8_0 weight of ``rows x columns`` in ``form``."""
    import onnxruntime as ort

    raw = _random_q8_0(rows, columns)
    weight = q4_repack.q8_0_to_nbits(raw, rows, columns) if form == "8-bit" else \
        q4_repack.q8_0_to_split_nbits(raw, rows, columns)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # as the decoder's steps run
    session = ort.InferenceSession(linear_model(weight, INT8_ACTIVATIONS).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).standard_normal((1, columns)).astype(np.float32)}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _random_q8_0(rows: int, columns: int) -> np.ndarray:
    """GGUF Q8_0 rows of random codes and small scales (``[rows, columns / 32 * 34]`` uint8)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows, columns // q4_repack.BLOCK, 34), dtype=np.uint8)
    scales = (rng.random((rows, columns // q4_repack.BLOCK)) * 0.01).astype(np.float16)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)

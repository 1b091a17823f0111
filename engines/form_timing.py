"""Timing two or more forms of the same product on this machine, for choices made where the appliance runs (the
fast tier's Q8_0 form at build, the exact tier's split weights at load)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from statistics import median
from typing import Any


def timing_options(threads: int) -> Any:
    """ONNX Runtime ``SessionOptions`` for a timed form: ``threads`` intra-op threads (0: its choice), quiet."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Not spinning, unlike the decoder: a form's pool threads spinning after its call would take the cores from
    # the other form's next call (measured: timings of the same head varied 2x).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def time_alternating(makers: Mapping[str, Callable[[], Any]], feed: Mapping[str, Any], runs: int,
                     warmup: int = 3) -> dict[str, float | Exception]:
    """Median seconds of a call of each form's session (made by ``makers``) on ``feed``, the forms' calls
    alternating so that a drifting machine slows all alike; a form whose session cannot be made or run gives its
    error instead (ONNX Runtime raises its own types)."""
    sessions: dict[str, Any] = {}
    outcome: dict[str, float | Exception] = {}
    for form, make in makers.items():
        try:
            sessions[form] = make()
            for _ in range(warmup):
                sessions[form].run(None, feed)
        except Exception as exc:  # noqa: BLE001 - the choice must go on without the form that failed
            outcome[form] = exc
            sessions.pop(form, None)
    times: dict[str, list[float]] = {form: [] for form in sessions}
    for _ in range(runs):
        for form, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feed)
            times[form].append(time.perf_counter() - started)
    outcome.update({form: float(median(values)) for form, values in times.items()})
    return outcome

"""The data plane: the one place that knows the order of the request path's steps.

Handlers parse a protocol into a :class:`~appliance.types.Request` and hand it here; what comes back is a
:class:`~appliance.types.Result`. Steps present today: resolve the model, check the inputs, queue on the model's
batcher (engine calls run in its worker threads), account.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from appliance.errors import BadRequest
from appliance.model_version import ModelVersion
from appliance.repository import ModelManager
from appliance.types import Request, Result, Trace, Usage


class DataPlane:
    """Runs requests through the steps of the request path."""

    def __init__(self, models: ModelManager, clock: Callable[[], float] = time.monotonic) -> None:
        self.models = models
        self._clock = clock

    async def infer(self, request: Request, trace: Trace) -> tuple[Result, ModelVersion]:
        """Run a tensor request on its model; ``trace`` is filled in as the model becomes known."""
        served = self.models.resolve(request.model, request.version)
        trace.model, trace.version = served.name, str(served.version)
        served.check_inputs(request.inputs)
        if request.outputs is not None:
            known = {t.name for t in served.outputs}
            unknown = [name for name in request.outputs if name not in known]
            if unknown:
                raise BadRequest(
                    f"unknown output {unknown[0]!r} for model {served.name}; its outputs are {sorted(known)}"
                )
        deadline = request.deadline
        if deadline is None and served.default_timeout_s is not None:
            deadline = self._clock() + served.default_timeout_s
        assert served.batcher is not None
        metrics = served.metrics
        metrics.in_flight.inc()
        try:
            # Submitting is synchronous: no await between resolve() and here, so a swap cannot slip in between.
            outcome = await served.batcher.submit(request.inputs, deadline)
        finally:
            metrics.in_flight.dec()
        metrics.queue_duration.observe(outcome.queue_s)
        usage = Usage(queue_s=outcome.queue_s, compute_s=outcome.compute_s, batch_size=outcome.batch_size)
        trace.usage = usage
        outputs = outcome.outputs
        if request.outputs is not None:
            outputs = {name: outputs[name] for name in request.outputs}
        return Result(request.id, served.name, served.version, outputs, usage), served

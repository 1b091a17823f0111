"""Where a request runs: routing of router aliases, admission in front of local models, and the decision to send
it to a cloud upstream (overflow, failover or complexity), always within the caller's data policy.

A request leaves the device only when all of these hold: the key allows it (``cloud = true``), the request did not
ask to stay (``x-appliance-data: local-only``), an upstream of the right kind maps the model, and that upstream's
circuit breaker and concurrency cap let it through.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from appliance.admission import Admission, LaneGate, Saturated
from appliance.errors import ApplianceError, QueueFull
from appliance.model_version import ModelVersion
from appliance.routing import Router
from appliance.telemetry import Metrics
from appliance.types import Route, Trace

TASK_KINDS = {"generate": "openai", "embed": "openai", "tensor": "kserve"}


class SpillToCloud(Exception):
    """The request goes to a cloud upstream; the handler relays it (it holds the wire format)."""

    def __init__(self, route: Route) -> None:
        super().__init__(route.reason)
        self.route = route


@dataclass
class Ticket:
    """A request's place at a model's gate; released with the service time when the model is done with it."""

    gate: LaneGate
    released: bool = False

    def release(self, service_s: float | None) -> None:
        """Leave the gate (once)."""
        if not self.released:
            self.released = True
            self.gate.release(service_s)


class Placement:
    """Routing, admission and cloud decisions for the data plane."""

    def __init__(self, router: Router, admission: Admission, upstreams: Mapping[str, object],
                 metrics: Metrics) -> None:
        self.router = router
        self.admission = admission
        self.upstreams = upstreams
        self._metrics = metrics
        self._named = metrics.route_decisions.labels("-", "local", "named")

    def cloud_for(self, model: str, task: str, trace: Trace) -> str | None:
        """The upstream that may take this request now, or ``None`` if it must stay on the device."""
        principal = trace.principal
        if principal is None or not principal.cloud or trace.local_only:
            return None
        kind = TASK_KINDS.get(task)
        for name, upstream in self.upstreams.items():
            config = upstream.config  # type: ignore[attr-defined]
            if config.kind == kind and upstream.model_for(model) is not None and upstream.available():  # type: ignore[attr-defined]
                return name
        return None

    def named(self, trace: Trace) -> None:
        """Record that the request named its model."""
        trace.route = "named in the request"
        self._named.inc()

    def decided(self, route: Route, trace: Trace, router: str = "") -> Route:
        """Record a routing decision on the trace and in the metrics."""
        trace.route = route.reason
        self._metrics.route_decisions.labels(router or "-", route.place, route.kind).inc()
        if route.place == "cloud":
            raise SpillToCloud(route)
        return route

    def route_generation(self, name: str, messages: list[dict] | None, prompt: object, max_tokens: int | None,
                         trace: Trace) -> Route:
        """Route a router alias for chat or completions; raise :class:`SpillToCloud` for the cloud."""
        if messages is not None:
            text = "\n".join(m["content"] for m in messages)
            turns = sum(1 for m in messages if m["role"] == "user")
        else:
            text, turns = (prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))), 1

        def cloud() -> str | None:
            upstream = self.router.config.cloud_upstream
            chosen = self.upstreams.get(upstream)
            if chosen is None or self.cloud_for(name, "generate", trace) is None:
                return None
            return upstream if chosen.available() else None  # type: ignore[attr-defined]

        route = self.router.route_generation(name, text, turns, max_tokens, cloud)
        return self.decided(route, trace, name)

    async def admit(self, served: ModelVersion, trace: Trace, task: str) -> Ticket | None:
        """Pass the model's gate in the request's lane, or overflow: to the cloud if allowed, else 429/503."""
        config = self.admission.config
        if not config.enabled:
            return None
        lane = trace.lane or "interactive"
        gate = self.admission.gate(served.name, served.version, *_capacity(served))
        budget = self.admission.max_wait_s(lane)
        if trace.arrived:
            budget -= time.monotonic() - trace.arrived  # reading and checking the request counts as waiting
        try:
            await gate.acquire(lane, budget)
        except (Saturated, QueueFull) as exc:
            self._overflow(served, trace, exc, task)
            raise
        return Ticket(gate)

    def _overflow(self, served: ModelVersion, trace: Trace, exc: ApplianceError, task: str) -> None:
        self._metrics.admission_rejected.labels(served.name, trace.lane or "interactive").inc()
        if not self.admission.config.overflow_to_cloud or getattr(exc, "waited", False):
            return
        upstream = self.cloud_for(served.name, task, trace)
        if upstream is not None:
            self.decided(Route("cloud", served.name, f"overflow: {exc.message}", "overflow", upstream=upstream),
                         trace)

    def failover(self, name: str, task: str, trace: Trace, exc: ApplianceError) -> None:
        """A local model that is not ready or failing: to the cloud where allowed (else the caller re-raises)."""
        upstream = self.cloud_for(name, task, trace)
        if upstream is not None:
            self.decided(Route("cloud", name, f"failover: {exc.message}", "failover", upstream=upstream), trace)


def _capacity(served: ModelVersion) -> tuple[int, int, float]:
    """(parallel capacity, admission limit, initial service time) of a model version."""
    spec = served.spec
    if served.generator is not None and served.generation_limits is not None:
        slots = served.generation_limits.slots
        return slots, slots, 2.0
    rows = max(1, spec.batching.max_batch_size) * max(1, spec.engine.instances)
    # A batching model gets a second batch's worth inside, to form while the first runs; others none.
    return rows, 2 * rows if spec.batching.max_batch_size > 1 else rows, served.warm_run_s or 0.01

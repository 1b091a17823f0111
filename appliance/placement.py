"""Where a request runs: routing of router aliases, admission in front of local models, and the decision to send
it to a cloud upstream (overflow, failover or complexity), always within the caller's data policy.

A request leaves the device only when all of these hold: the key allows it (``cloud = true``), the request did not
ask to stay (``x-appliance-data: local-only``), an upstream of the right kind maps the model, and that upstream's
circuit breaker and concurrency cap let it through.

Every decision is counted where it is made, in ``appliance_route_decisions_total{router, place, kind}``: each
request once as ``named`` or ``complexity`` (the first step), and once more as ``overflow`` or ``failover`` when it
falls back to the cloud, so that the fallback rate is the sum of the second pair over the sum of the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from appliance.admission import Admission, GateState, LaneGate
from appliance.errors import ApplianceError, QueueFull, Saturated
from appliance.model_version import ModelVersion
from appliance.models import GenerativeModel
from appliance.routing import Router
from appliance.telemetry import Metrics
from appliance.types import Caller, GenerateRequest, Route

TASK_KINDS = {"generate": "openai", "embed": "openai", "tensor": "kserve"}


@dataclass
class Ticket:
    """A request's place at a model's gate; released with the service time when the model is done with it."""

    gate: LaneGate
    places: int = 1
    released: bool = False

    def release(self, service_s: float | None) -> None:
        """Leave the gate (once)."""
        if not self.released:
            self.released = True
            self.gate.release(service_s, self.places)


class Placement:
    """Routing, admission and cloud decisions for the data plane: each returns a :class:`Route` (or a place at the
    gate); the data plane runs it."""

    def __init__(self, router: Router, admission: Admission, upstreams: Mapping[str, object],
                 metrics: Metrics) -> None:
        self.router = router
        self.admission = admission
        self.upstreams = upstreams
        self._metrics = metrics
        self._decisions: dict[tuple[str, str, str], object] = {}  # counter children by (router, place, kind)

    def cloud_for(self, model: str, task: str, caller: Caller) -> str | None:
        """The upstream that may take this request now, or ``None`` if it must stay on the device."""
        principal = caller.principal
        if principal is None or not principal.cloud or caller.local_only:
            return None
        kind = TASK_KINDS.get(task)
        for name, upstream in self.upstreams.items():
            config = upstream.config  # type: ignore[attr-defined]
            if config.kind == kind and upstream.model_for(model) is not None and upstream.available():  # type: ignore[attr-defined]
                return name
        return None

    def named(self, model: str) -> Route:
        """The route of a request that named its model."""
        return self._decided(Route("local", model, "named in the request", "named"))

    def _decided(self, route: Route, router: str = "") -> Route:
        """Count the decision (router: the alias that routed it, ``-`` for the others) and return it."""
        key = (router or "-", route.place, route.kind)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self._metrics.route_decisions.labels(*key)
        self._metrics.pending.add(child)
        return route

    def route_embedding(self, alias: str) -> Route:
        """Route a router alias for embeddings."""
        return self._decided(self.router.route_embedding(alias), alias)

    def route_generation(self, alias: str, request: GenerateRequest) -> Route:
        """Route a router alias for chat or completions by the request's complexity."""
        if request.messages is not None:
            text = "\n".join(m["content"] for m in request.messages)
            turns = sum(1 for m in request.messages if m["role"] == "user")
        else:
            text = "\n".join(p if isinstance(p, str) else " ".join(map(str, p or [])) for p in request.prompt_list)
            turns = 1

        def cloud() -> str | None:
            upstream = self.router.config.cloud_upstream
            chosen = self.upstreams.get(upstream)
            if chosen is None or self.cloud_for(alias, "generate", request.caller) is None:
                return None
            return upstream if chosen.available() else None  # type: ignore[attr-defined]

        route = self.router.route_generation(alias, text, turns, request.max_tokens, cloud)
        return self._decided(route, alias)

    async def admit(self, served: ModelVersion, caller: Caller, task: str, places: int = 1) -> Ticket | Route | None:
        """``places`` at the model's gate (the sequences or rows the request runs) in the caller's lane (``None``
        when admission is off), or, when the model is saturated, a cloud route where the policy allows one; else
        :class:`Saturated` or :class:`QueueFull`."""
        config = self.admission.config
        if not config.enabled:
            return None
        lane = caller.lane
        gate = self.admission.gate(served.name, served.version, *_capacity(served))
        budget = self.admission.max_wait_s(lane)
        if caller.arrived:
            budget -= time.monotonic() - caller.arrived  # reading and checking the request counts as waiting
        try:
            await gate.acquire(lane, budget, places)
        except (Saturated, QueueFull) as exc:
            overflow = self._overflow(served, caller, exc, task)
            if overflow is None:
                raise
            return overflow
        return Ticket(gate, gate.places_for(places))

    def _overflow(self, served: ModelVersion, caller: Caller, exc: ApplianceError, task: str) -> Route | None:
        self._metrics.pending.add(self._metrics.admission_rejected.labels(served.name, caller.lane))
        if not self.admission.config.overflow_to_cloud or getattr(exc, "waited", False):
            return None
        upstream = self.cloud_for(served.name, task, caller)
        if upstream is None:
            return None
        return self._decided(Route("cloud", served.name, f"overflow: {exc.message}", "overflow", upstream=upstream))

    def lanes(self, serving: Iterable[ModelVersion]) -> list[GateState]:
        """The gates of the versions ``serving`` (made now for a version no request has reached yet, so that its
        capacity shows from the start) and of retired versions still holding requests; none when admission is
        off. On the event loop."""
        if not self.admission.config.enabled:
            return []
        keep = set()
        for served in serving:
            self.admission.gate(served.name, served.version, *_capacity(served))
            keep.add((served.name, served.version))
        return self.admission.states(keep)

    def failover(self, name: str, task: str, caller: Caller, exc: ApplianceError) -> Route | None:
        """A cloud route for a local model that is not ready or failing, where the policy allows one."""
        upstream = self.cloud_for(name, task, caller)
        if upstream is None:
            return None
        return self._decided(Route("cloud", name, f"failover: {exc.message}", "failover", upstream=upstream))


def _capacity(served: ModelVersion) -> tuple[int, int, float]:
    """(parallel capacity, admission limit, initial service time) of a model version."""
    spec = served.spec
    if isinstance(served, GenerativeModel) and served.generation_limits is not None:
        slots = served.generation_limits.slots
        return slots, slots, 2.0
    rows = max(1, spec.batching.max_batch_size) * max(1, spec.engine.instances)
    # A batching model gets a second batch's worth inside, to form while the first runs; others none.
    return rows, 2 * rows if spec.batching.max_batch_size > 1 else rows, served.warm_run_s or 0.01

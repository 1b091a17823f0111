"""Placement's decisions on their own: which upstream may take a request, admission or overflow, failover."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.admission import Admission
from appliance.config import AdmissionConfig, RoutingConfig
from appliance.errors import ModelNotReady, Saturated
from appliance.placement import Placement, Ticket
from appliance.routing import Router
from appliance.telemetry import Metrics
from appliance.types import Caller, Principal, Route


@dataclass
class Upstream:
    kind: str
    models: dict[str, str]
    up: bool = True
    config: Any = field(init=False)

    def __post_init__(self) -> None:
        self.config = SimpleNamespace(kind=self.kind)

    def model_for(self, model: str) -> str | None:
        return self.models.get(model)

    def available(self) -> bool:
        return self.up


def caller(cloud: bool = True, local_only: bool = False, lane: str = "interactive") -> Caller:
    principal = Principal(tenant="t", key_id="k", key_name="k", models=(), cloud=cloud, cache_scope=None,
                          admin=False)
    return Caller(principal, lane=lane, local_only=local_only)


def model(name: str = "m") -> Any:
    spec = SimpleNamespace(batching=SimpleNamespace(max_batch_size=1), engine=SimpleNamespace(instances=1))
    return SimpleNamespace(name=name, version=1, spec=spec, generator=None, generation_limits=None, warm_run_s=0.01)


def placement(upstreams: dict[str, Upstream], admission: AdmissionConfig | None = None) -> Placement:
    models = SimpleNamespace(serving=lambda: [])
    return Placement(Router(RoutingConfig(), models), Admission(admission or AdmissionConfig()),  # type: ignore[arg-type]
                     upstreams, Metrics())


def test_the_cloud_is_only_where_key_request_kind_mapping_and_upstream_all_allow():
    edge = Upstream("kserve", {"m": "remote"})
    chat = Upstream("openai", {"m": "remote"})
    chosen = placement({"edge": edge, "chat": chat})
    assert chosen.cloud_for("m", "tensor", caller()) == "edge"
    assert chosen.cloud_for("m", "generate", caller()) == "chat"
    assert chosen.cloud_for("m", "tensor", caller(cloud=False)) is None  # the key keeps data here
    assert chosen.cloud_for("m", "tensor", caller(local_only=True)) is None  # the request asked to stay
    assert chosen.cloud_for("other", "tensor", caller()) is None  # no upstream maps the model
    edge.up = False
    assert chosen.cloud_for("m", "tensor", caller()) is None  # breaker open or at its cap
    assert chosen.cloud_for("m", "tensor", Caller()) is None  # no key at all


async def test_admission_gives_a_ticket_then_an_overflow_route_or_the_error():
    chosen = placement({"edge": Upstream("kserve", {"m": "remote"})},
                       AdmissionConfig(interactive_max_wait_ms=1, max_waiting=1))
    served = model()
    ticket = await chosen.admit(served, caller(), "tensor")
    assert isinstance(ticket, Ticket)
    # The model's one place is taken: the next request overflows, where the policy allows.
    overflow = await chosen.admit(served, caller(), "tensor")
    assert isinstance(overflow, Route) and overflow.kind == "overflow" and overflow.upstream == "edge"
    assert overflow.reason.startswith("overflow: ")
    with pytest.raises(Saturated):
        await chosen.admit(served, caller(local_only=True), "tensor")
    ticket.release(0.01)
    ticket.release(0.01)  # once only
    again = await chosen.admit(served, caller(local_only=True), "tensor")
    assert isinstance(again, Ticket)


async def test_a_ticket_holds_and_gives_back_the_places_its_request_takes():
    chosen = placement({})
    served = model()
    served.spec.batching.max_batch_size = 8  # eight rows, sixteen places with the batch that forms meanwhile
    ticket = await chosen.admit(served, caller(), "embed", places=5)
    assert isinstance(ticket, Ticket) and ticket.places == 5
    (state,) = chosen.admission.states()
    assert state.active == 5 and state.limit == 16
    ticket.release(0.01)
    ticket.release(0.01)  # once only
    assert chosen.admission.states()[0].active == 0


async def test_admission_off_admits_everything():
    chosen = placement({}, AdmissionConfig(enabled=False))
    assert await chosen.admit(model(), caller(), "tensor") is None


def test_failover_names_the_reason_or_stays_local():
    chosen = placement({"chat": Upstream("openai", {"m": "remote"})})
    route = chosen.failover("m", "embed", caller(), ModelNotReady("model m is loading"))
    assert route is not None and route.kind == "failover" and route.reason == "failover: model m is loading"
    assert chosen.failover("m", "embed", caller(cloud=False), ModelNotReady("loading")) is None
    assert chosen.failover("m", "tensor", caller(), ModelNotReady("loading")) is None  # no kserve upstream

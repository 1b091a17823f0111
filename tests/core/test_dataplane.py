"""The data plane's steps, in order, with fakes injected for the models, the upstream and the ledger: route,
resolve (and the key's check), cache, admit, execute (local or cloud), account."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from appliance.accounting import Accounting
from appliance.admission import Admission
from appliance.config import AdmissionConfig, RoutingConfig
from appliance.dataplane import DataPlane
from appliance.errors import BadRequest, EngineFailed, Forbidden, ModelNotReady, QueueFull, Saturated
from appliance.generation_stream import Chunk, GenerationStream, TokenCount
from appliance.ledger import UsageRecord
from appliance.models import TensorModel
from appliance.placement import Placement
from appliance.routing import Router
from appliance.telemetry import Metrics
from appliance.types import Caller, Principal, Result, Route, TensorRequest, Usage

INPUTS = {"x": np.ones((2, 3), np.float32)}


class _Gauge:
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def observe(self, value: float) -> None: ...
    def started(self) -> None: ...
    def finished(self) -> None: ...


@dataclass
class FakeBatcher:
    """Answers ``x + 1``; or raises what it is told to."""

    error: Exception | None = None
    calls: int = 0

    async def submit(self, inputs: dict, deadline: float | None) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return SimpleNamespace(outputs={"y": inputs["x"] + 1}, queue_s=0.001, compute_s=0.5, batch_size=4)


class FakeTensorModel(TensorModel):
    """A tensor model version with no engine: a fake batcher answers, the spec is made up."""

    def __init__(self, name: str = "m") -> None:  # no super().__init__: nothing to load
        cost = SimpleNamespace(per_request=0.0, per_compute_second=2.0, per_million_input_tokens=0.0,
                               per_million_output_tokens=0.0)
        batching = SimpleNamespace(max_batch_size=4, default_timeout_ms=0)
        self.spec = SimpleNamespace(name=name, version=1, aliases=[], deterministic=True, task="tensor", tier="",
                                    cost=cost, batching=batching, engine=SimpleNamespace(instances=1))
        gauge = _Gauge()
        self.metrics = SimpleNamespace(in_flight=gauge, queue_duration=gauge, started=gauge.started,
                                       finished=gauge.finished)
        self.batcher = FakeBatcher()  # type: ignore[assignment]
        self.outputs = [SimpleNamespace(name="y")]  # type: ignore[list-item]
        self.output_datatypes = {"y": "FP32"}
        self.build_hash, self.warm_run_s, self.ready = "h", 0.01, True

    def check_inputs(self, inputs: Any) -> None:
        """Any inputs will do."""


@dataclass
class FakeModels:
    """A ModelManager with one model, which can be made not ready."""

    model: Any = field(default_factory=FakeTensorModel)
    ready: bool = True
    resolved: list[str] = field(default_factory=list)

    def resolve(self, name: str, version: int | None = None) -> Any:
        self.resolved.append(name)
        if name != self.model.name:
            from appliance.errors import ModelNotFound

            raise ModelNotFound(f"no model {name}")
        if not self.ready:
            raise ModelNotReady(f"model {name} is loading")
        return self.model

    def serving(self) -> list[Any]:
        return [self.model]


@dataclass
class FakeUpstream:
    """What placement needs of an upstream: a kind, a model map and availability."""

    name: str = "edge"
    config: Any = field(default_factory=lambda: SimpleNamespace(kind="kserve"))

    def model_for(self, model: str) -> str:
        return f"remote-{model}"

    def available(self) -> bool:
        return True


@dataclass
class FakeCloud:
    """The cloud step: records the routes it ran."""

    routes: list[Route] = field(default_factory=list)

    def model_label(self, route: Route) -> str:
        return f"{route.upstream}:remote-{route.model}"

    async def infer(self, route: Route, request: TensorRequest) -> tuple[Result, float]:
        self.routes.append(route)
        return Result(request.model, 0, {}, {}, Usage(), relayed=SimpleNamespace(body=b"{}")), 0.25


@dataclass
class FakeLedger:
    records: list[UsageRecord] = field(default_factory=list)

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)


def principal(cloud: bool = True, models: tuple[str, ...] = ()) -> Principal:
    return Principal(tenant="t", key_id="k1", key_name="one", models=models, cloud=cloud, cache_scope=None,
                     admin=False)


def plane(models: FakeModels, admission: AdmissionConfig | None = None) -> tuple[DataPlane, FakeCloud, FakeLedger]:
    metrics = Metrics()
    placement = Placement(Router(RoutingConfig(), models), Admission(admission or AdmissionConfig()),  # type: ignore[arg-type]
                          {"edge": FakeUpstream()}, metrics)
    cloud, ledger = FakeCloud(), FakeLedger()
    dataplane = DataPlane(models, None, placement, cloud, Accounting(ledger))  # type: ignore[arg-type]
    return dataplane, cloud, ledger


def tensor_request(caller: Caller) -> TensorRequest:
    return TensorRequest("m", None, dict(INPUTS), caller=caller)


async def test_a_local_request_runs_and_is_accounted_once():
    models = FakeModels()
    dataplane, cloud, ledger = plane(models)
    request = tensor_request(Caller(principal(), local_only=False))
    result = await dataplane.infer(request)
    np.testing.assert_array_equal(result.outputs["y"], INPUTS["x"] + 1)
    assert result.datatypes == {"y": "FP32"} and not cloud.routes
    trace = request.trace
    assert (trace.model, trace.version, trace.place, trace.route) == ("m", "1", "local", "named in the request")
    assert trace.usage is not None and trace.usage.batch_size == 4
    [record] = ledger.records
    # Two rows of a batch of four: half the batch's 0.5 s, at 2.0 per compute second.
    assert record.place == "local" and record.compute_s == pytest.approx(0.25) and record.cost == pytest.approx(0.5)


async def test_a_model_outside_the_key_is_403_before_anything_runs():
    models = FakeModels()
    dataplane, cloud, ledger = plane(models)
    with pytest.raises(Forbidden, match="may not call model 'm'"):
        await dataplane.infer(tensor_request(Caller(principal(models=("other",)), local_only=False)))
    assert models.model.batcher.calls == 0 and not cloud.routes and not ledger.records


async def test_a_model_that_is_not_ready_fails_over_only_where_the_policy_allows():
    models = FakeModels(ready=False)
    dataplane, cloud, ledger = plane(models)
    with pytest.raises(ModelNotReady):
        await dataplane.infer(tensor_request(Caller(principal(cloud=True), local_only=True)))
    assert not cloud.routes
    request = tensor_request(Caller(principal(cloud=True), local_only=False))
    result = await dataplane.infer(request)
    assert result.relayed is not None and [r.kind for r in cloud.routes] == ["failover"]
    assert request.trace.place == "cloud" and request.trace.model == "edge:remote-m"
    assert request.trace.route.startswith("failover: model m is loading")
    [record] = ledger.records
    assert record.place == "cloud" and record.model == "edge:remote-m" and record.cost == 0.25


async def test_an_engine_failure_fails_over_to_the_cloud():
    models = FakeModels()
    models.model.batcher.error = EngineFailed("the engine broke")
    dataplane, cloud, ledger = plane(models)
    request = tensor_request(Caller(principal(), local_only=False))
    await dataplane.infer(request)
    assert [r.kind for r in cloud.routes] == ["failover"] and request.trace.place == "cloud"
    assert [r.place for r in ledger.records] == ["cloud"]  # the failed local run is not charged


class FullGate:
    """A gate that is always saturated."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def acquire(self, lane: str, budget_s: float, places: int = 1) -> float:
        raise self.error


@pytest.mark.parametrize("error", [Saturated("model m is saturated"), QueueFull("model m's queue is full")])
async def test_a_saturated_model_overflows_to_the_cloud_or_sheds(error):
    models = FakeModels()
    dataplane, cloud, ledger = plane(models)
    assert dataplane.placement is not None
    dataplane.placement.admission.gate = lambda *args: FullGate(error)  # type: ignore[method-assign]
    request = tensor_request(Caller(principal(), local_only=False))
    await dataplane.infer(request)
    assert [r.kind for r in cloud.routes] == ["overflow"] and models.model.batcher.calls == 0
    assert request.trace.route.startswith("overflow: ")
    with pytest.raises(type(error)):
        await dataplane.infer(tensor_request(Caller(principal(cloud=False), local_only=True)))


async def test_a_generation_stream_settles_once_whether_read_to_the_end_or_not():
    settled: list[GenerationStream] = []

    async def chunks():
        yield Chunk(text="a", token_ids=[1])
        yield Chunk(text="b", token_ids=[2], finish_reason="stop")

    stream = GenerationStream("m", chunks(), TokenCount(3, 2), on_close=settled.append)
    texts = [chunk.text async for chunk in stream]
    assert texts == ["a", "b"] and stream.finish_reason == "stop" and settled == [stream]
    await stream.aclose()
    assert settled == [stream]  # once

    early: list[GenerationStream] = []
    left = GenerationStream("m", chunks(), TokenCount(3, 0), on_close=early.append)
    async with left:
        await anext(left)
    assert early == [left] and left.finish_reason is None


async def test_a_failing_stream_settles_before_the_error_reaches_the_reader():
    settled: list[GenerationStream] = []

    async def chunks():
        yield Chunk(text="a")
        raise EngineFailed("the step failed")

    stream = GenerationStream("m", chunks(), TokenCount(), on_close=settled.append)
    assert (await anext(stream)).text == "a"
    with pytest.raises(EngineFailed):
        await anext(stream)
    assert settled == [stream]
    await asyncio.sleep(0)


class CountingModel(FakeTensorModel):
    """Counts the checks of its inputs; refuses them when told to (a version whose inputs changed)."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.checked, self.refuse = 0, refuse

    def check_inputs(self, inputs: Any) -> None:
        self.checked += 1
        if self.refuse:
            raise BadRequest("input 'x' must have 4 columns")


class SwappingGate:
    """Admits at once, but the version serving changes while the request is at the gate (a reload meanwhile)."""

    def __init__(self, models: FakeModels, replacement: Any) -> None:
        self.models, self.replacement, self.released = models, replacement, 0

    async def acquire(self, lane: str, budget_s: float, places: int = 1) -> float:
        self.models.model = self.replacement
        return 0.0

    def places_for(self, places: int) -> int:
        return places

    def release(self, service_s: float | None, places: int = 1) -> None:
        self.released += 1


async def test_after_admission_a_request_is_checked_again_only_against_a_version_swapped_in_meanwhile():
    models = FakeModels(model=CountingModel())
    dataplane, _, ledger = plane(models)
    await dataplane.infer(tensor_request(Caller(principal(), local_only=False)))
    assert models.model.checked == 1  # the same version after the gate: checked once

    first, second = models.model, CountingModel()
    assert dataplane.placement is not None
    gate = SwappingGate(models, second)
    dataplane.placement.admission.gate = lambda *args: gate  # type: ignore[method-assign]
    await dataplane.infer(tensor_request(Caller(principal(), local_only=False)))
    assert (first.checked, second.checked) == (2, 1) and second.batcher.calls == 1 and first.batcher.calls == 1

    refusing = CountingModel(refuse=True)
    gate.replacement = refusing
    models.model = first
    with pytest.raises(BadRequest, match="4 columns"):
        await dataplane.infer(tensor_request(Caller(principal(), local_only=False)))
    assert refusing.batcher.calls == 0 and gate.released == 2  # refused after the gate: its place is given back
    assert len(ledger.records) == 2

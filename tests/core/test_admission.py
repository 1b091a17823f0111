"""Admission gates: the wait estimate, shedding over a lane's maximum, a bounded queue, and batch yielding to
interactive work."""

from __future__ import annotations

import asyncio

import pytest

from appliance.admission import LaneGate
from appliance.errors import Saturated
from appliance.errors import QueueFull


def gate(capacity: int = 2, limit: int = 2, max_waiting: int = 8, service_s: float = 0.1) -> LaneGate:
    return LaneGate("m", capacity, limit, max_waiting, service_s)


async def test_free_capacity_admits_at_once_and_the_estimate_grows_with_the_queue():
    g = gate()
    assert g.estimate_wait("interactive") == 0
    assert await g.acquire("interactive", 1.0) == 0
    assert await g.acquire("interactive", 1.0) == 0
    # Full: one more would wait for one of two slots of 0.1 s.
    assert g.estimate_wait("interactive") == pytest.approx(0.05)


async def test_a_wait_over_the_lanes_maximum_is_shed_with_the_estimate_as_retry_after():
    g = gate(capacity=1, limit=1, service_s=2.0)
    await g.acquire("interactive", 1.0)
    with pytest.raises(Saturated) as caught:
        await g.acquire("interactive", 1.0)
    assert caught.value.status == 429 and caught.value.retry_after_s == pytest.approx(2.0)
    assert "interactive lane" in caught.value.message and g.waiting == 0


async def test_the_queue_is_bounded():
    g = gate(capacity=1, limit=1, max_waiting=2, service_s=0.001)
    await g.acquire("interactive", 10)
    waiters = [asyncio.ensure_future(g.acquire("interactive", 10)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await g.acquire("interactive", 10)
    for _ in range(3):
        g.release(0.001)
    await asyncio.gather(*waiters)


async def test_batch_work_yields_to_interactive_work():
    g = gate(capacity=1, limit=1, service_s=0.001)
    await g.acquire("interactive", 10)
    order: list[str] = []

    async def enter(lane: str) -> None:
        await g.acquire(lane, 10)
        order.append(lane)

    batch = [asyncio.ensure_future(enter("batch")) for _ in range(2)]
    await asyncio.sleep(0)
    interactive = [asyncio.ensure_future(enter("interactive")) for _ in range(2)]
    await asyncio.sleep(0)
    for _ in range(4):
        g.release(0.001)
        await asyncio.sleep(0)
    await asyncio.gather(*batch, *interactive)
    assert order == ["interactive", "interactive", "batch", "batch"]


async def test_a_waiter_that_times_out_leaves_no_trace():
    g = gate(capacity=1, limit=1, service_s=0.01)
    await g.acquire("interactive", 10)
    with pytest.raises(Saturated):
        await g.acquire("batch", 0.05)
    assert g.waiting == 0 and g.active == 1
    g.release(0.01)
    assert g.active == 0


async def test_service_time_follows_measurements():
    g = gate(service_s=1.0)
    for _ in range(30):
        await g.acquire("interactive", 10)
        g.release(0.1)
    assert g.service_s == pytest.approx(0.1, rel=0.05)


async def test_a_free_place_admits_even_when_the_budget_is_spent():
    g = gate()
    assert await g.acquire("interactive", -0.5) == 0  # a slow upload used the budget, but nothing is queued


async def test_cancelling_a_waiter_cancels_it_and_frees_its_place():
    g = gate(capacity=1, limit=1, service_s=0.01)
    await g.acquire("interactive", 10)
    waiter = asyncio.ensure_future(g.acquire("interactive", 10))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert g.waiting == 0 and g.active == 1

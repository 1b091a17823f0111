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


# -- requests that run several sequences or rows take that many places --------------------------------------------

async def test_a_request_takes_a_place_per_sequence_up_to_the_limit():
    g = gate(capacity=4, limit=4)
    assert await g.acquire("interactive", 1.0, places=3) == 0 and g.active == 3
    assert g.places_for(3) == 3 and g.places_for(0) == 1 and g.places_for(40) == 4
    # One place is left: a second three-place request would wait for three of four slots of 0.1 s.
    assert g.estimate_wait("interactive", 3) == pytest.approx(2 * 0.1 / 4)
    assert await g.acquire("interactive", 1.0) == 0 and g.active == 4
    g.release(0.1, 3)
    g.release(0.1)
    assert g.active == 0
    assert await g.acquire("interactive", 1.0, places=40) == 0 and g.active == 4  # larger than the gate: all of it


async def test_a_large_request_at_the_head_is_not_overtaken_and_counts_in_the_estimate():
    g = gate(capacity=4, limit=4, service_s=0.001)
    await g.acquire("interactive", 10, places=2)
    order: list[str] = []

    async def enter(name: str, places: int) -> None:
        await g.acquire("interactive", 10, places)
        order.append(name)

    large = asyncio.ensure_future(enter("large", 4))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(enter("small", 1))  # two places are free, but the large one came first
    await asyncio.sleep(0)
    assert order == [] and g.waiting == 2 and g.active == 2
    assert g.estimate_wait("interactive") == pytest.approx((2 + 5 + 1 - 4) * 0.001 / 4)  # the places ahead count
    g.release(0.001, 2)
    assert g.active == 4 and g.waiting == 1  # the large one is in; the small one still waits behind it
    await asyncio.wait_for(large, 1)
    assert order == ["large"]
    g.release(0.001, 4)
    await asyncio.gather(large, small)
    assert order == ["large", "small"] and g.active == 1


async def test_a_large_waiter_that_gives_up_lets_the_smaller_ones_behind_it_in():
    g = gate(capacity=4, limit=4, service_s=0.001)
    await g.acquire("interactive", 10, places=3)
    large = asyncio.ensure_future(g.acquire("interactive", 10, 4))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(g.acquire("interactive", 10, 1))
    await asyncio.sleep(0)
    assert g.waiting == 2
    large.cancel()
    await asyncio.sleep(0)
    assert await small == pytest.approx(0, abs=0.1) and g.active == 4 and g.waiting == 0

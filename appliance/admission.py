"""Admission control: lanes with a priority and a maximum wait in front of every local model.

Each model version has a gate with ``limit`` places (enough to fill its batches or KV-cache rows); a request takes
as many places as the sequences or rows it runs (a completions request with 4 prompts and ``n = 2`` takes 8, an
embeddings request one per input; at most ``limit``). Requests that do not fit wait in one bounded queue where
``interactive`` requests go before ``batch`` ones, first come first served within a lane (a large request at the
head is not overtaken by smaller ones behind it). The wait a new request would see is estimated from the places
ahead of it and the recent service time (Little's law over the model's parallel capacity). When the estimate is
over the lane's maximum wait, or the queue is full, the request is not queued: the data plane overflows it to the
cloud where policy allows, or answers 429/503 with a ``Retry-After`` taken from the estimate.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from appliance.config import AdmissionConfig
from appliance.errors import QueueFull, Saturated
from appliance.keys import LANES

PRIORITY = {lane: rank for rank, lane in enumerate(LANES)}  # interactive before batch


@dataclass(order=True)
class _Waiter:
    priority: int
    sequence: int
    future: asyncio.Future = field(compare=False)
    places: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class GateState:
    """One gate at one moment: what ``/metrics`` (``appliance_lane_*``) and the status page show of it."""

    model: str
    version: int
    waiting: dict[str, int]  # per lane: requests queued at the gate
    estimated_wait_s: dict[str, float]  # per lane: what a request arriving now would wait
    active: int  # places taken past the gate (sequences or rows running, or queued inside the model)
    limit: int  # the places of the gate
    capacity: int  # the model's parallel capacity (rows of a batch times instances, or KV-cache rows)
    max_waiting: int  # the queue's bound, shared by both lanes
    service_s: float  # the recent service time the estimate uses


class LaneGate:
    """The gate of one model version. Not thread-safe: used on the event loop only."""

    def __init__(self, name: str, capacity: int, limit: int, max_waiting: int, initial_service_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.capacity = max(1, capacity)
        self.limit = max(self.capacity, limit)
        self.max_waiting = max_waiting
        self.service_s = initial_service_s
        self.active = 0
        self._waiters: list[_Waiter] = []
        self._sequence = itertools.count()
        self._clock = clock

    @property
    def waiting(self) -> int:
        """Requests queued at the gate."""
        return len(self._waiters)

    def state(self, version: int) -> GateState:
        """A snapshot of the gate (O(waiting)); ``version`` is the version it stands in front of."""
        waiting = dict.fromkeys(LANES, 0)
        for waiter in self._waiters:
            waiting[LANES[waiter.priority]] += 1
        return GateState(self.name, version, waiting, {lane: self.estimate_wait(lane) for lane in LANES},
                         self.active, self.limit, self.capacity, self.max_waiting, self.service_s)

    def places_for(self, places: int) -> int:
        """The places a request running ``places`` sequences or rows takes: 1 to ``limit``."""
        return min(max(1, places), self.limit)

    def estimate_wait(self, lane: str, places: int = 1) -> float:
        """Seconds a new request of ``lane`` taking ``places`` would wait before the model starts on it."""
        priority = PRIORITY[lane]
        ahead = sum(waiter.places for waiter in self._waiters if waiter.priority <= priority)
        beyond_capacity = self.active + ahead + self.places_for(places) - self.capacity
        return max(0.0, beyond_capacity) * self.service_s / self.capacity

    async def acquire(self, lane: str, max_wait_s: float, places: int = 1) -> float:
        """Enter the gate with ``places`` (:meth:`places_for` them, to give back with :meth:`release`), waiting by
        priority; returns the time waited. Raises :class:`Saturated` or :class:`QueueFull` (without queueing) when
        the wait would be over ``max_wait_s`` or the queue is full."""
        priority = PRIORITY[lane]
        places = self.places_for(places)
        if self.active + places <= self.limit and not any(w.priority <= priority for w in self._waiters):
            self.active += places  # room now: no wait to budget for
            return 0.0
        estimate = self.estimate_wait(lane, places)
        if estimate > max_wait_s:
            raise Saturated(f"model {self.name} is saturated: the estimated wait of {estimate:.2f} s is over the "
                            f"{lane} lane's {max(max_wait_s, 0):.2f} s left; retry later",
                            retry_after_s=max(estimate, 0.001))
        if len(self._waiters) >= self.max_waiting:
            raise QueueFull(f"model {self.name} has {len(self._waiters)} requests waiting, the most admission "
                            "allows; retry later", retry_after_s=max(estimate, 1.0))
        started = self._clock()
        waiter = _Waiter(priority, next(self._sequence), asyncio.get_running_loop().create_future(), places)
        heapq.heappush(self._waiters, waiter)
        # Past the gate a request may still queue behind the rows the limit lets in beyond capacity: leave room.
        inside_s = self.service_s * (self.limit - self.capacity) / self.capacity
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=max(0.0, max_wait_s - inside_s))
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(None, places)  # admitted just as the wait ended: hand the places on
            else:
                waiter.future.cancel()
                self._remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            late = Saturated(f"model {self.name}: waited {max_wait_s:.2f} s, the {lane} lane's maximum, without "
                             "being admitted; retry later", retry_after_s=self.estimate_wait(lane, places))
            late.waited = True
            raise late from None
        return self._clock() - started

    def _remove(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            heapq.heapify(self._waiters)
            self._admit_waiting()  # a large request that left may have held smaller ones back

    def release(self, service_s: float | None, places: int = 1) -> None:
        """Leave the gate, giving back ``places``; ``service_s`` (the time the model spent on the request) updates
        the estimate."""
        self.active -= places
        if service_s is not None and math.isfinite(service_s) and service_s > 0:
            self.service_s += 0.2 * (service_s - self.service_s)
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Let waiters in, in order, while the first fits."""
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled, and its task has not removed it yet
                heapq.heappop(self._waiters)
                continue
            if self.active + waiter.places > self.limit:
                return
            heapq.heappop(self._waiters)
            self.active += waiter.places
            waiter.future.set_result(None)


class Admission:
    """Gates for every local model version, created on first use."""

    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._gates: dict[tuple[str, int], LaneGate] = {}

    def max_wait_s(self, lane: str) -> float:
        """The lane's maximum wait."""
        ms = self.config.interactive_max_wait_ms if lane == "interactive" else self.config.batch_max_wait_ms
        return ms / 1000.0

    def gate(self, name: str, version: int, capacity: int, limit: int, initial_service_s: float) -> LaneGate:
        """The gate of a model version."""
        key = (name, version)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = LaneGate(name, capacity, limit, self.config.max_waiting, initial_service_s,
                                               self._clock)
        return gate

    def states(self, keep: Container[tuple[str, int]] | None = None) -> list[GateState]:
        """Snapshots of the gates, by model and version: all of them, or those of the ``(name, version)`` pairs in
        ``keep`` plus any other gate still holding requests (a retired version finishing its queue)."""
        return [gate.state(version) for (name, version), gate in sorted(self._gates.items())
                if keep is None or (name, version) in keep or gate.active or gate.waiting]

"""Dynamic batching for tensor models, with Triton's meanings of its settings.

``max_batch_size`` > 0: the first dimension of every input and output is the batch; requests whose other
dimensions match are concatenated, up to ``max_batch_size`` rows. A batch is sent as soon as it is full or reaches
the largest ``preferred_batch_size``; otherwise the batcher waits up to ``max_queue_delay`` (counted from the oldest
queued request) for more, then sends the largest preferred size it can form, or everything that fits.
``max_batch_size`` = 0: requests run one at a time, unchanged.

Each engine instance has one worker thread; the event loop only moves requests between the queue and the threads.
One future per request: a request that expires, is cancelled, or whose slice fails never affects the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from appliance.engines.base import Engine
from appliance.engines.worker_threads import EngineThreads
from appliance.errors import DeadlineExceeded, EngineFailed, ModelNotReady, QueueFull

log = logging.getLogger("appliance.engines.batcher")


@dataclass(slots=True)
class BatchResult:
    """What one request gets back: its outputs and how long it waited and ran."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(slots=True)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    signature: tuple
    future: asyncio.Future
    enqueued: float
    deadline: float | None


BatchObserver = Callable[[int, float], None]  # (rows in the batch, compute seconds)


class DynamicBatcher:
    """Queues requests for one model version and runs them, batched, on its engine instances.

    Each engine instance has a thread that forms its own batches from the shared queue: under load a thread that
    finishes a batch takes the next one at once, without waiting to be woken. The event loop only appends to the
    queue and resolves futures, one callback per batch.
    """

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        on_batch: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "model",
    ) -> None:
        self._threads = EngineThreads(engines, name)
        self.max_batch_size = max_batch_size
        self._delay = max_queue_delay_s
        self._preferred = sorted(set(preferred_batch_sizes))
        self._max_queue = max_queue_size
        self._on_batch = on_batch
        self._clock = clock
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._lock = self._threads.lock
        self._running = 0  # batches being executed
        self._closing = False
        self._service_s = 0.0  # moving average of one batch's wall time
        self._batch_rows = 1.0  # moving average of rows per batch

    # -- the event-loop side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per engine instance; call on the event loop that will submit."""
        self._threads.start(self._serve)

    @property
    def queue_depth(self) -> int:
        """Requests waiting (some may have expired and not yet been swept)."""
        return len(self._queue)

    def estimated_wait_s(self) -> float:
        """How long a request queued now would wait, from queue depth and recent service times."""
        batches_ahead = math.ceil(len(self._queue) / max(self._batch_rows, 1.0)) + min(self._running, 1)
        return batches_ahead * self._service_s / len(self._threads.engines)

    def submit(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> asyncio.Future:
        """Queue a validated request; the future resolves to a :class:`BatchResult` or an ``ApplianceError``.

        Raises :class:`QueueFull` when the queue is at its bound, :class:`ModelNotReady` once closing.
        ``deadline`` is on this batcher's clock (``time.monotonic`` by default).
        """
        loop = self._threads.loop
        if self._closing or loop is None:
            raise ModelNotReady(f"model {self._name} is unloading; retry to reach the version now serving")
        if len(self._queue) >= self._max_queue:
            wait = max(self.estimated_wait_s(), 0.001)
            raise QueueFull(
                f"model {self._name} has {len(self._queue)} requests queued (the limit); retry after about "
                f"{wait:.3f} s",
                retry_after_s=wait,
            )
        if self.max_batch_size > 0:
            rows = next(iter(inputs.values())).shape[0]
            signature = tuple((name, array.shape[1:]) for name, array in inputs.items())
        else:
            rows, signature = 1, ()
        now = self._clock()
        pending = _Pending(inputs, rows, signature, loop.create_future(), now, deadline)
        with self._lock:
            self._queue.append(pending)
            wake = self._threads.anyone_waiting
        if wake:
            self._threads.wake()
        if deadline is not None:
            loop.call_later(max(deadline - now, 0.0), self._expire, pending)
        return pending.future

    def _expire(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        with self._lock:
            try:
                self._queue.remove(pending)
            except ValueError:
                return  # already taken into a batch: it runs to completion
        waited = self._clock() - pending.enqueued
        pending.future.set_exception(
            DeadlineExceeded(f"request timed out after {waited * 1000:.1f} ms in the queue of model {self._name}")
        )

    async def prepared(self) -> None:
        """Wait until every engine thread has prepared its engine (captured its CUDA graphs)."""
        await self._threads.prepared()

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, let queued and running ones finish (up to ``timeout_s``), stop the threads."""
        with self._lock:
            self._closing = True
        self._threads.wake_all()
        if not await self._threads.stopped(timeout_s):
            log.warning("model %s: drain timed out with %d queued", self._name, len(self._queue))
        with self._lock:
            left, self._queue = list(self._queue), deque()
        for item in left:
            if not item.future.done():
                item.future.set_exception(ModelNotReady(f"model {self._name} was unloaded before this ran"))

    def _complete(self, batch: list[_Pending], results: list[object], started: float, compute_s: float) -> None:
        rows = sum(p.rows for p in batch)
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(BatchResult(result, started - pending.enqueued, compute_s, rows))
        if self._on_batch is not None:
            self._on_batch(rows, compute_s)

    # -- the worker-thread side ----------------------------------------------------------------------------------

    def _serve(self, engine: Engine) -> None:
        loop = self._threads.loop
        assert loop is not None
        while (batch := self._next_batch()) is not None:
            started = self._clock()
            results, compute_s = self._execute(engine, batch)
            wall = self._clock() - started
            rows = sum(p.rows for p in batch)
            with self._lock:
                self._running -= 1
                self._service_s = 0.8 * self._service_s + 0.2 * wall if self._service_s else wall
                self._batch_rows = 0.8 * self._batch_rows + 0.2 * rows
            loop.call_soon_threadsafe(self._complete, batch, results, started, compute_s)

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is due and take it; ``None`` once closing and the queue is empty."""
        with self._lock:
            while True:
                while self._queue and self._queue[0].future.done():
                    self._queue.popleft()
                if not self._queue:
                    if self._closing:
                        return None
                    self._threads.sleep(None)
                    continue
                batch, wait_s = self._due_batch()
                if batch is not None:
                    self._running += 1
                    return batch
                self._threads.sleep(wait_s)

    def _due_batch(self) -> tuple[list[_Pending] | None, float]:
        """The batch to run now, or ``None`` and how long until the oldest request's delay runs out."""
        if self.max_batch_size == 0:
            return [self._queue.popleft()], 0.0
        batch, rows, blocked = self._candidate()
        chosen = self._preferred_prefix(batch)
        now = self._clock()
        due = self._queue[0].enqueued + self._delay
        if rows >= self.max_batch_size or blocked or self._closing or now >= due:
            return self._take(chosen or batch), 0.0
        if chosen and sum(p.rows for p in chosen) == self._preferred[-1]:
            return self._take(chosen), 0.0
        return None, due - now

    def _candidate(self) -> tuple[list[_Pending], int, bool]:
        """The requests that can join the oldest one's batch, their rows, and whether one more could not fit."""
        head = self._queue[0]
        batch, rows = [], 0
        for pending in self._queue:
            if pending.future.done() or pending.signature != head.signature:
                continue
            if rows + pending.rows > self.max_batch_size:
                return batch, rows, True
            batch.append(pending)
            rows += pending.rows
        return batch, rows, False

    def _preferred_prefix(self, batch: list[_Pending]) -> list[_Pending]:
        if not self._preferred:
            return []
        best, rows = [], 0
        for index, pending in enumerate(batch):
            rows += pending.rows
            if rows in self._preferred:
                best = batch[: index + 1]
        return best

    def _take(self, batch: list[_Pending]) -> list[_Pending]:
        if len(batch) == len(self._queue):
            self._queue.clear()
        else:
            taken = {id(p) for p in batch}
            self._queue = deque(p for p in self._queue if id(p) not in taken)
        if self._queue and self._threads.anyone_waiting:
            self._threads.wake()  # another idle instance may start on the rest
        return batch

    def _execute(self, engine: Engine, batch: list[_Pending]) -> tuple[list[object], float]:
        started = time.perf_counter()
        if len(batch) == 1:
            results = [self._run_one(engine, batch[0])]
            return results, time.perf_counter() - started
        names = list(batch[0].inputs)
        merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in names}
        try:
            outputs = engine.run(merged)
            results = self._split(outputs, batch)
        except Exception:
            # Isolate the failure: run each request alone so that only the faulty one fails.
            log.warning("batch of %d failed on model %s; retrying its requests one by one", len(batch), self._name)
            results = [self._run_one(engine, p) for p in batch]
        return results, time.perf_counter() - started

    def _run_one(self, engine: Engine, pending: _Pending) -> object:
        try:
            return engine.run(pending.inputs)
        except Exception as exc:  # an engine error belongs to this request alone
            log.warning("model %s failed a request: %s", self._name, exc)
            return EngineFailed(f"model {self._name} failed to run this request: {exc}")

    def _split(self, outputs: dict[str, np.ndarray], batch: list[_Pending]) -> list[object]:
        total = sum(p.rows for p in batch)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise ValueError(f"output {name} has shape {array.shape}, not {total} rows")
        results, offset = [], 0
        for pending in batch:
            end = offset + pending.rows
            results.append({name: array[offset:end] for name, array in outputs.items()})
            offset = end
        return results

"""Token-budget batching for encoder models (embeddings).

Each request carries one or more token sequences ("items"). Items from all requests share one queue; each engine
instance's thread forms its own batches from it:

* a batch starts from the oldest waiting item and adds the queued items closest to it in length, so that padding
  stays small;
* it closes when the next item would push the padded size (rows x longest row) over ``max_batch_tokens``, when it
  holds ``max_batch_size`` items, or when the oldest item has waited ``max_wait_s``;
* a request with many items may be split over several batches; its answer is assembled in input order;
* an item of a *reproducible* request runs as a batch of its own: an encoder row's output depends on the other
  rows of its call (padding, and the batch size even at equal lengths: measured by ``bench/invariance.py``), so
  only a call of one row gives the vector the input gets alone.

A batch that fails is re-run item by item, so an input that breaks the engine fails only its own request. A
request that is cancelled, fails or passes its deadline has its remaining items dropped from the queue. The queue
is bounded in items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from appliance.engines.base import Engine
from appliance.engines.buckets import Buckets
from appliance.engines.worker_threads import EngineThreads
from appliance.errors import DeadlineExceeded, EngineFailed, ModelNotReady, PayloadTooLarge, QueueFull

log = logging.getLogger("appliance.engines.token_batcher")


@dataclass(slots=True)
class EmbedResult:
    """One request's answer: a row per input, in input order, and how long it waited and ran."""

    embeddings: np.ndarray
    queue_s: float
    compute_s: float
    batches: int


@dataclass(eq=False)
class _Request:
    future: asyncio.Future
    rows: list[np.ndarray | None]
    enqueued: float
    deadline: float | None
    remaining: int
    first_started: float = 0.0
    compute_s: float = 0.0
    batches: int = 0
    failed: bool = False
    reproducible: bool = False


@dataclass(slots=True, eq=False)
class _Item:
    request: _Request
    index: int
    tokens: Sequence[int]
    enqueued: float
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = len(self.tokens)


BatchObserver = Callable[[int, int, float], None]  # (items, padded tokens, compute seconds)


class TokenBudgetBatcher:
    """Queues tokenized inputs for one encoder model version and runs them in length-grouped batches."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        output: str,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_items: int,
        pad_id: int = 0,
        sequence_buckets: Buckets = Buckets(()),
        on_batch: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "model",
    ) -> None:
        """``sequence_buckets``: a batch's rows are padded up to the next bucket length (fixed shapes for bound
        buffers and CUDA graphs); none: to the batch's longest row."""
        self._threads = EngineThreads(engines, name)
        self._sequence_buckets = sequence_buckets
        self._output = output
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._max_wait = max_wait_s
        self._max_queue = max_queue_items
        self._pad_id = pad_id
        self._on_batch = on_batch
        self._clock = clock
        self._name = name
        self._items: list[_Item] = []
        self._lock = self._threads.lock
        self._running = 0
        self._closing = False
        self._service_per_token_s = 0.0

    # -- the event-loop side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per engine instance; call on the event loop that will submit."""
        self._threads.start(self._serve)

    @property
    def queue_depth(self) -> int:
        """Items waiting."""
        return len(self._items)

    def estimated_wait_s(self) -> float:
        """Time to work through the queued tokens at the recent rate."""
        tokens = sum(item.length for item in self._items)
        return tokens * self._service_per_token_s / len(self._threads.engines)

    def submit(self, sequences: Sequence[Sequence[int]], deadline: float | None = None, *,
               reproducible: bool = False) -> asyncio.Future:
        """Queue one request's token sequences; the future resolves to an :class:`EmbedResult`.

        ``reproducible``: each sequence runs alone, so its vector is the one it gets whatever else is queued.

        Raises :class:`PayloadTooLarge` when they could never fit in the queue, :class:`QueueFull` when they do not
        fit now, :class:`ModelNotReady` once closing.
        """
        loop = self._threads.loop
        if self._closing or loop is None:
            raise ModelNotReady(f"model {self._name} is unloading; retry to reach the version now serving")
        if not sequences:
            raise ValueError("a request needs at least one input")
        if len(sequences) > self._max_queue:  # not even an empty queue holds it: retrying cannot help
            raise PayloadTooLarge(f"the request has {len(sequences)} inputs; model {self._name} queues at most "
                                  f"{self._max_queue} ([batching] max_queue_size); send fewer per request")
        if len(self._items) + len(sequences) > self._max_queue:
            wait = max(self.estimated_wait_s(), 0.001)
            raise QueueFull(
                f"model {self._name} has {len(self._items)} inputs queued and the limit is {self._max_queue}; "
                f"retry after about {wait:.3f} s",
                retry_after_s=wait,
            )
        now = self._clock()
        request = _Request(loop.create_future(), [None] * len(sequences), now, deadline, len(sequences),
                           reproducible=reproducible)
        items = [_Item(request, index, tokens, now) for index, tokens in enumerate(sequences)]
        request.future.add_done_callback(self._on_done)
        with self._lock:
            self._items.extend(items)
            wake = self._threads.anyone_waiting
        if wake:
            self._threads.wake()
        if deadline is not None:
            loop.call_later(max(deadline - now, 0.0), self._expire, request)
        return request.future

    def _on_done(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self._drop(future)

    def _drop(self, future: asyncio.Future) -> None:
        with self._lock:
            self._items = [item for item in self._items if item.request.future is not future]

    def _expire(self, request: _Request) -> None:
        if request.future.done():
            return
        waited = self._clock() - request.enqueued
        request.failed = True
        request.future.set_exception(DeadlineExceeded(
            f"request timed out after {waited * 1000:.1f} ms with {request.remaining} of {len(request.rows)} "
            f"inputs not yet embedded by model {self._name}"))

    async def prepared(self) -> None:
        """Wait until every engine thread has prepared its engine (captured its CUDA graphs)."""
        await self._threads.prepared()

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, finish the queued ones (up to ``timeout_s``), stop the threads."""
        with self._lock:
            self._closing = True
        self._threads.wake_all()
        if not await self._threads.stopped(timeout_s):
            log.warning("model %s: drain timed out with %d inputs queued", self._name, len(self._items))
        with self._lock:
            left, self._items = self._items, []
        for item in left:
            if not item.request.future.done():
                item.request.future.set_exception(ModelNotReady(f"model {self._name} was unloaded before this ran"))

    def _complete(self, batch: list[_Item], results: list[object], started: float, compute_s: float) -> None:
        touched: dict[int, _Request] = {}
        for item, result in zip(batch, results):
            request = item.request
            if request.future.done():
                continue
            if isinstance(result, Exception):
                request.failed = True
                request.future.set_exception(result)
                continue
            request.rows[item.index] = result
            request.remaining -= 1
            if id(request) not in touched:
                touched[id(request)] = request
                request.batches += 1
                request.compute_s += compute_s
                if not request.first_started:
                    request.first_started = started
        for request in touched.values():
            if request.remaining == 0 and not request.future.done():
                rows = request.rows
                vectors = rows[0][None] if len(rows) == 1 else np.stack(rows)  # type: ignore[index]
                request.future.set_result(EmbedResult(
                    vectors, request.first_started - request.enqueued, request.compute_s,
                    request.batches))

    # -- the worker-thread side ----------------------------------------------------------------------------------

    def _serve(self, engine: Engine) -> None:
        loop = self._threads.loop
        assert loop is not None
        while (batch := self._next_batch()) is not None:
            started = self._clock()
            results, compute_s, padded = self._execute(engine, batch)
            with self._lock:
                self._running -= 1
                rate = compute_s / max(padded, 1)
                self._service_per_token_s = (0.8 * self._service_per_token_s + 0.2 * rate
                                             if self._service_per_token_s else rate)
            loop.call_soon_threadsafe(self._complete, batch, results, started, compute_s)
            if self._on_batch is not None:
                loop.call_soon_threadsafe(self._on_batch, len(batch), padded, compute_s)

    def _next_batch(self) -> list[_Item] | None:
        with self._lock:
            while True:
                self._items = [item for item in self._items if not item.request.future.done()]
                if not self._items:
                    if self._closing:
                        return None
                    self._threads.sleep(None)
                    continue
                batch, full = self._choose()
                due = self._items[0].enqueued + self._max_wait
                now = self._clock()
                if full or self._closing or now >= due:
                    chosen = {id(item) for item in batch}
                    self._items = [item for item in self._items if id(item) not in chosen]
                    self._running += 1
                    if self._items and self._threads.anyone_waiting:
                        self._threads.wake()  # an idle instance may take the rest
                    return batch
                self._threads.sleep(due - now)

    def _choose(self) -> tuple[list[_Item], bool]:
        """The oldest item and its nearest neighbours in length, within the budgets; and whether it is full."""
        head = self._items[0]
        if head.request.reproducible:
            return [head], True
        others = sorted((item for item in self._items[1:] if not item.request.reproducible),
                        key=lambda item: (abs(item.length - head.length), item.enqueued))
        batch, longest = [head], head.length
        for item in others:
            if len(batch) >= self.max_batch_size:
                return batch, True
            width = max(longest, item.length)
            if width * (len(batch) + 1) > self.max_batch_tokens:
                return batch, True
            batch.append(item)
            longest = width
        return batch, len(batch) >= self.max_batch_size

    def _execute(self, engine: Engine, batch: list[_Item]) -> tuple[list[object], float, int]:
        started = time.perf_counter()
        width = max(item.length for item in batch)
        try:
            rows = self._run(engine, batch, width)
            results: list[object] = list(rows)
        except Exception:
            log.warning("batch of %d failed on model %s; retrying its inputs one by one", len(batch), self._name)
            results = []
            for item in batch:
                try:
                    results.append(self._run(engine, [item], item.length)[0])
                except Exception as exc:  # belongs to this input's request alone
                    results.append(EngineFailed(
                        f"model {self._name} failed on input {item.index} of this request: {exc}"))
        return results, time.perf_counter() - started, width * len(batch)

    def _run(self, engine: Engine, batch: list[_Item], width: int) -> np.ndarray:
        width = self._sequence_buckets.fit(width) or width
        input_ids = np.full((len(batch), width), self._pad_id, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, item in enumerate(batch):
            input_ids[row, : item.length] = item.tokens
            mask[row, : item.length] = 1
        output = engine.run({"input_ids": input_ids, "attention_mask": mask})[self._output]
        if output.shape[0] != len(batch):
            raise ValueError(f"output {self._output} has {output.shape[0]} rows for {len(batch)} inputs")
        return output


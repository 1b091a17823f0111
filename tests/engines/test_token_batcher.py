"""The token-budget scheduler on the real MiniLM engine: budgets, length grouping, splitting and order,
isolation of a failing input, deadlines, the queue bound, and drain."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from waiting import ManualClock
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions
from appliance.engines.token_batcher import TokenBudgetBatcher
from appliance.errors import DeadlineExceeded, EngineFailed, ModelNotReady, PayloadTooLarge, QueueFull

VOCAB = 30522


class RecordingEncoder:
    """The real MiniLM session, recording each batch's shape; a gate holds batches back while a test queues."""

    def __init__(self, model) -> None:
        self.inner = OnnxRuntimeEngine(model, OrtOptions(providers=["cpu"], intra_op_threads=1))
        self.inner.load()
        self.inputs, self.outputs, self.description = self.inner.inputs, self.inner.outputs, "recording"
        self.shapes: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a batch reached run (and waits there while the gate is closed)

    def load(self) -> None:
        pass

    def run(self, inputs):
        self.entered.set()
        self.gate.wait(10)
        self.shapes.append(inputs["input_ids"].shape)
        return self.inner.run(inputs)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def encoder_model(minilm_repo):
    return minilm_repo / "minilm-l6" / "1" / "model.onnx"


@pytest.fixture()
def engine(encoder_model):
    return RecordingEncoder(encoder_model)


def make(engine, **options) -> TokenBudgetBatcher:
    settings = {"output": "sentence_embedding", "max_batch_tokens": 4096, "max_batch_size": 64, "max_wait_s": 0.0,
                "max_queue_items": 1000} | options
    batcher = TokenBudgetBatcher([engine], **settings)
    batcher.start()
    return batcher


def seq(length: int, fill: int = 1000) -> list[int]:
    return [101] + [fill] * (length - 2) + [102]


async def hold(engine, batcher) -> asyncio.Future:
    """Occupy the only instance so that what the test queues next waits together."""
    engine.gate.clear()
    blocker = batcher.submit([seq(4)])
    assert await asyncio.to_thread(engine.entered.wait, 10), "the blocker never reached the engine"
    return blocker


async def test_request_split_over_batches_is_answered_in_order(engine):
    batcher = make(engine, max_batch_size=4)
    blocker = await hold(engine, batcher)
    sequences = [seq(4 + i, fill=1000 + i) for i in range(10)]
    future = batcher.submit(sequences)
    engine.gate.set()
    await blocker
    result = await future
    assert result.batches == 3 and [s[0] for s in engine.shapes[1:]] == [4, 4, 2]
    for index, sequence in enumerate(sequences):  # each row is the embedding of its own input
        alone = engine.inner.run({"input_ids": np.array([sequence]), "attention_mask": np.ones((1, len(sequence)),
                                                                                               np.int64)})
        np.testing.assert_allclose(result.embeddings[index], alone["sentence_embedding"][0], atol=1e-5)
    await batcher.close()


async def test_token_budget_and_length_grouping(engine):
    batcher = make(engine, max_batch_tokens=200)
    blocker = await hold(engine, batcher)
    lengths = [10, 100, 12, 95, 11, 98]
    futures = [batcher.submit([seq(n)]) for n in lengths]
    engine.gate.set()
    await blocker
    await asyncio.gather(*futures)
    shapes = engine.shapes[1:]
    assert all(rows * width <= 200 for rows, width in shapes)
    # Short inputs went together, long ones together: no batch mixes a 10-token and a 100-token input.
    assert sorted(shapes) == [(1, 95), (2, 100), (3, 12)]


async def test_failing_input_fails_only_its_request(engine):
    batcher = make(engine)
    blocker = await hold(engine, batcher)
    good = batcher.submit([seq(6), seq(7)])
    bad = batcher.submit([seq(6), [101, VOCAB + 5, 102]])  # out of the vocabulary: the engine raises
    also_good = batcher.submit([seq(8)])
    engine.gate.set()
    await blocker
    results = await asyncio.gather(good, bad, also_good, return_exceptions=True)
    assert isinstance(results[1], EngineFailed) and "input 1" in str(results[1])
    assert results[0].embeddings.shape == (2, 384) and results[2].embeddings.shape == (1, 384)
    await batcher.close()


async def test_deadline_expires_queued_inputs_which_never_run(engine):
    batcher = make(engine)
    blocker = await hold(engine, batcher)
    doomed = batcher.submit([seq(33)] * 3, deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded, match="3 of 3 inputs"):
        await asyncio.wait_for(doomed, 2)
    survivor = batcher.submit([seq(5)])
    engine.gate.set()
    await asyncio.gather(blocker, survivor)
    assert all(width != 33 for _, width in engine.shapes)
    await batcher.close()


async def test_cancelled_request_leaves_the_queue(engine):
    batcher = make(engine)
    blocker = await hold(engine, batcher)
    gone = batcher.submit([seq(21)] * 5)
    gone.cancel()
    await asyncio.sleep(0)
    assert batcher.queue_depth == 0
    engine.gate.set()
    await blocker
    await batcher.close()


async def test_queue_bound_is_in_inputs(engine):
    batcher = make(engine, max_queue_items=4)
    blocker = await hold(engine, batcher)
    first = batcher.submit([seq(5)] * 3)
    with pytest.raises(QueueFull) as error:
        batcher.submit([seq(5)] * 2)
    assert error.value.retry_after_s > 0 and "limit is 4" in error.value.message
    with pytest.raises(PayloadTooLarge) as never:  # more than even an empty queue holds: not retryable
        batcher.submit([seq(5)] * 5)
    assert never.value.retry_after_s is None and "queues at most 4" in never.value.message
    engine.gate.set()
    await asyncio.gather(blocker, first)
    await batcher.close()


async def test_wait_collects_a_fuller_batch(engine):
    clock = ManualClock()
    batcher = make(engine, max_wait_s=0.1, clock=clock)
    first = batcher.submit([seq(8)])
    await clock.read_by_worker()  # the worker has seen the lone input and chosen to wait for company
    second = batcher.submit([seq(9)])
    clock.advance(0.1)
    results = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert engine.shapes == [(2, 9)]
    assert results[0].queue_s == pytest.approx(0.1)  # it went only once its wait was over
    await batcher.close()


async def test_close_finishes_queued_work_then_refuses(engine):
    batcher = make(engine, max_batch_size=2)
    engine.gate.clear()
    futures = [batcher.submit([seq(5)]) for _ in range(5)]
    closing = asyncio.ensure_future(batcher.close(timeout_s=10))
    await asyncio.sleep(0)  # one turn of the loop: close() has begun, and waits for the queued work
    with pytest.raises(ModelNotReady):
        batcher.submit([seq(5)])
    engine.gate.set()
    await closing
    assert all(f.done() and not f.exception() for f in futures)


async def test_reproducible_inputs_run_as_batches_of_one_and_get_their_lone_vectors(engine):
    batcher = make(engine, max_wait_s=0.05)
    try:
        alone = (await batcher.submit([[101, 2023, 2003, 102]], reproducible=True)).embeddings[0]
        engine.shapes.clear()
        engine.entered.clear()
        engine.gate.clear()
        first = batcher.submit([[101, 7592, 102]])  # holds the engine while the rest queue up together
        await asyncio.to_thread(engine.entered.wait, 10)
        others = batcher.submit([[101, 2023, 2003, 102], [101, 1037, 2936, 6251, 2182, 102]])
        mine = batcher.submit([[101, 2023, 2003, 102], [101, 7592, 102]], reproducible=True)
        engine.gate.set()
        await first
        await others
        result = await mine
    finally:
        await batcher.close()
    assert np.array_equal(result.embeddings[0], alone)
    assert sorted(engine.shapes) == sorted([(1, 3), (2, 6), (1, 4), (1, 3)])  # the others share a padded call

"""The dynamic batcher on a real ONNX Runtime engine: batch formation, isolation, bounds, deadlines, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from waiting import ManualClock
from appliance.engines.batcher import DynamicBatcher
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions
from appliance.errors import DeadlineExceeded, EngineFailed, ModelNotReady, QueueFull


class RecordingEngine:
    """A real ORT engine that records the batch sizes it runs, can be held, and fails rows holding NaN.

    With ``gate`` cleared, a batch that reaches ``run`` sets ``entered`` and waits there until the gate opens.
    """

    def __init__(self, model: Path) -> None:
        self.inner = OnnxRuntimeEngine(model, OrtOptions(providers=["cpu"], intra_op_threads=1))
        self.inner.load()
        self.inputs, self.outputs, self.description = self.inner.inputs, self.inner.outputs, "recording"
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def load(self) -> None:
        pass

    def run(self, inputs):
        self.entered.set()
        self.gate.wait(10)
        array = inputs["INPUT0"]
        self.batches.append(array.shape[0])
        if np.isnan(array).any():
            raise ValueError("NaN in input")
        return self.inner.run(inputs)

    async def held(self) -> None:
        """Wait until a batch is inside ``run``, held at the gate: what is submitted next queues behind it."""
        assert await asyncio.to_thread(self.entered.wait, 10), "no batch reached the engine"

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def add_one_model(tmp_path_factory) -> Path:
    return tiny_models.add_constant(tmp_path_factory.mktemp("batcher") / "add_one.onnx")


@pytest.fixture()
def engine(add_one_model) -> RecordingEngine:
    return RecordingEngine(add_one_model)


def rows(n: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"INPUT0": np.full((n, 4), value, np.float32)}


async def test_requests_queued_while_busy_form_one_batch(engine):
    batcher = DynamicBatcher([engine], max_batch_size=8)
    batcher.start()
    engine.gate.clear()
    first = batcher.submit(rows(1, 0))
    await engine.held()
    rest = [batcher.submit(rows(1, i)) for i in range(1, 6)]
    engine.gate.set()
    results = await asyncio.gather(first, *rest)
    assert engine.batches == [1, 5]
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["OUTPUT0"], np.full((1, 4), index + 1, np.float32))
    assert results[1].batch_size == 5
    await batcher.close()


async def test_max_batch_size_splits_and_keeps_order(engine):
    batcher = DynamicBatcher([engine], max_batch_size=4)
    batcher.start()
    engine.gate.clear()
    blocker = batcher.submit(rows(1, 100))
    await engine.held()
    futures = [batcher.submit(rows(3, i)) for i in range(3)]  # 3 + 3 does not fit in 4
    engine.gate.set()
    await blocker
    results = await asyncio.gather(*futures)
    assert engine.batches == [1, 3, 3, 3]
    for index, result in enumerate(results):
        assert result.outputs["OUTPUT0"].shape == (3, 4)
        assert float(result.outputs["OUTPUT0"][0, 0]) == index + 1
    await batcher.close()


async def test_delay_waits_for_preferred_batch_size(engine):
    clock = ManualClock()
    batcher = DynamicBatcher([engine], max_batch_size=16, max_queue_delay_s=2.0, preferred_batch_sizes=[4],
                             clock=clock)
    batcher.start()
    futures = [batcher.submit(rows(1))]
    await clock.read_by_worker()  # the worker has seen the lone request and chosen to wait for company
    futures += [batcher.submit(rows(1)) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)
    # Sent as soon as the preferred size formed: the clock never moved, so the 2 s delay cannot have run out.
    assert engine.batches == [4]
    assert all(result.queue_s == 0 for result in results)
    await batcher.close()


async def test_delay_expiry_sends_partial_batch(engine):
    clock = ManualClock()
    batcher = DynamicBatcher([engine], max_batch_size=16, max_queue_delay_s=0.1, preferred_batch_sizes=[8],
                             clock=clock)
    batcher.start()
    futures = [batcher.submit(rows(1)) for _ in range(3)]
    await clock.read_by_worker()  # the worker holds them, waiting for the preferred 8
    clock.advance(0.1)  # the oldest request's delay runs out
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert engine.batches == [3]
    assert [result.queue_s for result in results] == [pytest.approx(0.1)] * 3  # sent only once the delay ran out
    await batcher.close()


async def test_requests_with_other_shapes_wait_for_their_own_batch(tmp_path):
    model = tiny_models.write_version(tmp_path, "v", 1, "", lambda p: _variable_width_model(p)) / "model.onnx"
    engine = OnnxRuntimeEngine(model, OrtOptions(providers=["cpu"], intra_op_threads=1))
    engine.load()
    batcher = DynamicBatcher([engine], max_batch_size=8, max_queue_delay_s=0.05)
    batcher.start()
    futures = [batcher.submit({"X": np.ones((1, width), np.float32)}) for width in (2, 3, 2, 3)]
    results = await asyncio.gather(*futures)
    assert [r.outputs["Y"].shape for r in results] == [(1, 2), (1, 3), (1, 2), (1, 3)]
    assert [r.batch_size for r in results] == [2, 2, 2, 2]
    await batcher.close()


def _variable_width_model(path: Path) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Neg", ["X"], ["Y"])], "neg",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "width"])],
    )
    return tiny_models._save(graph, path)


async def test_failing_request_does_not_fail_its_batch(engine):
    batcher = DynamicBatcher([engine], max_batch_size=8)
    batcher.start()
    engine.gate.clear()
    blocker = batcher.submit(rows(1))
    await engine.held()
    good_before = batcher.submit(rows(2, 1))
    bad = batcher.submit(rows(1, float("nan")))
    good_after = batcher.submit(rows(1, 5))
    engine.gate.set()
    await blocker
    results = await asyncio.gather(good_before, bad, good_after, return_exceptions=True)
    assert isinstance(results[1], EngineFailed)
    assert "NaN" in str(results[1])
    np.testing.assert_array_equal(results[0].outputs["OUTPUT0"], np.full((2, 4), 2, np.float32))
    np.testing.assert_array_equal(results[2].outputs["OUTPUT0"], np.full((1, 4), 6, np.float32))
    assert engine.batches[:2] == [1, 4]  # the batch of three ran, failed, then each ran alone
    await batcher.close()


async def test_queue_full_raises_with_retry_after(engine):
    batcher = DynamicBatcher([engine], max_batch_size=4, max_queue_size=3)
    batcher.start()
    engine.gate.clear()
    running = batcher.submit(rows(1))
    await engine.held()
    queued = [batcher.submit(rows(1)) for _ in range(3)]
    with pytest.raises(QueueFull) as error:
        batcher.submit(rows(1))
    assert error.value.status == 503 and error.value.retry_after_s > 0
    engine.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.close()


async def test_expired_request_is_answered_and_never_runs(engine):
    batcher = DynamicBatcher([engine], max_batch_size=8)
    batcher.start()
    engine.gate.clear()
    running = batcher.submit(rows(1))
    await engine.held()
    doomed = batcher.submit(rows(7, 3), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded, match="timed out"):
        await asyncio.wait_for(doomed, 2)
    survivor = batcher.submit(rows(1))
    engine.gate.set()
    await asyncio.gather(running, survivor)
    assert 7 not in engine.batches and 8 not in engine.batches
    await batcher.close()


async def test_close_drains_queued_work_then_refuses(engine):
    batcher = DynamicBatcher([engine], max_batch_size=2)
    batcher.start()
    engine.gate.clear()
    futures = [batcher.submit(rows(1)) for _ in range(5)]
    closing = asyncio.ensure_future(batcher.close(timeout_s=10))
    await asyncio.sleep(0)  # one turn of the loop: close() has begun, and waits for the queued work
    with pytest.raises(ModelNotReady):
        batcher.submit(rows(1))
    engine.gate.set()
    await closing
    assert all(f.done() and not f.exception() for f in futures)


async def test_unbatched_model_runs_requests_unchanged(tmp_path):
    model = tiny_models.fixed_matmul(tmp_path / "fixed.onnx")
    engine = OnnxRuntimeEngine(model, OrtOptions(providers=["cpu"], intra_op_threads=1))
    engine.load()
    batcher = DynamicBatcher([engine], max_batch_size=0)
    batcher.start()
    result = await batcher.submit({"X": np.eye(2, dtype=np.float32)})
    np.testing.assert_array_equal(result.outputs["Y"], np.array([[1, 2], [3, 4]], np.float32))
    await batcher.close()

"""Shape buckets, padding and slicing, bound buffers and the CUDA-graph bookkeeping, on real CPU sessions.

The CPU execution provider accepts the ``gpu_graph_id`` run option (and ignores it), so the graph ids the bound
runner asks for, run by run and thread by thread, are checked here on real ONNX Runtime sessions.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import tiny_models
from appliance.engines.buckets import Buckets, batch_buckets, pad_rows, powers_of_two, shape_key
from appliance.engines.graph_book import EAGER, GraphBook
from appliance.engines.io_binding import BoundRunner
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions


def test_default_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert powers_of_two(32) == (1, 2, 4, 8, 16, 32)
    assert powers_of_two(24) == (1, 2, 4, 8, 16, 24)
    assert powers_of_two(256, 16) == (16, 32, 64, 128, 256)
    assert batch_buckets([], 8).sizes == (1, 2, 4, 8)
    assert batch_buckets([8, 3, 3], 8).sizes == (3, 8)
    assert batch_buckets([], 0).sizes == ()  # no batch dimension: nothing to pad


def test_a_size_fits_the_smallest_bucket_that_holds_it():
    buckets = Buckets.of([1, 2, 4, 8])
    assert [buckets.fit(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]
    with pytest.raises(ValueError, match="positive"):
        Buckets.of([0, 4])


def test_padding_appends_zero_rows_and_keeps_the_real_ones():
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = pad_rows(rows, 4)
    assert padded.shape == (4, 2) and np.array_equal(padded[:3], rows) and not padded[3].any()
    assert pad_rows(rows, 3) is rows
    assert shape_key({"b": (4, 2), "a": np.zeros((4, 3))}) == (("a", (4, 3)), ("b", (4, 2)))


def test_the_graph_book_warms_captures_once_then_replays_per_thread():
    book = GraphBook(max_graphs=2, runs_before_capture=2)
    first, second = book.graph_id(("a",)), book.graph_id(("b",))
    assert (first, second) == (1, 2) and book.graph_id(("a",)) == 1
    assert book.graph_id(("c",)) == EAGER and book.graph_id(None) == EAGER  # beyond max_graphs, no bucket
    assert [book.next_run(first, "t1") for _ in range(5)] == ["warm", "warm", "capture", "replay", "replay"]
    assert book.next_run(first, "t2") == "warm"  # another thread has no graph of its own yet
    assert book.captured() == {"t1": {1}} and book.captures_of("t1", 1) == 1
    book.capture_failed(second, "t1")
    assert book.next_run(second, "t1") == "eager" and book.captured() == {"t1": {1}}


class RecordingSession:
    """A real session whose bound and eager runs record the ``gpu_graph_id`` each asked for, and on which
    thread."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.runs: list[tuple[str, str, str]] = []  # (kind, graph id, thread)

    def io_binding(self):
        return self._session.io_binding()

    def run_with_iobinding(self, binding, options=None):
        graph = options.get_run_config_entry("gpu_graph_id") if options is not None else ""
        self.runs.append(("bound", graph, threading.current_thread().name))
        return self._session.run_with_iobinding(binding, options)

    def run(self, names, feeds, options=None):
        graph = options.get_run_config_entry("gpu_graph_id") if options is not None else ""
        self.runs.append(("eager", graph, threading.current_thread().name))
        return self._session.run(names, feeds, options)


@pytest.fixture(scope="module")
def add_one_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.add_constant(tmp_path_factory.mktemp("add-one") / "model.onnx")


def cpu_session(model: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shared", [True, False], ids=["host-buffers", "device-style-copies"])
def test_padded_batches_equal_unpadded_ones_and_share_one_buffer_set_per_bucket(add_one_model, shared):
    runner = BoundRunner(cpu_session(add_one_model), output_names=["OUTPUT0"], buckets=Buckets.of([1, 2, 4, 8]),
                         share_host_memory=shared)
    rng = np.random.default_rng(0)
    for rows in (1, 2, 3, 4, 5, 7, 8, 3, 1):
        batch = rng.standard_normal((rows, 4)).astype(np.float32)
        out = runner.run({"INPUT0": batch})["OUTPUT0"]
        assert out.shape == (rows, 4)
        np.testing.assert_array_equal(out, batch + np.float32(1))
    assert runner.slots == 4 and runner.eager_runs == 0
    out = runner.run({"INPUT0": np.zeros((9, 4), np.float32)})["OUTPUT0"]  # above every bucket: its own shape
    assert out.shape == (9, 4) and runner.eager_runs == 1 and runner.slots == 4


@pytest.mark.parametrize("shared", [True, False], ids=["host-buffers", "device-style-copies"])
def test_an_answer_is_a_copy_not_a_view_of_the_reused_buffers(add_one_model, shared):
    runner = BoundRunner(cpu_session(add_one_model), output_names=["OUTPUT0"], buckets=Buckets.of([4]),
                         share_host_memory=shared)
    first = runner.run({"INPUT0": np.full((3, 4), 5, np.float32)})["OUTPUT0"]
    runner.run({"INPUT0": np.full((3, 4), -5, np.float32)})
    assert (first == 6).all()


def test_graphs_are_captured_once_per_bucket_on_the_preparing_thread_and_eager_elsewhere(add_one_model):
    session = RecordingSession(cpu_session(add_one_model))
    warm = [{"INPUT0": (size, 4)} for size in (1, 2, 4)]
    runner = BoundRunner(session, output_names=["OUTPUT0"], buckets=Buckets.of([1, 2, 4]), cuda_graphs=True,
                         max_graphs=3, warm_shapes=warm, input_dtypes={"INPUT0": np.dtype(np.float32)})
    worker = threading.Thread(target=runner.prepare_thread, name="engine-0")
    worker.start()
    worker.join()
    bound = [(graph, thread) for kind, graph, thread in session.runs if kind == "bound"]
    # Per bucket: ORT's two ordinary runs, the capture, one replay; all on the engine's thread.
    assert bound == [(str(g), "engine-0") for g in (1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)]
    assert runner.graphs.captured() == {"engine-0": {1, 2, 3}}
    assert all(graph == "-1" for kind, graph, _ in session.runs if kind == "eager")  # probes never capture
    session.runs.clear()
    out = runner.run({"INPUT0": np.ones((3, 4), np.float32)})["OUTPUT0"]  # this thread did not capture: eager
    assert session.runs == [("eager", "-1", threading.current_thread().name)] and (out == 2).all()
    session.runs.clear()
    done: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: done.append(runner.run({"INPUT0": np.ones((3, 4), np.float32)})
                                                         ["OUTPUT0"]), name="engine-0")
    worker.start()
    worker.join()
    assert session.runs == [("bound", "3", "engine-0")] and (done[0] == 2).all()  # replay of bucket 4
    assert runner.graphs.captures_of("engine-0", 3) == 1


def test_an_engine_with_io_binding_runs_bound_after_preparing_on_its_thread(add_one_model):
    engine = OnnxRuntimeEngine(add_one_model, OrtOptions(providers=("cpu",), intra_op_threads=1, io_binding=True,
                                                         batch_buckets=Buckets.of([1, 2, 4, 8])))
    engine.load()
    assert engine.bound is not None and "io_binding buckets=1,2,4,8 cuda_graphs=off" in engine.description
    engine.prepare_thread()  # binds one buffer set per bucket (fixed dims past the batch)
    assert engine.bound.slots == 4
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(engine.run({"INPUT0": batch})["OUTPUT0"], batch + 1)
    engine.close()
    assert engine.bound is None

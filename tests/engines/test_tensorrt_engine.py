"""The native TensorRT engine against fake ``tensorrt`` and cudart modules (no GPU here): padding to buckets and
slicing the real rows out, one graph capture per bucket and thread, eager runs outside the buckets, capture
failures falling back to plain enqueues, every buffer freed on close, clear errors for bad plans and failing CUDA
calls, and no GPU import at import time. One ``gpu`` test runs a real plan where TensorRT and a GPU answer.

The fake cudart keeps "device memory" as numpy byte arrays under fake pointers, executes stream work at once
(outside a capture) and records it during a capture; a graph launch re-executes what was recorded, at the
addresses it was recorded with. The fake context computes ``OUTPUT0 = INPUT0 + 1`` from device memory.
"""

from __future__ import annotations

import enum
import logging
import math
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from appliance.engines.base import Engine
from appliance.engines.buckets import Buckets
from appliance.engines.cuda_runtime import CudaError, CudaRuntime, cudart_module
from appliance.engines.graph_book import EAGER
from appliance.engines.tensorrt_engine import TensorRTEngine

PLAN = b"fake-plan"
ADD_ONE = Path(__file__).resolve().parents[2] / "examples/models/add_one/1/model.onnx"
CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated
ERROR_NAMES = {2: "cudaErrorMemoryAllocation", 900: "cudaErrorStreamCaptureUnsupported",
               CAPTURE_INVALIDATED: "cudaErrorStreamCaptureInvalidated", 999: "cudaErrorUnknown"}


class FakeCudart:
    """Shaped like ``cuda.bindings.runtime``: every call returns ``(error, *values)``."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1)

    def __init__(self) -> None:
        self.device: dict[int, np.ndarray] = {}  # fake pointer -> bytes
        self.host: dict[int, np.ndarray] = {}  # real address -> the bytes behind it (pinned buffers are read there)
        self.streams: set[int] = set()
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.execs: dict[int, list[Callable[[], None]]] = {}
        self.fail: dict[str, int] = {}  # call name -> error code it returns from now on
        self.calls: list[str] = []
        self.devices_set: list[tuple[str, int]] = []
        self.last_error = 0
        self.launches = 0
        self.mallocs = 0
        self._next = 0x7F00_0000

    def _handle(self) -> int:
        self._next += 0x1000
        return self._next

    def _enter(self, name: str) -> int:
        self.calls.append(name)
        return self.fail.get(name, 0)

    def live(self) -> dict[str, int]:
        return {"device": len(self.device), "host": len(self.host), "streams": len(self.streams),
                "graphs": len(self.graphs), "execs": len(self.execs)}

    def cudaGetErrorName(self, error: int) -> tuple[int, bytes]:
        return 0, ERROR_NAMES.get(int(error), f"cudaError{int(error)}").encode()

    def cudaGetLastError(self) -> tuple[int]:
        error, self.last_error = self.last_error, 0
        return (error,)

    def cudaSetDevice(self, device: int) -> tuple[int]:
        if code := self._enter("cudaSetDevice"):
            return (code,)
        self.devices_set.append((threading.current_thread().name, device))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        assert flags == self.cudaStreamNonBlocking
        if code := self._enter("cudaStreamCreateWithFlags"):
            return code, 0
        stream = self._handle()
        self.streams.add(stream)
        return 0, stream

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self._enter("cudaStreamDestroy")
        self.streams.remove(stream)
        return (0,)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        if code := self._enter("cudaMalloc"):
            return code, 0
        self.mallocs += 1
        pointer = self._handle()
        self.device[pointer] = np.full(nbytes, 0xAB, np.uint8)
        return 0, pointer

    def cudaFree(self, pointer: int) -> tuple[int]:
        self._enter("cudaFree")
        return (0,) if self.device.pop(pointer, None) is not None else (1,)

    def cudaMallocHost(self, nbytes: int) -> tuple[int, int]:
        if code := self._enter("cudaMallocHost"):
            return code, 0
        memory = np.full(nbytes, 0xAB, np.uint8)  # garbage: the engine has to write the padding rows itself
        self.host[memory.ctypes.data] = memory
        return 0, memory.ctypes.data

    def cudaFreeHost(self, pointer: int) -> tuple[int]:
        self._enter("cudaFreeHost")
        return (0,) if self.host.pop(pointer, None) is not None else (1,)

    def _stream_work(self, stream: int, work: Callable[[], None]) -> None:
        assert stream in self.streams
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: int, stream: int) -> tuple[int]:
        if code := self._enter("cudaMemcpyAsync"):
            return (code,)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            source, target = self.host[src], self.device[dst]  # only ever from pinned buffers
        else:
            source, target = self.device[src], self.host[dst]

        def copy() -> None:
            target[:count] = source[:count]

        self._stream_work(stream, copy)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        if code := self._enter("cudaStreamSynchronize"):
            return (code,)
        return (900,) if stream in self.capturing else (0,)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:
        assert mode == self.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        if code := self._enter("cudaStreamBeginCapture"):
            return (code,)
        self.capturing[stream] = []
        return (0,)

    def cudaStreamIsCapturing(self, stream: int) -> tuple[int, int]:
        return 0, int(stream in self.capturing)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, int]:
        self._enter("cudaStreamEndCapture")
        work = self.capturing.pop(stream)
        if self.last_error == CAPTURE_INVALIDATED:
            return CAPTURE_INVALIDATED, 0
        graph = self._handle()
        self.graphs[graph] = work
        return 0, graph

    def cudaGraphInstantiate(self, graph: int, flags: int) -> tuple[int, int]:
        assert flags == 0
        if code := self._enter("cudaGraphInstantiate"):
            self.last_error = code
            return code, 0
        graph_exec = self._handle()
        self.execs[graph_exec] = list(self.graphs[graph])
        return 0, graph_exec

    def cudaGraphLaunch(self, graph_exec: int, stream: int) -> tuple[int]:
        self._enter("cudaGraphLaunch")
        self.launches += 1
        for work in self.execs[graph_exec]:
            self._stream_work(stream, work)
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec: int) -> tuple[int]:
        self._enter("cudaGraphExecDestroy")
        del self.execs[graph_exec]
        return (0,)

    def cudaGraphDestroy(self, graph: int) -> tuple[int]:
        self._enter("cudaGraphDestroy")
        del self.graphs[graph]
        return (0,)


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT32 = np.int32
    INT64 = np.int64
    INT8 = np.int8
    BOOL = np.bool_
    UINT8 = np.uint8


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None: ...


@dataclass
class FakeTensor:
    name: str
    mode: TensorIOMode
    dtype: DataType
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], ...] = ()  # min, opt, max (inputs)


def add_one(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"OUTPUT0": inputs["INPUT0"] + 1}


@dataclass
class FakeModel:
    tensors: list[FakeTensor]
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = add_one
    output_shapes: Callable[[dict[str, tuple]], dict[str, tuple]] = lambda shapes: {"OUTPUT0": shapes["INPUT0"]}


def add_one_model(width: int | None = 4, opt: tuple[int, int] = (4, 4)) -> FakeModel:
    """INPUT0 FP32 [-1, width] (width -1: dynamic, 1..16) -> OUTPUT0 = INPUT0 + 1; batch 1..16."""
    if width is None:
        return FakeModel([FakeTensor("INPUT0", TensorIOMode.INPUT, DataType.FLOAT, (-1, -1), ((1, 1), opt, (16, 16))),
                          FakeTensor("OUTPUT0", TensorIOMode.OUTPUT, DataType.FLOAT, (-1, -1))])
    return FakeModel([FakeTensor("INPUT0", TensorIOMode.INPUT, DataType.FLOAT, (-1, width),
                                 ((1, width), (opt[0], width), (16, width))),
                      FakeTensor("OUTPUT0", TensorIOMode.OUTPUT, DataType.FLOAT, (-1, width))])


class FakeContext:
    """An execution context: shapes, addresses and ``execute_async_v3`` over the fake device memory."""

    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt, self.gpu, self.model = trt, trt.gpu, trt.model
        self.tensors = {t.name: t for t in self.model.tensors}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shapes_set: list[tuple[str, tuple[int, ...]]] = []
        self.enqueues = 0
        self.captures: list[str] = []  # thread of each capture attempt
        self.seen: list[dict[str, np.ndarray]] = []  # the inputs each execution read

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.tensors[name].profile
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = tuple(shape)
        self.shapes_set.append((name, tuple(shape)))
        return True

    def get_tensor_shape(self, name: str) -> list[int]:
        if self.tensors[name].mode == TensorIOMode.INPUT:
            return list(self.shapes.get(name, self.tensors[name].shape))
        return list(self.model.output_shapes(self.shapes)[name])

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        assert pointer in self.gpu.device, "addresses are device buffers"
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int) and stream_handle in self.gpu.streams
        addresses, shapes = dict(self.addresses), dict(self.shapes)
        if stream_handle in self.gpu.capturing:
            self.captures.append(threading.current_thread().name)
            if self.trt.refuse_capture:
                self.gpu.last_error = CAPTURE_INVALIDATED if self.trt.invalidate else 0
                return False
            self.gpu.capturing[stream_handle].append(lambda: self._compute(addresses, shapes))
            return True
        self.enqueues += 1
        self._compute(addresses, shapes)
        return True

    def _array(self, name: str, addresses: dict[str, int], shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(self.tensors[name].dtype.value)
        return self.gpu.device[addresses[name]][: math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def _compute(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        inputs = {name: self._array(name, addresses, shape).copy() for name, shape in shapes.items()}
        self.seen.append(inputs)
        output_shapes = self.model.output_shapes(shapes)
        for name, value in self.model.compute(inputs).items():
            self._array(name, addresses, output_shapes[name])[...] = value


class FakeEngine:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.tensors = {t.name: t for t in trt.model.tensors}
        self.names = [t.name for t in trt.model.tensors]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name].mode

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name].dtype

    def get_tensor_shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        assert profile == 0
        return [list(shape) for shape in self.tensors[name].profile if not self.trt.hide_profiles]

    def create_execution_context(self) -> FakeContext:
        context = FakeContext(self.trt)
        self.trt.contexts.append(context)
        return context


@dataclass
class FakeTensorRT:
    """Shaped like the ``tensorrt`` module, as far as the engine reaches."""

    gpu: FakeCudart
    model: FakeModel
    __version__: str = "10.13.0"
    refuse_capture: bool = False  # execute_async_v3 returns False while the stream is capturing
    invalidate: bool = True  # ... and that invalidates the capture
    hide_profiles: bool = False  # get_tensor_profile_shape gives nothing (a static input in some versions)
    contexts: list[FakeContext] = field(default_factory=list)
    DataType = DataType
    TensorIOMode = TensorIOMode
    ILogger = FakeILogger

    def Runtime(self, logger: FakeILogger) -> SimpleNamespace:  # noqa: N802 - the tensorrt name
        def deserialize_cuda_engine(plan: bytes) -> FakeEngine | None:
            if plan != PLAN:
                logger.log(FakeILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: "
                           "Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.)")
                return None
            return FakeEngine(self)

        return SimpleNamespace(deserialize_cuda_engine=deserialize_cuda_engine)

    @property
    def context(self) -> FakeContext:
        return self.contexts[-1]


BUCKETS = Buckets.of([1, 2, 4, 8])


@pytest.fixture
def gpu() -> FakeCudart:
    return FakeCudart()


def make_engine(tmp_path: Path, gpu: FakeCudart, model: FakeModel | None = None, plan: bytes = PLAN,
                **options) -> tuple[TensorRTEngine, FakeTensorRT]:
    trt = FakeTensorRT(gpu, model or add_one_model())
    path = tmp_path / "model.plan"
    path.write_bytes(plan)
    options.setdefault("batch_buckets", BUCKETS)
    engine = TensorRTEngine(path, load_tensorrt=lambda: trt, load_cudart=lambda: gpu, **options)
    return engine, trt


def rows(batch: int, width: int = 4, start: float = 0.0) -> np.ndarray:
    return (np.arange(batch * width, dtype=np.float32).reshape(batch, width) + start)


def on_thread(name: str, work: Callable[[], object]) -> object:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()), name=name)
    thread.start()
    thread.join()
    assert result, f"the work on {name} failed"
    return result[0]


def test_specs_datatypes_and_the_engine_contract(tmp_path, gpu):
    tensors = [FakeTensor(f"in_{d.name}", TensorIOMode.INPUT, d, (-1, 2), ((1, 2), (1, 2), (8, 2))) for d in DataType]
    model = FakeModel(tensors + [FakeTensor("out", TensorIOMode.OUTPUT, DataType.FLOAT, (-1, -1))])
    engine, _ = make_engine(tmp_path, gpu, model)
    engine.load()
    assert isinstance(engine, Engine)
    assert [(t.name, t.datatype, t.shape) for t in engine.inputs] == [
        ("in_FLOAT", "FP32", (-1, 2)), ("in_HALF", "FP16", (-1, 2)), ("in_INT32", "INT32", (-1, 2)),
        ("in_INT64", "INT64", (-1, 2)), ("in_INT8", "INT8", (-1, 2)), ("in_BOOL", "BOOL", (-1, 2)),
        ("in_UINT8", "UINT8", (-1, 2))]
    assert [(t.name, t.datatype, t.shape) for t in engine.outputs] == [("out", "FP32", (-1, -1))]
    assert engine.description.startswith("tensorrt plan=model.plan device=0 graphs=0/4 ")
    engine.close()


def test_a_padded_batch_gives_the_unpadded_answer(tmp_path, gpu):
    bucketed, trt = make_engine(tmp_path, gpu, cuda_graphs=False)
    unbucketed, plain = make_engine(tmp_path, gpu, batch_buckets=Buckets(()))
    bucketed.load()
    unbucketed.load()
    x = rows(3, start=1)
    padded = bucketed.run({"INPUT0": x})["OUTPUT0"]
    exact = unbucketed.run({"INPUT0": x})["OUTPUT0"]
    assert padded.shape == (3, 4) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded, exact)
    np.testing.assert_array_equal(padded, x + 1)
    seen = trt.context.seen[-1]["INPUT0"]
    assert seen.shape == (4, 4)  # ran at bucket 4, the padding row zeros, not the pinned buffer's old bytes
    np.testing.assert_array_equal(seen, np.vstack([x, np.zeros((1, 4), np.float32)]))
    assert plain.context.seen[-1]["INPUT0"].shape == (3, 4)
    for batch in range(1, 9):
        x = rows(batch, start=batch)
        np.testing.assert_array_equal(bucketed.run({"INPUT0": x})["OUTPUT0"], x + 1)
        assert trt.context.seen[-1]["INPUT0"].shape[0] == BUCKETS.fit(batch)
    result = bucketed.run({"INPUT0": rows(2)})["OUTPUT0"]
    bucketed.run({"INPUT0": rows(2, start=100)})
    np.testing.assert_array_equal(result, rows(2) + 1)  # a copy, not a view of the reused buffer
    bucketed.close()
    unbucketed.close()


def test_one_capture_per_bucket_and_thread(tmp_path, gpu):
    engine, trt = make_engine(tmp_path, gpu)
    engine.load()
    main = threading.current_thread().name
    for start in range(3):  # warm, capture, replay
        x = rows(3, start=start)
        np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)
    context = trt.context
    graph = engine.graphs.ids[(("INPUT0", (4, 4)),)]
    assert context.captures == [main] and gpu.launches == 1 and len(gpu.execs) == 1
    enqueues = context.enqueues
    for start in range(10, 13):
        x = rows(3, start=start)
        np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)
    assert context.enqueues == enqueues and gpu.launches == 4  # replays at fixed addresses, fresh data each time
    assert context.captures == [main]

    def three_runs() -> bool:
        for start in range(20, 23):
            x = rows(4, start=start)
            np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)
        return True

    on_thread("worker-2", three_runs)
    assert context.captures == [main, "worker-2"]  # the same bucket, captured again on the other thread
    assert engine.graphs.captures_of(main, graph) == 1 and engine.graphs.captures_of("worker-2", graph) == 1
    assert engine.graphs.captured() == {main: {graph}, "worker-2": {graph}}
    engine.run({"INPUT0": rows(4)})
    on_thread("worker-2", lambda: engine.run({"INPUT0": rows(3)}))
    assert context.captures == [main, "worker-2"] and len(gpu.execs) == 2  # no recapture on either thread
    assert "graphs=1/4" in engine.description
    engine.close()


def test_prepare_thread_captures_every_bucket_on_the_calling_thread(tmp_path, gpu):
    engine, trt = make_engine(tmp_path, gpu, device_id=1)
    engine.load()
    on_thread("engine-worker", engine.prepare_thread)
    assert engine.graphs.captured() == {"engine-worker": {1, 2, 3, 4}}
    assert trt.context.captures == ["engine-worker"] * 4 and len(gpu.execs) == 4
    assert "graphs=4/4" in engine.description and "device=1" in engine.description
    enqueues, launches = trt.context.enqueues, gpu.launches
    x = rows(5, start=7)
    out = on_thread("engine-worker", lambda: engine.run({"INPUT0": x}))
    np.testing.assert_array_equal(out["OUTPUT0"], x + 1)
    assert trt.context.enqueues == enqueues and gpu.launches == launches + 1  # bucket 8's graph replayed
    assert {device for _, device in gpu.devices_set} == {1}
    assert ("engine-worker", 1) in gpu.devices_set  # the current device is set on the worker thread too
    engine.close()


def test_prepare_thread_shapes_come_from_warm_shapes_or_the_profile(tmp_path, gpu):
    engine, trt = make_engine(tmp_path, gpu, add_one_model(width=None, opt=(4, 6)), cuda_graphs=False)
    engine.load()
    engine.prepare_thread()
    assert [shape for _, shape in trt.context.shapes_set] == [(1, 6), (2, 6), (4, 6), (8, 6)]
    engine.close()
    engine, trt = make_engine(tmp_path, gpu, add_one_model(width=None), warm_shapes=[{"INPUT0": (1, 3)}])
    engine.load()
    engine.prepare_thread()
    assert sorted({shape for _, shape in trt.context.shapes_set}) == [(1, 3), (2, 3), (4, 3), (8, 3)]
    assert len(gpu.execs) == 4
    engine.close()


def test_a_batch_above_every_bucket_runs_eagerly_in_its_own_buffers(tmp_path, gpu):
    engine, trt = make_engine(tmp_path, gpu)
    engine.load()
    engine.prepare_thread()
    ids, live, mallocs = engine.graphs.ids, gpu.live(), gpu.mallocs
    captures, launches = len(trt.context.captures), gpu.launches
    x = rows(9, start=3)
    out = engine.run({"INPUT0": x})["OUTPUT0"]
    np.testing.assert_array_equal(out, x + 1)
    assert trt.context.seen[-1]["INPUT0"].shape == (9, 4)  # not padded
    assert engine.graphs.ids == ids and EAGER not in ids.values()  # no graph id for it
    assert len(trt.context.captures) == captures and gpu.launches == launches
    assert gpu.mallocs == mallocs + 2 and gpu.live() == live  # one input and one output buffer, freed after
    x = rows(4, start=50)
    np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)  # its bucket's graph still right
    engine.close()


def test_runs_after_an_eager_one_rebind_their_bucket(tmp_path, gpu):
    engine, _ = make_engine(tmp_path, gpu, cuda_graphs=False)
    engine.load()
    for batch in (4, 12, 4, 1, 16, 1):  # the eager run's buffers are freed; the context must not keep them
        x = rows(batch, start=batch)
        np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)
    assert engine.graphs.captured() == {} and gpu.launches == 0
    assert "graphs=0/4 cuda_graphs=off" in engine.description
    engine.close()


@pytest.mark.parametrize("failure", ["enqueue refused, capture invalidated", "enqueue refused, graph returned",
                                     "instantiate fails", "begin capture fails"])
def test_a_failed_capture_falls_back_to_plain_enqueues(tmp_path, gpu, caplog, failure):
    engine, trt = make_engine(tmp_path, gpu)
    trt.refuse_capture = failure.startswith("enqueue refused")
    trt.invalidate = failure.endswith("invalidated")
    if failure == "instantiate fails":
        gpu.fail["cudaGraphInstantiate"] = 999
    if failure == "begin capture fails":
        gpu.fail["cudaStreamBeginCapture"] = 999
    engine.load()
    with caplog.at_level(logging.DEBUG, logger="appliance.engines.tensorrt"):
        for batch in (3, 3, 3, 3, 2, 2, 2):  # two buckets, each past its capture
            x = rows(batch, start=batch * 10)
            np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "MainThread" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "capture failed" in r.getMessage() for r in caplog.records)
    assert engine.graphs.captured() == {} and "graphs=0/4" in engine.description
    assert gpu.launches == 0 and gpu.graphs == {} and gpu.execs == {}  # nothing half-made is kept
    assert gpu.capturing == {} and gpu.last_error == 0  # capture ended, error cleared
    attempts = len(trt.context.captures)
    assert attempts == (0 if failure == "begin capture fails" else 2)  # one per bucket, then plain enqueues
    enqueues = trt.context.enqueues
    engine.run({"INPUT0": rows(3)})
    assert trt.context.enqueues == enqueues + 1 and len(trt.context.captures) == attempts
    engine.close()


def test_close_frees_every_buffer_graph_and_the_stream(tmp_path, gpu):
    engine, trt = make_engine(tmp_path, gpu)
    engine.load()
    on_thread("other", engine.prepare_thread)
    engine.prepare_thread()
    engine.run({"INPUT0": rows(11)})
    assert gpu.live() == {"device": 8, "host": 8, "streams": 1, "graphs": 8, "execs": 8}
    engine.close()
    assert gpu.live() == {"device": 0, "host": 0, "streams": 0, "graphs": 0, "execs": 0}
    calls = len(gpu.calls)
    engine.close()  # idempotent
    assert len(gpu.calls) == calls
    with pytest.raises(RuntimeError, match="not loaded"):
        engine.run({"INPUT0": rows(1)})
    engine.load()  # a closed engine loads again
    np.testing.assert_array_equal(engine.run({"INPUT0": rows(2)})["OUTPUT0"], rows(2) + 1)
    engine.close()
    assert gpu.live()["device"] == 0


def test_a_plan_that_does_not_deserialize_is_refused_clearly(tmp_path, gpu):
    engine, _ = make_engine(tmp_path, gpu, plan=b"an onnx file, perhaps")
    with pytest.raises(RuntimeError, match=r"could not deserialize the plan .*model\.plan") as refused:
        engine.load()
    assert "another GPU or TensorRT version" in str(refused.value) and "magicTagRead" in str(refused.value)
    assert gpu.live() == {"device": 0, "host": 0, "streams": 0, "graphs": 0, "execs": 0}
    with pytest.raises(RuntimeError, match="not loaded"):
        engine.run({"INPUT0": rows(1)})
    missing = TensorRTEngine(tmp_path / "model.plan", batch_buckets=BUCKETS, load_tensorrt=lambda: None,
                             load_cudart=lambda: gpu)
    with pytest.raises(RuntimeError, match="tensorrt is not installed"):
        missing.load()


def test_cuda_errors_name_the_call(tmp_path, gpu):
    engine, _ = make_engine(tmp_path, gpu)
    engine.load()
    gpu.fail["cudaMalloc"] = 2
    with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation") as failed:
        engine.run({"INPUT0": rows(3)})
    assert isinstance(failed.value, RuntimeError) and failed.value.call == "cudaMalloc"
    assert gpu.live()["host"] == 0  # the pinned half of the failed allocation was given back
    del gpu.fail["cudaMalloc"]
    np.testing.assert_array_equal(engine.run({"INPUT0": rows(3)})["OUTPUT0"], rows(3) + 1)
    engine.close()
    runtime = CudaRuntime(gpu)
    gpu.fail["cudaStreamCreateWithFlags"] = 999
    with pytest.raises(RuntimeError, match="cudaStreamCreateWithFlags failed: cudaErrorUnknown"):
        runtime.create_stream()


def test_bad_inputs_are_refused_before_a_graph_id_is_spent(tmp_path, gpu):
    engine, _ = make_engine(tmp_path, gpu)
    engine.load()
    with pytest.raises(ValueError, match="outside the plan's profile"):
        engine.run({"INPUT0": np.zeros((2, 5), np.float32)})
    with pytest.raises(ValueError, match="inputs are"):
        engine.run({"WRONG": rows(1)})
    with pytest.raises(ValueError, match="cannot be read as FP32"):
        engine.run({"INPUT0": np.zeros((2, 4), np.complex64)})
    assert engine.graphs.ids == {}
    x = np.arange(8, dtype=np.float64).reshape(2, 4)  # float64 is read as FP32
    np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], (x + 1).astype(np.float32))
    engine.close()


def test_a_static_plan_runs_and_unserved_datatypes_are_refused(tmp_path, gpu):
    static = FakeModel([FakeTensor("INPUT0", TensorIOMode.INPUT, DataType.FLOAT, (4, 4)),
                        FakeTensor("OUTPUT0", TensorIOMode.OUTPUT, DataType.FLOAT, (4, 4))])
    static.tensors[0].profile = ((4, 4),) * 3  # what the fake context accepts; the engine is shown none
    engine, trt = make_engine(tmp_path, gpu, static, batch_buckets=Buckets.of([4]))
    trt.hide_profiles = True
    engine.load()
    x = rows(2)
    np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)  # padded to the plan's batch 4
    with pytest.raises(ValueError, match="outside the plan's profile"):
        engine.run({"INPUT0": rows(5)})
    engine.close()
    fp8 = FakeModel([FakeTensor("INPUT0", TensorIOMode.INPUT, "FP8", (-1, 4), ((1, 4), (1, 4), (4, 4)))])
    engine, _ = make_engine(tmp_path, gpu, fp8)
    with pytest.raises(RuntimeError, match="tensor INPUT0 has datatype FP8, which the TensorRT engine does not"):
        engine.load()
    assert gpu.live()["streams"] == 0


def test_importing_the_engine_imports_no_gpu_package():
    code = ("import sys, appliance.engines.tensorrt_engine, appliance.engines.cuda_runtime; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _gpu_stack() -> tuple[object | None, str]:
    """The ``tensorrt`` module where TensorRT, cuda-python and a GPU all answer; else why not."""
    from appliance.engines.tensorrt_plans import cuda_device, tensorrt_module

    try:
        trt = tensorrt_module()
    except Exception as error:  # a broken install (missing libnvinfer) is a skip too
        return None, f"tensorrt does not import ({error})"
    if trt is None:
        return None, "the tensorrt package is not installed"
    try:
        if cudart_module() is None:
            return None, "cuda-python is not installed"
        if cuda_device() is None:
            return None, "no CUDA device answers"
    except Exception as error:
        return None, f"cuda-python does not answer ({error})"
    return trt, ""


@pytest.mark.gpu
def test_a_real_plan_runs_exactly_with_graphs_equal_to_eager(tmp_path):
    trt, why = _gpu_stack()
    if trt is None:
        pytest.skip(f"needs tensorrt and a CUDA GPU: {why}")
    from appliance.build.tensorrt_stage import build_plan

    sizes = (1, 2, 4, 8)
    figures = build_plan(ADD_ONE, tmp_path / "plans", [{"INPUT0": (size, 4)} for size in sizes], lambda line: None)
    plan = tmp_path / "plans" / figures["plan"]
    graphed = TensorRTEngine(plan, batch_buckets=Buckets.of(sizes))
    eager = TensorRTEngine(plan, batch_buckets=Buckets.of(sizes), cuda_graphs=False)
    small = TensorRTEngine(plan, batch_buckets=Buckets.of([1, 2, 4]))  # 5..8 run eagerly, inside the profile
    engines = (graphed, eager, small)
    try:
        for engine in engines:
            engine.load()
        assert [(t.name, t.datatype, t.shape) for t in graphed.inputs] == [("INPUT0", "FP32", (-1, 4))]
        graphed.prepare_thread()
        thread = threading.current_thread().name
        assert graphed.graphs.captured().get(thread) == {1, 2, 3, 4}, graphed.description
        for batch in range(1, 9):
            x = rows(batch, start=batch)
            for engine in engines:
                np.testing.assert_array_equal(engine.run({"INPUT0": x})["OUTPUT0"], x + 1)
        # Every bucket replayed after another bucket's run, against the same rows run without graphs.
        for batch in (8, 1, 4, 2, 8, 3, 1, 6, 2, 4):
            x = rows(batch, start=100 + batch)
            np.testing.assert_array_equal(graphed.run({"INPUT0": x})["OUTPUT0"], eager.run({"INPUT0": x})["OUTPUT0"])
        assert graphed.graphs.captured() == {thread: {1, 2, 3, 4}} and "graphs=4/4" in graphed.description
    finally:
        for engine in engines:
            engine.close()

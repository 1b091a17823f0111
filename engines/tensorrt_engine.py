"""The native TensorRT engine: a serialized plan run through cuda-python, with a CUDA graph per shape bucket.

A batch is padded up to its bucket (``engines.buckets``) and copied into that bucket shape's pinned host buffers,
then host to device on the engine's stream; the bucket's graph is replayed (or the context enqueued), the outputs
come back device to host, and the real rows are sliced out. Each bucket shape has its buffers allocated once, so a
graph captured at it replays at fixed addresses. Graphs are captured the way ``trtexec`` does (one enqueue, a
synchronize, then a thread-local capture of one more enqueue) and belong to the thread that captured them; the
:class:`~appliance.engines.graph_book.GraphBook` says, per thread and bucket, whether a run warms, captures or
replays. A batch above every bucket runs eagerly in buffers allocated for that call.

TensorRT and cuda-python (the ``gpu`` extra) are imported only by the loaders, when the engine loads.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.buckets import Buckets, pad_rows, rows_of, shape_key
from appliance.engines.cuda_runtime import CudaRuntime, cudart_module
from appliance.engines.graph_book import EAGER, GraphBook
from appliance.engines.tensorrt_plans import tensorrt_module
from appliance.engines.tensors import TensorSpec

log = logging.getLogger("appliance.engines.tensorrt")

# trt.DataType member name -> v2 datatype
TRT_TO_V2 = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}


@dataclass(slots=True)
class _Buffer:
    """One tensor's pinned host buffer, its device buffer, and a numpy view of the host one."""

    shape: tuple[int, ...]
    nbytes: int
    host: int
    device: int
    view: np.ndarray


@dataclass(slots=True)
class _Slot:
    """The buffers of one input shape (``key`` ``None``: a one-off eager run)."""

    key: Hashable | None
    graph: int
    inputs: dict[str, _Buffer]
    outputs: dict[str, _Buffer]


@dataclass(slots=True)
class _Graph:
    """A captured graph and its executable instance."""

    graph: Any
    graph_exec: Any


_LOGGERS: dict[int, tuple[Any, Any]] = {}  # id(tensorrt module) -> (module, logger)
_LOGGERS_LOCK = threading.Lock()


def _trt_logger(trt: Any) -> Any:
    """The process's one ``trt.ILogger`` for ``trt``: forwards to Python logging, keeps the last errors for
    exception messages. TensorRT keeps the first logger it is given as its global one, so it must never be freed."""
    with _LOGGERS_LOCK:
        entry = _LOGGERS.get(id(trt))
        if entry is None:
            entry = _LOGGERS[id(trt)] = (trt, _new_trt_logger(trt))  # the module is kept so its id stays its own
        return entry[1]


def _new_trt_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=4)

        def log(self, level: Any, message: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(str(message))
                log.error("tensorrt: %s", message)
            elif level == severity.WARNING:
                log.warning("tensorrt: %s", message)
            elif level == severity.INFO:
                log.debug("tensorrt: %s", message)

        def said(self) -> str:
            return f" (TensorRT said: {' | '.join(self.errors)})" if self.errors else ""

    return _Logger()


class TensorRTEngine:
    """An :class:`~appliance.engines.base.Engine` over one deserialized TensorRT plan, one execution context and
    one CUDA stream, with a CUDA graph per batch bucket and thread."""

    def __init__(
        self,
        plan_path: Path,
        *,
        batch_buckets: Buckets,
        warm_shapes: list[dict[str, tuple[int, ...]]] | None = None,
        cuda_graphs: bool = True,
        device_id: int = 0,
        load_tensorrt: Callable[[], Any | None] = tensorrt_module,
        load_cudart: Callable[[], Any | None] = cudart_module,
    ) -> None:
        """``batch_buckets`` are the batch sizes runs are padded to; ``warm_shapes`` give the non-batch dimensions
        :meth:`prepare_thread` warms each bucket at (the plan's optimization-profile ``opt`` shape when
        ``None``); ``load_tensorrt`` and ``load_cudart`` return the ``tensorrt`` and cudart modules (tests pass
        fakes)."""
        self._plan_path = Path(plan_path)
        self._buckets = batch_buckets
        self._warm_shapes = [dict(shape) for shape in warm_shapes or ()]
        self._graphs_on = cuda_graphs
        self._device_id = device_id
        self._load_tensorrt = load_tensorrt
        self._load_cudart = load_cudart
        # One graph per bucket and warm shape; without warm shapes exactly one per bucket.
        self._max_graphs = len(batch_buckets.sizes) * max(1, len(self._warm_shapes))
        self._book = GraphBook(max_graphs=self._max_graphs, runs_before_capture=1)
        self._lock = threading.Lock()
        self._rt: CudaRuntime | None = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._stream_handle = 0
        self._trt_version = "?"
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._profiles: dict[str, tuple[tuple[int, ...], ...]] = {}  # input -> (min, opt, max) of profile 0
        self._slots: dict[Hashable, _Slot] = {}
        self._captured: dict[tuple[str, int], _Graph] = {}  # (thread name, graph id) -> graph
        self._bound_key: Hashable | None = None  # the slot whose shapes and addresses the context holds now
        self._warned_capture = False

    @property
    def inputs(self) -> list[TensorSpec]:
        """Inputs read from the plan (``-1`` for dynamic dimensions)."""
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """Outputs read from the plan (``-1`` for dynamic dimensions)."""
        return self._outputs

    @property
    def graphs(self) -> GraphBook:
        """The graph bookkeeping: graph ids per bucket shape, captures per thread."""
        return self._book

    @property
    def description(self) -> str:
        """Runtime, plan, device and graphs, for logs."""
        captured = len({graph for _, graph in list(self._captured)})  # list(): run() may add one meanwhile
        sizes = ",".join(str(size) for size in self._buckets.sizes) or "none"
        return (
            f"tensorrt plan={self._plan_path.name} device={self._device_id} graphs={captured}/{self._max_graphs} "
            f"cuda_graphs={'on' if self._graphs_on else 'off'} buckets={sizes} tensorrt={self._trt_version}"
        )

    def load(self) -> None:
        """Deserialize the plan, create the execution context and the stream, and read the I/O tensors."""
        with self._lock:
            if self._context is not None:
                return
            trt = self._load_tensorrt()
            if trt is None:
                raise RuntimeError("tensorrt is not installed; install the gpu extra (pip install '.[gpu]')")
            cudart = self._load_cudart()
            if cudart is None:
                raise RuntimeError("cuda-python is not installed; install the gpu extra (pip install '.[gpu]')")
            plan = self._plan_path.read_bytes()
            self._rt = CudaRuntime(cudart)
            self._book = GraphBook(max_graphs=self._max_graphs, runs_before_capture=1)  # fresh for a new context
            self._warned_capture = False
            try:
                self._open(trt, plan)
            except BaseException:
                self._release()
                raise
        log.info("loaded %s: %s", self._plan_path, self.description)

    def _open(self, trt: Any, plan: bytes) -> None:
        assert self._rt is not None
        self._rt.set_device(self._device_id)
        self._trt_version = str(getattr(trt, "__version__", "?"))
        self._logger = _trt_logger(trt)
        self._logger.errors.clear()  # what it says next is about this plan
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise RuntimeError(
                f"TensorRT {self._trt_version} could not deserialize the plan {self._plan_path}: not a TensorRT "
                f"plan, or built for another GPU or TensorRT version; rebuild it on this machine{self._logger.said()}"
            )
        # The default allocation strategy (kSTATIC) keeps the context's memory at one address, which graphs need.
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self._plan_path}"
                               f"{self._logger.said()}")
        inputs, outputs = [], []
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
            spec = TensorSpec(name, self._datatype(trt, name), shape)
            (inputs if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        shape_io = getattr(self._engine, "is_shape_inference_io", None)
        for spec in inputs:
            if shape_io is not None and shape_io(spec.name):
                raise RuntimeError(f"plan {self._plan_path.name}: input {spec.name} is a shape tensor (read on the "
                                   "host); the TensorRT engine serves only device tensors")
        self._inputs, self._outputs = inputs, outputs
        self._profiles = {spec.name: self._profile(spec) for spec in inputs}
        self._stream = self._rt.create_stream()
        self._stream_handle = int(self._stream)

    def _profile(self, spec: TensorSpec) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) of optimization profile 0; a static input's own shape where the plan gives none."""
        try:
            profile = self._engine.get_tensor_profile_shape(spec.name, 0)
            shapes = tuple(tuple(int(d) for d in shape) for shape in profile)
        except Exception:  # no profile for a static input in some versions
            shapes = ()
        if len(shapes) == 3 and all(len(shape) == len(spec.shape) for shape in shapes):
            return shapes
        if all(d >= 0 for d in spec.shape):
            return (spec.shape,) * 3
        raise RuntimeError(f"plan {self._plan_path.name}: input {spec.name} {spec.shape} has dynamic dimensions "
                           "but no optimization profile 0")

    def _datatype(self, trt: Any, name: str) -> str:
        dtype = self._engine.get_tensor_dtype(name)
        for member, v2 in TRT_TO_V2.items():
            if getattr(trt.DataType, member, None) == dtype:
                return v2
        raise RuntimeError(f"plan {self._plan_path.name}: tensor {name} has datatype {dtype}, which the TensorRT "
                           f"engine does not serve (it serves {', '.join(sorted(set(TRT_TO_V2.values())))})")

    def prepare_thread(self) -> None:
        """Capture a graph for every bucket shape on the calling thread (the worker that will call :meth:`run`);
        without graphs, allocate every bucket's buffers. Runs zeros at each shape."""
        if self._context is None:
            raise RuntimeError("engine is not loaded")
        runs = self._book.runs_before_capture + 1 if self._graphs_on else 1
        for shapes in self._warm_input_shapes():
            zeros = {spec.name: np.zeros(shapes[spec.name], dtype=spec.dtype) for spec in self._inputs}
            for _ in range(runs):
                self.run(zeros)
        log.info("prepared thread %s: %s", threading.current_thread().name, self.description)

    def _warm_input_shapes(self) -> Iterator[dict[str, tuple[int, ...]]]:
        for template in self._warm_shapes or [{}]:
            for size in self._buckets.sizes:
                shapes = {}
                for spec in self._inputs:
                    given = template.get(spec.name)
                    if given is None:
                        given = self._profiles[spec.name][1]
                    shapes[spec.name] = (size, *tuple(given)[1:])
                yield shapes

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the plan once; returns every output by name (copies: the buffers serve the next call)."""
        with self._lock:
            if self._context is None or self._rt is None:
                raise RuntimeError("engine is not loaded")
            arrays = self._checked(inputs)
            self._rt.set_device(self._device_id)  # the current device is per thread
            if not self._buckets:
                return self._run_eager(arrays)
            rows = rows_of(arrays)
            bucket = self._buckets.fit(rows)
            if bucket is None:
                return self._run_eager(arrays)
            padded = {name: pad_rows(value, bucket) for name, value in arrays.items()}
            self._check_profile(padded)  # before a graph id is given to a shape the plan cannot run
            key = shape_key(padded)
            graph = self._book.graph_id(key)
            if graph == EAGER:  # more shapes than graphs (dynamic non-batch dimensions)
                return self._run_eager(arrays)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = self._bind(key, {n: v.shape for n, v in padded.items()}, graph)
            return self._run_slot(slot, padded, rows)

    def _checked(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = [spec.name for spec in self._inputs]
        if set(inputs) != set(expected):
            raise ValueError(f"the plan's inputs are {expected}; got {sorted(inputs)}")
        arrays = {}
        for spec in self._inputs:
            value = np.asarray(inputs[spec.name])
            if value.dtype != spec.dtype:
                if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
                    raise ValueError(f"input {spec.name}: {value.dtype} cannot be read as {spec.datatype}")
                value = value.astype(spec.dtype)
            if value.ndim != len(spec.shape):
                raise ValueError(f"input {spec.name}: shape {value.shape} does not match the plan's {spec.shape}")
            arrays[spec.name] = value
        return arrays

    def _check_profile(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            low, _, high = self._profiles[name]
            if len(low) != value.ndim or any(d < lo or d > hi for d, lo, hi in zip(value.shape, low, high)):
                raise ValueError(f"input {name}: shape {value.shape} is outside the plan's profile "
                                 f"(min {low}, max {high})")

    def _run_slot(self, slot: _Slot, arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        assert self._rt is not None
        thread = threading.current_thread().name
        kind = self._book.next_run(slot.graph, thread) if self._graphs_on else "eager"
        self._use(slot)
        self._copy_in(slot, arrays)
        captured = self._captured.get((thread, slot.graph))
        if kind == "replay" and captured is not None:
            self._rt.launch(captured.graph_exec, self._stream)
        elif kind == "capture":
            # As trtexec: an enqueue before the capture lets TensorRT finish its deferred setup for these shapes
            # outside the capture; it also produces this run's outputs.
            self._enqueue()
            self._rt.synchronize(self._stream)
            self._capture(slot, thread)
        else:
            self._enqueue()
        return self._copy_out(slot, rows)

    def _run_eager(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._rt is not None
        self._check_profile(arrays)
        slot = self._bind(None, {name: value.shape for name, value in arrays.items()}, EAGER)
        try:
            self._copy_in(slot, arrays)
            self._enqueue()
            return self._copy_out(slot, None)
        except BaseException:
            self._quietly(self._rt.synchronize, self._stream)  # nothing may still use the buffers freed below
            raise
        finally:
            self._free(slot)
            self._bound_key = None

    def _capture(self, slot: _Slot, thread: str) -> None:
        assert self._rt is not None
        rt, graph = self._rt, None
        try:
            rt.begin_capture(self._stream)
            enqueued = self._context.execute_async_v3(self._stream_handle)
            graph = rt.end_capture(self._stream)
            if not enqueued:
                raise RuntimeError(f"execute_async_v3 returned False during capture{self._logger.said()}")
            graph_exec = rt.instantiate(graph)
        except Exception as error:
            rt.abandon_capture(self._stream)
            if graph is not None:
                self._quietly(rt.destroy_graph, graph)
            self._book.capture_failed(slot.graph, thread)
            report = log.debug if self._warned_capture else log.warning
            self._warned_capture = True
            report("CUDA graph capture failed for %s (graph %d) on thread %s: %s; that shape runs without a graph "
                   "on that thread (later failures are logged at debug)", slot.key, slot.graph, thread, error)
            return  # nothing runs during a capture: the outputs are the enqueue's before it
        self._captured[thread, slot.graph] = _Graph(graph, graph_exec)
        log.debug("captured graph %d for %s on thread %s", slot.graph, slot.key, thread)

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream_handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self._plan_path.name}{self._logger.said()}")

    def _bind(self, key: Hashable | None, shapes: Mapping[str, tuple[int, ...]], graph: int) -> _Slot:
        """Set the input shapes, allocate buffers for every I/O tensor at the resulting shapes, set addresses."""
        self._set_shapes(shapes)
        output_shapes = {}
        for spec in self._outputs:
            dims = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            if any(d < 0 for d in dims):
                raise RuntimeError(f"output {spec.name} has shape {dims} for inputs {dict(shapes)}: outputs whose "
                                   "shape depends on the data are not supported")
            output_shapes[spec.name] = dims
        slot = _Slot(key, graph, {}, {})
        try:
            for spec in self._inputs:
                slot.inputs[spec.name] = self._allocate(tuple(shapes[spec.name]), spec.dtype)
            for spec in self._outputs:
                slot.outputs[spec.name] = self._allocate(output_shapes[spec.name], spec.dtype)
            self._set_addresses(slot)
        except BaseException:
            self._free(slot)
            raise
        self._bound_key = key
        if key is not None:
            log.debug("allocated buffers for %s (graph %d)", key, graph)
        return slot

    def _use(self, slot: _Slot) -> None:
        # The context holds one set of shapes and addresses; a graph replays correctly only when they are its own.
        if self._bound_key != slot.key:
            self._set_shapes({name: buffer.shape for name, buffer in slot.inputs.items()})
            self._set_addresses(slot)
            self._bound_key = slot.key

    def _set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._bound_key = None
        for name, shape in shapes.items():
            if not self._context.set_input_shape(name, tuple(shape)):
                low, _, high = self._profiles[name]
                raise ValueError(f"input {name}: shape {tuple(shape)} is outside the plan's profile (min {low}, "
                                 f"max {high}){self._logger.said()}")

    def _set_addresses(self, slot: _Slot) -> None:
        for name, buffer in (*slot.inputs.items(), *slot.outputs.items()):
            if not self._context.set_tensor_address(name, buffer.device):
                raise RuntimeError(f"TensorRT refused the address of tensor {name}{self._logger.said()}")

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> _Buffer:
        assert self._rt is not None
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(nbytes, 1)  # an empty tensor still needs a valid address
        host = self._rt.malloc_host(size)
        try:
            device = self._rt.malloc(size)
        except BaseException:
            self._quietly(self._rt.free_host, host)
            raise
        raw = np.frombuffer((ctypes.c_ubyte * size).from_address(host), dtype=np.uint8)
        return _Buffer(shape, nbytes, host, device, raw[:nbytes].view(dtype).reshape(shape))

    def _copy_in(self, slot: _Slot, arrays: Mapping[str, np.ndarray]) -> None:
        assert self._rt is not None
        for name, value in arrays.items():
            buffer = slot.inputs[name]
            np.copyto(buffer.view, value)
            if buffer.nbytes:
                self._rt.copy_to_device(buffer.device, buffer.host, buffer.nbytes, self._stream)

    def _copy_out(self, slot: _Slot, rows: int | None) -> dict[str, np.ndarray]:
        assert self._rt is not None
        for buffer in slot.outputs.values():
            if buffer.nbytes:
                self._rt.copy_to_host(buffer.host, buffer.device, buffer.nbytes, self._stream)
        self._rt.synchronize(self._stream)
        return {name: np.array(buffer.view if rows is None else buffer.view[:rows])
                for name, buffer in slot.outputs.items()}

    def _free(self, slot: _Slot) -> None:
        assert self._rt is not None
        for buffer in (*slot.inputs.values(), *slot.outputs.values()):
            self._quietly(self._rt.free, buffer.device)
            self._quietly(self._rt.free_host, buffer.host)
        slot.inputs.clear()
        slot.outputs.clear()

    def _quietly(self, call: Callable[..., Any], *args: Any) -> None:
        """Release calls on teardown paths: a failure is logged, and the rest is still released."""
        try:
            call(*args)
        except Exception as error:
            log.warning("releasing TensorRT engine resources (%s): %s", self._plan_path.name, error)

    def close(self) -> None:
        """Destroy the graphs, free every buffer, destroy the stream, drop the context and engine. Idempotent."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        rt = self._rt
        if rt is None:
            return
        self._quietly(rt.set_device, self._device_id)
        if self._stream is not None:
            self._quietly(rt.synchronize, self._stream)
        for captured in self._captured.values():
            self._quietly(rt.destroy_graph_exec, captured.graph_exec)
            self._quietly(rt.destroy_graph, captured.graph)
        self._captured.clear()
        # The context before the engine before the runtime: each is made from the next.
        self._context = None
        self._engine = None
        self._runtime = None
        for slot in self._slots.values():
            self._free(slot)
        self._slots.clear()
        if self._stream is not None:
            self._quietly(rt.destroy_stream, self._stream)
            self._stream = None
            self._stream_handle = 0
        self._bound_key = None
        self._rt = None

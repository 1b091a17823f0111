"""ONNX Runtime runs through IOBinding onto buffers allocated once per shape bucket, with a CUDA graph per bucket.

A batch is padded up to its bucket, copied into that bucket's bound input buffers (``OrtValue.update_inplace``),
run with ``run_with_iobinding`` into the bucket's bound output buffers, and its real rows are copied back out. With
CUDA graphs on (the session made with the CUDA execution provider's ``enable_cuda_graph``), each bucket shape has
its own ``gpu_graph_id``: ONNX Runtime captures a graph on the third run of that id on a thread and replays it
after. Graphs run only on the thread that owns the engine (the one :meth:`BoundRunner.prepare_thread` ran on):
runs elsewhere, and batches above every bucket, are eager (graph id -1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.engines.buckets import Buckets, pad_rows, rows_of, shape_key
from appliance.engines.graph_book import EAGER, GraphBook

log = logging.getLogger("appliance.engines.io_binding")

ORT_RUNS_BEFORE_CAPTURE = 2  # the CUDA EP's min_num_runs_before_cuda_graph_capture_: the third run captures


@dataclass(slots=True)
class _Slot:
    """The bound buffers of one bucket shape. ``staging`` are host arrays of the bucket's shape: on the CPU the
    bound buffers themselves (ONNX Runtime reads and writes them in place), on a GPU the source of the copies."""

    binding: Any
    staging: dict[str, np.ndarray]
    device_inputs: dict[str, Any]  # on a GPU: the device OrtValues the staging arrays are copied into
    outputs: dict[str, Any]  # OrtValues (on the CPU over host arrays)
    host_outputs: dict[str, np.ndarray]  # on the CPU: the arrays under ``outputs``
    run_options: Any  # None unless a graph id is set: ONNX Runtime's run options cost ~60 us a call on the CPU
    graph: int
    filled: int = 0  # rows written by the last run (rows above it are zero)


class BoundRunner:
    """Runs one ``InferenceSession`` through IOBinding, one set of device buffers per bucket shape."""

    def __init__(self, session: Any, *, output_names: Sequence[str], buckets: Buckets, device: str = "cpu",
                 device_id: int = 0, cuda_graphs: bool = False, max_graphs: int = 64,
                 warm_shapes: Sequence[Mapping[str, tuple[int, ...]]] = (),
                 input_dtypes: Mapping[str, np.dtype] | None = None, share_host_memory: bool | None = None) -> None:
        """``device`` is where the bound buffers live (``"cpu"`` or ``"cuda"``); ``warm_shapes`` are the input
        shapes :meth:`prepare_thread` captures (bucket shapes); ``input_dtypes`` their dtypes.
        ``share_host_memory`` (default: on the CPU) binds host arrays themselves; otherwise buffers are allocated
        on ``device`` and each run copies into and out of them, as on a GPU (tests run that way on the CPU)."""
        self._session = session
        self._output_names = list(output_names)
        self._buckets = buckets
        self._device = device
        self._device_id = device_id
        self._share = device == "cpu" if share_host_memory is None else share_host_memory
        self._graphs_on = cuda_graphs
        self._warm_shapes = [dict(shape) for shape in warm_shapes]
        self._input_dtypes = dict(input_dtypes or {})
        self.graphs = GraphBook(max_graphs=max_graphs if cuda_graphs else 0,
                                runs_before_capture=ORT_RUNS_BEFORE_CAPTURE)
        self._slots: dict[tuple, _Slot] = {}
        self._by_fast_key: dict[tuple, _Slot] = {}
        self._owner: str | None = None  # the thread that may capture and replay graphs
        self.eager_runs = 0

    @property
    def cuda_graphs(self) -> bool:
        """Whether bucket shapes run as CUDA graphs."""
        return self._graphs_on

    @property
    def slots(self) -> int:
        """Bucket shapes with bound buffers."""
        return len(self._slots)

    def prepare_thread(self) -> None:
        """Make the calling thread the owner and run every warm shape until its graph is captured and replayed
        once (once per shape without graphs, which binds its buffers)."""
        self._owner = threading.current_thread().name
        runs = ORT_RUNS_BEFORE_CAPTURE + 2 if self._graphs_on else 1
        for shape in self._warm_shapes:
            inputs = {name: np.zeros(dims, dtype=self._input_dtypes.get(name, np.float32))
                      for name, dims in shape.items()}
            for _ in range(runs):
                self.run(inputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pad to the bucket, run bound (graphed on the owner thread), slice the real rows out."""
        rows = rows_of(inputs) if len(inputs) > 1 else next(iter(inputs.values())).shape[0]
        bucket = self._buckets.fit(rows)
        if bucket is None:
            return self._eager(inputs)
        # The hot path: a cheap key (bucket and the non-batch dims in the caller's order) finds the slot.
        fast_key = (bucket, *[(name, value.shape[1:]) for name, value in inputs.items()])
        slot = self._by_fast_key.get(fast_key)
        if slot is None:
            key = shape_key({name: (bucket, *np.shape(value)[1:]) for name, value in inputs.items()})
            slot = self._slots.get(key)
            if slot is None:
                padded = {name: pad_rows(np.asarray(value), bucket) for name, value in inputs.items()}
                slot = self._slots[key] = self._bind(key, padded)
            self._by_fast_key[fast_key] = slot
        if slot.graph != EAGER:
            if threading.current_thread().name != self._owner:
                return self._eager(inputs)
            self.graphs.next_run(slot.graph)
        for name, value in inputs.items():
            staging = slot.staging[name]
            staging[:rows] = value
            if slot.filled > rows:
                staging[rows:slot.filled] = 0  # padding rows are zeros, never a previous request's data
        slot.filled = rows
        for name, device_value in slot.device_inputs.items():
            device_value.update_inplace(slot.staging[name])
        if slot.run_options is None:
            self._session.run_with_iobinding(slot.binding)
        else:
            self._session.run_with_iobinding(slot.binding, slot.run_options)
        if slot.host_outputs:
            return {name: slot.host_outputs[name][:rows].copy() for name in self._output_names}
        # A copy: a host OrtValue's numpy() is a view of the buffer the next run overwrites.
        return {name: slot.outputs[name].numpy()[:rows].copy() for name in self._output_names}

    def _eager(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.eager_runs += 1
        values = self._session.run(self._output_names, dict(inputs), self._eager_options())
        return dict(zip(self._output_names, values))

    def _eager_options(self) -> Any:
        """Run options that turn capture off (graph id -1) where graphs are on; else none (they cost ~60 us)."""
        if not self._graphs_on:
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(EAGER))
        return options

    def _bind(self, key: tuple, padded: Mapping[str, np.ndarray]) -> _Slot:
        """Buffers for a new bucket shape: the output shapes come from one ordinary run at that shape."""
        import onnxruntime as ort

        graph = self.graphs.graph_id(key) if self._graphs_on else EAGER
        samples = self._session.run(self._output_names, dict(padded), self._eager_options())
        binding = self._session.io_binding()
        on_cpu = self._share
        staging = {name: np.zeros(value.shape, value.dtype) for name, value in padded.items()}
        device_inputs = {}
        for name, host in staging.items():
            if on_cpu:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(host))
            else:
                device_inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(host.shape, host.dtype, self._device,
                                                                                self._device_id)
                binding.bind_ortvalue_input(name, device_inputs[name])
        outputs, host_outputs = {}, {}
        for name, sample in zip(self._output_names, samples):
            if on_cpu:
                host_outputs[name] = np.zeros(sample.shape, sample.dtype)
                outputs[name] = ort.OrtValue.ortvalue_from_numpy(host_outputs[name])
            else:
                outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(sample.shape, sample.dtype, self._device,
                                                                          self._device_id)
            binding.bind_ortvalue_output(name, outputs[name])
        options = None
        if graph != EAGER:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph))
        log.debug("bound buffers for %s on %s (graph %d)", key, self._device, graph)
        return _Slot(binding, staging, device_inputs, outputs, host_outputs, options, graph)

    def close(self) -> None:
        """Drop the bound buffers."""
        self._slots.clear()
        self._by_fast_key.clear()

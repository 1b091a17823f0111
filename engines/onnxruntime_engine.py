"""The ONNX Runtime engine: session options from config, execution providers chosen by preference and availability."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.engines.buckets import Buckets
from appliance.engines.io_binding import BoundRunner
from appliance.engines.runtime_choice import PROVIDER_IDS, RuntimeChoice, choose_providers
from appliance.engines.tensors import TensorSpec

log = logging.getLogger("appliance.engines.onnxruntime")


ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass
class OrtOptions:
    """Session options for one engine. Thread counts of 0 let ONNX Runtime choose."""

    providers: Sequence[str] = ("tensorrt", "cuda", "cpu")
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    optimized_model_dir: Path | None = None  # where to cache the optimized model; None: no cache
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    # Bucketed IOBinding (engines/io_binding.py): batches padded to these sizes run on buffers bound once per shape.
    batch_buckets: Buckets = field(default_factory=lambda: Buckets(()))
    io_binding: bool = False
    cuda_graphs: bool = False  # a CUDA graph per bucket shape, where the CUDA execution provider runs the model
    warm_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)  # shapes captured at thread start
    max_graphs: int = 64


def _shape(dims: Sequence[object]) -> tuple[int, ...]:
    # Symbolic or unknown dimensions (strings, None) are variable.
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


class OnnxRuntimeEngine:
    """An :class:`~appliance.engines.base.Engine` over one ``onnxruntime.InferenceSession``."""

    choice: RuntimeChoice | None = None  # set by the engine factory: which runtime and why

    def __init__(
        self,
        model_path: Path,
        options: OrtOptions,
        available_providers: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self._model_path = Path(model_path)
        self._options = options
        self._available_providers = available_providers
        self._session = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._output_names: list[str] = []
        self._bound: BoundRunner | None = None
        self._graphs_refused = False
        self.providers: list[str] = []

    @property
    def inputs(self) -> list[TensorSpec]:
        """Inputs read from the model."""
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """Outputs read from the model."""
        return self._outputs

    @property
    def description(self) -> str:
        """Runtime, providers and threads, for logs."""
        o = self._options
        bound = ""
        if self._bound is not None:
            bound = (f" io_binding buckets={','.join(map(str, o.batch_buckets.sizes))} "
                     f"cuda_graphs={'on' if self._bound.cuda_graphs else 'off'}")
        return (
            f"onnxruntime providers={','.join(self.providers)} intra_op_threads={o.intra_op_threads} "
            f"inter_op_threads={o.inter_op_threads} optimization={o.graph_optimization_level}{bound}"
        )

    @property
    def bound(self) -> BoundRunner | None:
        """The bucketed IOBinding runner, when the engine runs through one."""
        return self._bound

    def load(self) -> None:
        """Create the session (reusing a cached optimized model when one matches)."""
        import onnxruntime as ort

        available = (self._available_providers or ort.get_available_providers)()
        self.providers = choose_providers(self._options.providers, available)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = self._options.intra_op_threads
        session_options.inter_op_num_threads = self._options.inter_op_threads
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        session_options.graph_optimization_level = levels[self._options.graph_optimization_level]
        model_to_load = self._model_path
        cached = self._optimized_cache_path(ort.__version__)
        if cached is not None and cached.exists():
            # Already optimized for this model, level, providers and runtime: skip the optimizer.
            model_to_load = cached
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            log.info("using cached optimized model %s", cached)
        elif cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written under a temporary name and renamed once complete, so a crash never leaves half a model.
            partial = cached.with_suffix(f".{os.getpid()}.partial")
            session_options.optimized_model_filepath = str(partial)
        provider_options = [dict(self._options.provider_options.get(p, {})) for p in self.providers]
        graphs = self._options.cuda_graphs and self._options.io_binding and self.providers[0] == PROVIDER_IDS["cuda"]
        if graphs:
            provider_options[0]["enable_cuda_graph"] = "1"
        try:
            self._session = ort.InferenceSession(str(model_to_load), sess_options=session_options,
                                                 providers=self.providers, provider_options=provider_options)
        except Exception as exc:
            if not graphs:
                raise
            # Graph capture needs every node on the CUDA EP (no If/Loop/Scan, no memcpy nodes): run eagerly.
            log.warning("%s: CUDA graphs refused by ONNX Runtime (%s); running without graphs", self._model_path,
                        exc)
            self._graphs_refused = True
            provider_options[0].pop("enable_cuda_graph")
            self._session = ort.InferenceSession(str(model_to_load), sess_options=session_options,
                                                 providers=self.providers, provider_options=provider_options)
        if cached is not None and model_to_load != cached and partial.exists():
            os.replace(partial, cached)
        self.providers = list(self._session.get_providers())
        self._inputs = [TensorSpec(i.name, ORT_TO_V2[i.type], _shape(i.shape)) for i in self._session.get_inputs()]
        self._outputs = [TensorSpec(o.name, ORT_TO_V2[o.type], _shape(o.shape)) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        if self._options.io_binding and self._options.batch_buckets:
            self._bound = self._bound_runner()
        log.info("loaded %s: %s", self._model_path, self.description)

    def _bound_runner(self) -> BoundRunner:
        on_gpu = self.providers[0] in (PROVIDER_IDS["cuda"], PROVIDER_IDS["tensorrt"])
        graphs = self._options.cuda_graphs and not self._graphs_refused and self.providers[0] == PROVIDER_IDS["cuda"]
        device_id = int(self._options.provider_options.get(self.providers[0], {}).get("device_id", 0))
        warm_shapes = self._options.warm_shapes
        if not warm_shapes and all(all(d >= 0 for d in i.shape[1:]) for i in self._inputs):
            # Fixed dimensions past the batch: one shape per batch bucket.
            warm_shapes = [{i.name: (size, *i.shape[1:]) for i in self._inputs}
                           for size in self._options.batch_buckets.sizes]
        return BoundRunner(self._session, output_names=self._output_names, buckets=self._options.batch_buckets,
                           device="cuda" if on_gpu else "cpu", device_id=device_id, cuda_graphs=graphs,
                           max_graphs=self._options.max_graphs, warm_shapes=warm_shapes,
                           input_dtypes={i.name: i.dtype for i in self._inputs})

    def prepare_thread(self) -> None:
        """Bind (and capture the CUDA graph of) every warm shape on the calling thread, the one that will run the
        engine; nothing without IOBinding."""
        if self._bound is not None:
            self._bound.prepare_thread()

    def _optimized_cache_path(self, runtime_version: str) -> Path | None:
        directory = self._options.optimized_model_dir
        if directory is None or self._options.graph_optimization_level == "disable":
            return None
        # The optimized graph depends on the model bytes, the level, the providers and the runtime version.
        digest = hashlib.sha256()
        with open(self._model_path, "rb") as model_file:
            for block in iter(lambda: model_file.read(1 << 20), b""):
                digest.update(block)
        digest.update(f"{self._options.graph_optimization_level}|{','.join(self.providers)}|{runtime_version}".encode())
        return Path(directory) / f"{self._model_path.stem}-{digest.hexdigest()[:24]}.onnx"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session once; returns every output by name."""
        if self._session is None:
            raise RuntimeError("engine is not loaded")
        if self._bound is not None:
            return self._bound.run(inputs)
        values = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        """Drop the session and its bound buffers."""
        if self._bound is not None:
            self._bound.close()
            self._bound = None
        self._session = None

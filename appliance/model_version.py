"""One loaded model version: its engines, the tensors it serves, input checks, warmup and its batcher."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from appliance.config import Config, ConfigError
from appliance.engines.base import Engine
from appliance.engines.batcher import DynamicBatcher
from appliance.engines.tensors import NUMPY_TO_V2, TensorSpec
from appliance.errors import BadRequest
from appliance.model_spec import ModelSpec, TensorSection
from appliance.telemetry import VersionMetrics

log = logging.getLogger("appliance.models")

EngineFactory = Callable[[ModelSpec, Config], Engine]


@dataclass(frozen=True, slots=True)
class ServedTensor:
    """A tensor as clients see it; ``dims`` leave out the batch dimension when the model batches."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    max_dims: tuple[int, ...] = ()

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype."""
        return TensorSpec(self.name, self.datatype, self.dims).dtype


class ModelVersion:
    """A version of a model, from load through warmup to serving and unload."""

    def __init__(self, spec: ModelSpec, config: Config, engine_factory: EngineFactory, metrics: VersionMetrics):
        self.spec = spec
        self._config = config
        self._engine_factory = engine_factory
        self.metrics = metrics
        self.engines: list[Engine] = []
        self.inputs: list[ServedTensor] = []
        self.outputs: list[ServedTensor] = []
        self._inputs_by_name: dict[str, ServedTensor] = {}
        self.batcher: DynamicBatcher | None = None
        self.ready = False

    @property
    def name(self) -> str:
        """The model's name."""
        return self.spec.name

    @property
    def version(self) -> int:
        """The version number."""
        return self.spec.version

    @property
    def max_batch_size(self) -> int:
        """Triton's ``max_batch_size``: 0 when the model has no batch dimension."""
        return self.spec.batching.max_batch_size

    @property
    def default_timeout_s(self) -> float | None:
        """The timeout a request gets when it sets none; ``None`` for no deadline."""
        ms = self.spec.batching.default_timeout_ms
        if ms < 0:
            ms = self._config.batching.default_timeout_ms
        return ms / 1000 if ms > 0 else None

    # -- load ----------------------------------------------------------------------------------------------------

    def load_blocking(self) -> float:
        """Create the engine instances and check the tensors; runs in a worker thread. Returns seconds taken."""
        started = time.perf_counter()
        try:
            for _ in range(self.spec.engine.instances):
                engine = self._engine_factory(self.spec, self._config)
                engine.load()
                self.engines.append(engine)
            self.inputs = self._served(self.engines[0].inputs, self.spec.inputs, "inputs")
            self.outputs = self._served(self.engines[0].outputs, self.spec.outputs, "outputs")
        except Exception:
            self.close_engines()
            raise
        self._inputs_by_name = {t.name: t for t in self.inputs}
        return time.perf_counter() - started

    def _served(self, model_tensors: list[TensorSpec], declared: list[TensorSection], kind: str) -> list[ServedTensor]:
        origin = f"{self.spec.path / 'model.toml'}"
        batching = self.max_batch_size > 0
        if batching:
            for tensor in model_tensors:
                if not tensor.shape or tensor.shape[0] != -1:
                    raise ConfigError(
                        f"{origin}: max_batch_size = {self.max_batch_size} but {kind[:-1]} {tensor.name} has shape "
                        f"{list(tensor.shape)}; its first dimension must be variable, or set max_batch_size = 0"
                    )
        served = {t.name: ServedTensor(t.name, t.datatype, t.shape[1:] if batching else t.shape) for t in model_tensors}
        if not declared:
            return list(served.values())
        declared_names = {d.name for d in declared}
        if declared_names != set(served):
            raise ConfigError(
                f"{origin}: [[{kind}]] names {sorted(declared_names)} do not match the model's {sorted(served)}"
            )
        result = []
        for section in declared:
            model_tensor = served[section.name]
            if section.datatype != model_tensor.datatype:
                raise ConfigError(
                    f"{origin}: {kind} {section.name} is declared {section.datatype} but the model has "
                    f"{model_tensor.datatype}"
                )
            dims = tuple(section.dims) if section.dims else model_tensor.dims
            narrows = len(dims) == len(model_tensor.dims) and all(
                have in (-1, want) for have, want in zip(model_tensor.dims, dims)
            )
            if not narrows:
                raise ConfigError(
                    f"{origin}: {kind} {section.name} dims {list(dims)} do not fit the model's {list(model_tensor.dims)}"
                )
            result.append(ServedTensor(section.name, section.datatype, dims, tuple(section.max_dims)))
        return result

    def warmup_blocking(self) -> float:
        """Run the configured warmup requests on every engine instance; runs in a worker thread."""
        started = time.perf_counter()
        warmup = self.spec.warmup
        sizes = warmup.batch_sizes or sorted({1, max(self.max_batch_size, 1)})
        rng = np.random.default_rng(0)
        for engine in self.engines:
            for size in sizes:
                inputs = {t.name: self._warmup_array(t, size, warmup.values, rng) for t in self.inputs}
                for _ in range(warmup.runs):
                    outputs = engine.run(inputs)
                    missing = [t.name for t in self.outputs if t.name not in outputs]
                    if missing:
                        raise RuntimeError(f"warmup run did not produce outputs {missing}")
        return time.perf_counter() - started

    def _warmup_array(self, tensor: ServedTensor, size: int, values: str, rng: np.random.Generator) -> np.ndarray:
        dims = [d if d >= 0 else (tensor.max_dims[i] if tensor.max_dims else 1) for i, d in enumerate(tensor.dims)]
        shape = ([size] if self.max_batch_size > 0 else []) + dims
        if tensor.datatype == "BYTES":
            return np.full(shape, b"", dtype=object)
        if values == "random" and tensor.dtype.kind == "f":
            return rng.standard_normal(shape).astype(tensor.dtype)
        return np.zeros(shape, dtype=tensor.dtype)

    def start(self) -> None:
        """Start serving: create the batcher on the running loop."""
        batching = self.spec.batching
        self.batcher = DynamicBatcher(
            self.engines,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=batching.preferred_batch_size,
            max_queue_size=batching.max_queue_size or self._config.batching.max_queue_size,
            on_batch=self.metrics.observe_batch,
            name=f"{self.name}/{self.version}",
        )
        self.batcher.start()
        self.ready = True

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, let the queued and running ones finish, then release the engines."""
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close(timeout_s)
        await asyncio.get_running_loop().run_in_executor(None, self.close_engines)

    def close_engines(self) -> None:
        """Release every engine instance."""
        for engine in self.engines:
            engine.close()
        self.engines = []

    # -- requests ------------------------------------------------------------------------------------------------

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`BadRequest` naming the input and the expected and received shape or dtype."""
        expected = self._inputs_by_name
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise BadRequest(
                f"unknown input {unknown[0]!r} for model {self.name}; its inputs are {sorted(expected)}"
            )
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise BadRequest(f"missing input {missing[0]!r} for model {self.name}; it needs {sorted(expected)}")
        rows = None
        for name, array in inputs.items():
            tensor = expected[name]
            if array.dtype != tensor.dtype:
                received = NUMPY_TO_V2.get(array.dtype, str(array.dtype))
                raise BadRequest(f"input {name!r}: expected datatype {tensor.datatype}, received {received}")
            self._check_shape(tensor, array.shape)
            if self.max_batch_size > 0:
                if rows is not None and array.shape[0] != rows:
                    raise BadRequest(
                        f"input {name!r} has batch size {array.shape[0]} but other inputs have {rows}; "
                        "every input needs the same first dimension"
                    )
                rows = array.shape[0]

    def _check_shape(self, tensor: ServedTensor, shape: tuple[int, ...]) -> None:
        expected = list(tensor.dims)
        if self.max_batch_size > 0:
            expected_text = f"[-1{''.join(f',{d}' for d in expected)}] with batch size 1 to {self.max_batch_size}"
            if not shape or not 1 <= shape[0] <= self.max_batch_size:
                raise BadRequest(f"input {tensor.name!r}: expected shape {expected_text}, received {list(shape)}")
            dims = shape[1:]
        else:
            expected_text = str(expected)
            dims = shape
        fits = len(dims) == len(expected) and all(want in (-1, got) for want, got in zip(expected, dims))
        if not fits:
            raise BadRequest(f"input {tensor.name!r}: expected shape {expected_text}, received {list(shape)}")
        for axis, (limit, got) in enumerate(zip(tensor.max_dims, dims)):
            if got > limit:
                raise BadRequest(
                    f"input {tensor.name!r}: dimension {axis} is {got}, over the model's limit of {limit}"
                )

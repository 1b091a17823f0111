"""Model versions that run on engines (tensor and embedding models): engine instances, served tensors, warmup."""

from __future__ import annotations

import time

import numpy as np

from appliance.config import Config
from appliance.engine_registry import Runtimes
from appliance.engines.runtime_choice import CPU_CHOICE, RuntimeChoice
from appliance.model_spec import ModelSpec
from appliance.models.base import ModelVersion
from appliance.models.served_tensors import ServedTensor, served_tensors
from appliance.telemetry import VersionMetrics


class EngineModel(ModelVersion):
    """A version served by ``[engine] instances`` engines made by the engine factory."""

    def __init__(self, spec: ModelSpec, config: Config, metrics: VersionMetrics, runtimes: Runtimes) -> None:
        super().__init__(spec, config, metrics, runtimes)
        self._engine_factory = runtimes.engines

    @property
    def description(self) -> str:
        """The first engine's runtime, providers and threads."""
        return self.engines[0].description if self.engines else "no engine"

    @property
    def runtime(self) -> RuntimeChoice:
        """The choice the engine factory made (engines from injected factories report ONNX Runtime on the CPU)."""
        choice = getattr(self.engines[0], "choice", None) if self.engines else None
        return choice if isinstance(choice, RuntimeChoice) else CPU_CHOICE

    def _load(self) -> None:
        for _ in range(self.spec.engine.instances):
            engine = self._engine_factory(self.spec, self._config)
            engine.load()
            self.engines.append(engine)
        model_toml = self.spec.path / "model.toml"
        first = self.engines[0]
        self.inputs = served_tensors(first.inputs, self.spec.inputs, "inputs", max_batch_size=self.max_batch_size,
                                     model_toml=model_toml)
        self.outputs = served_tensors(first.outputs, self.spec.outputs, "outputs",
                                      max_batch_size=self.max_batch_size, model_toml=model_toml)
        self._inputs_by_name = {t.name: t for t in self.inputs}
        self.output_datatypes = {t.name: t.datatype for t in self.outputs}

    def _warmup(self) -> None:
        """The configured warmup requests on every engine instance, largest batch last."""
        warmup = self.spec.warmup
        sizes = warmup.batch_sizes or sorted({1, max(self.max_batch_size, 1)})
        rng = np.random.default_rng(0)
        for engine in self.engines:
            for size in sizes:
                inputs = {t.name: self._warmup_array(t, size, warmup.values, rng) for t in self.inputs}
                for _ in range(warmup.runs):
                    run_started = time.perf_counter()
                    outputs = engine.run(inputs)
                    self.warm_run_s = time.perf_counter() - run_started
                    missing = [t.name for t in self.outputs if t.name not in outputs]
                    if missing:
                        raise RuntimeError(f"warmup run did not produce outputs {missing}")

    def _warmup_array(self, tensor: ServedTensor, size: int, values: str, rng: np.random.Generator) -> np.ndarray:
        dims = [d if d >= 0 else (tensor.max_dims[i] if tensor.max_dims else 1) for i, d in enumerate(tensor.dims)]
        shape = ([size] if self.max_batch_size > 0 else []) + dims
        if tensor.datatype == "BYTES":
            return np.full(shape, b"", dtype=object)
        if values == "random" and tensor.dtype.kind == "f":
            return rng.standard_normal(shape).astype(tensor.dtype)
        return np.zeros(shape, dtype=tensor.dtype)

    def close(self) -> None:
        """Release every engine instance."""
        for engine in self.engines:
            engine.close()
        self.engines = []

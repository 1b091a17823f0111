"""One loaded model version: its engines, the tensors it serves, input checks, warmup and its batcher."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Config, ConfigError
from appliance.engines.base import Engine
from appliance.engines.batcher import DynamicBatcher
from appliance.engines.generation import GenerationLimits, GenerationScheduler, KVDecoder
from appliance.engines.token_batcher import TokenBudgetBatcher
from appliance.engines.tensors import NUMPY_TO_V2, TensorSpec, numpy_dtype
from appliance.errors import BadRequest
from appliance.model_spec import ModelSpec, TensorSection
from appliance.telemetry import VersionMetrics
from appliance.engines.tokenizer import TextEncoder

log = logging.getLogger("appliance.models")

EngineFactory = Callable[[ModelSpec, Config], Engine]


@dataclass(frozen=True, slots=True)
class ServedTensor:
    """A tensor as clients see it; ``dims`` leave out the batch dimension when the model batches."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    max_dims: tuple[int, ...] = ()
    dtype: np.dtype = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", numpy_dtype(self.datatype))

    def fits(self, dims: tuple[int, ...]) -> bool:
        """Whether concrete dimensions (batch dimension removed) match ``dims``."""
        if len(dims) != len(self.dims):
            return False
        for want, got in zip(self.dims, dims):
            if want != -1 and want != got:
                return False
        return True

    def over_limit(self, dims: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The first (axis, size, limit) where ``dims`` exceed ``max_dims``, if any."""
        for axis, (got, limit) in enumerate(zip(dims, self.max_dims)):
            if got > limit:
                return axis, got, limit
        return None


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of every file under ``folder``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


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
        self.output_datatypes: dict[str, str] = {}
        self.batcher: DynamicBatcher | None = None
        self.embedder: TokenBudgetBatcher | None = None
        self.loaded_at = time.time()
        self.generator: GenerationScheduler | None = None
        self.decoder: KVDecoder | None = None
        self.generation: dict = {}
        self.generation_limits: GenerationLimits | None = None
        self.chat_template: Any = None
        self.text: TextEncoder | None = None
        self.ready = False
        self.build_hash = ""  # sha256 over the version folder's files: part of every response cache key
        self.warm_run_s = 0.0  # the last warmup run (the largest batch, warm): a first service-time estimate

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
        self.build_hash = folder_digest(self.spec.path)
        if self.spec.task == "generate":
            self._load_decoder()
            return time.perf_counter() - started
        try:
            for _ in range(self.spec.engine.instances):
                engine = self._engine_factory(self.spec, self._config)
                engine.load()
                self.engines.append(engine)
            self.inputs = self._served(self.engines[0].inputs, self.spec.inputs, "inputs")
            self.outputs = self._served(self.engines[0].outputs, self.spec.outputs, "outputs")
            if self.spec.task in ("embed", "generate"):
                self.text = TextEncoder.from_file(self.spec.path / self.spec.tokenizer.file,
                                                  self.spec.tokenizer.max_seq_length)
            if self.spec.task == "embed":
                self._check_encoder_contract()
        except Exception:
            self.close_engines()
            raise
        self._inputs_by_name = {t.name: t for t in self.inputs}
        self.output_datatypes = {t.name: t.datatype for t in self.outputs}
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
        if self.spec.task == "generate":
            return 0.0  # warmed up with the decoder, which owns the KV buffers
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
        return time.perf_counter() - started

    def _warmup_array(self, tensor: ServedTensor, size: int, values: str, rng: np.random.Generator) -> np.ndarray:
        dims = [d if d >= 0 else (tensor.max_dims[i] if tensor.max_dims else 1) for i, d in enumerate(tensor.dims)]
        shape = ([size] if self.max_batch_size > 0 else []) + dims
        if tensor.datatype == "BYTES":
            return np.full(shape, b"", dtype=object)
        if values == "random" and tensor.dtype.kind == "f":
            return rng.standard_normal(shape).astype(tensor.dtype)
        return np.zeros(shape, dtype=tensor.dtype)

    def _load_decoder(self) -> None:
        spec = self.spec
        self.generation = json.loads((spec.path / spec.generation.config).read_text())
        from appliance.build.gguf_tokenizer import compile_chat_template

        self.chat_template = compile_chat_template((spec.path / spec.generation.chat_template).read_text())
        self.text = TextEncoder.from_file(spec.path / spec.tokenizer.file, spec.tokenizer.max_seq_length)
        self.generation_limits = GenerationLimits(
            slots=spec.generation.max_running,
            capacity=min(spec.generation.kv_capacity, int(self.generation["max_seq_len"])),
            prefill_chunk=spec.generation.prefill_chunk,
            max_waiting=spec.generation.max_waiting,
        )
        threads = spec.engine.intra_op_threads
        threads = self._config.onnxruntime.intra_op_threads if threads < 0 else threads
        self.decoder = KVDecoder(spec.model_file, self.generation, self.generation_limits, threads,
                                 dense_batches=spec.generation.dense_batches, spin=spec.generation.spin_threads)
        # Warm up: a short prefill and one decode step on slot 0 (its cache is rewritten by the first request).
        logits = self.decoder.run(0, np.ones((1, 8), np.int64), np.array([7], np.int32))
        self.decoder.run(0, np.array([[int(logits[0].argmax())]]), np.array([8], np.int32))

    @property
    def description(self) -> str:
        """The runtime behind this version, for logs."""
        if self.decoder is not None and self.generation_limits is not None:
            limits = self.generation_limits
            return (f"onnxruntime decoder with a shared KV cache: {limits.slots} rows x {limits.capacity} tokens, "
                    f"prefill chunk {limits.prefill_chunk}")
        return self.engines[0].description if self.engines else "no engine"

    @property
    def context_limit(self) -> int:
        """Tokens a generate model's sequence may hold: prompt plus output."""
        return self.generation_limits.capacity if self.generation_limits else 0

    def _check_encoder_contract(self) -> None:
        names = sorted(t.name for t in self.inputs)
        if names != ["attention_mask", "input_ids"] or len(self.outputs) != 1:
            raise ConfigError(
                f"embedding model {self.name}: inputs must be input_ids and attention_mask and there must be one "
                f"output; found inputs {names} and outputs {[t.name for t in self.outputs]}"
            )

    def start(self) -> None:
        """Start serving: create the scheduler on the running loop."""
        batching = self.spec.batching
        if self.spec.task == "generate":
            assert self.decoder is not None and self.generation_limits is not None
            eos = [int(t) for t in self.generation.get("eos_token_ids", [])]
            self.generator = GenerationScheduler(self.decoder, self.generation_limits, eos,
                                                 on_step=self.metrics.observe_generation,
                                                 name=f"{self.name}/{self.version}")
            self.generator.start()
            self.ready = True
            return
        if self.spec.task == "embed":
            self.embedder = TokenBudgetBatcher(
                self.engines,
                output=self.outputs[0].name,
                max_batch_tokens=batching.max_batch_tokens,
                max_batch_size=max(batching.max_batch_size, 1),
                max_wait_s=batching.max_queue_delay_microseconds / 1e6,
                max_queue_items=batching.max_queue_size or self._config.batching.max_queue_size,
                pad_id=self.text.pad_id if self.text else 0,
                on_batch=lambda items, padded, compute_s: self.metrics.observe_batch(items, compute_s),
                name=f"{self.name}/{self.version}",
            )
            self.embedder.start()
            self.ready = True
            return
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
        if self.embedder is not None:
            await self.embedder.close(timeout_s)
        if self.generator is not None:
            await self.generator.close(timeout_s)
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
        if len(inputs) != len(expected) or any(name not in expected for name in inputs):
            self._raise_for_names(inputs)
        batching = self.max_batch_size > 0
        rows = None
        for name, array in inputs.items():
            tensor = expected[name]
            if array.dtype != tensor.dtype:
                received = NUMPY_TO_V2.get(array.dtype, str(array.dtype))
                raise BadRequest(f"input {name!r}: expected datatype {tensor.datatype}, received {received}")
            shape = array.shape
            dims = shape[1:] if batching else shape
            if (batching and not (shape and 1 <= shape[0] <= self.max_batch_size)) or not tensor.fits(dims):
                raise BadRequest(
                    f"input {name!r}: expected shape {self._describe_shape(tensor)}, received {list(shape)}"
                )
            if tensor.max_dims and (excess := tensor.over_limit(dims)) is not None:
                axis, size, limit = excess
                raise BadRequest(
                    f"input {name!r}: dimension {axis + int(batching)} is {size}, over the model's limit of {limit}"
                )
            if batching:
                if rows is not None and shape[0] != rows:
                    raise BadRequest(
                        f"input {name!r} has batch size {shape[0]} but other inputs have {rows}; "
                        "every input needs the same first dimension"
                    )
                rows = shape[0]

    def _raise_for_names(self, inputs: Mapping[str, np.ndarray]) -> None:
        expected = self._inputs_by_name
        unknown = [name for name in inputs if name not in expected]
        if unknown:
            raise BadRequest(f"unknown input {unknown[0]!r} for model {self.name}; its inputs are {sorted(expected)}")
        missing = [name for name in expected if name not in inputs]
        raise BadRequest(f"missing input {missing[0]!r} for model {self.name}; it needs {sorted(expected)}")

    def _describe_shape(self, tensor: ServedTensor) -> str:
        dims = [str(d) for d in tensor.dims]
        limits = f" (limits {list(tensor.max_dims)})" if tensor.max_dims else ""
        if self.max_batch_size > 0:
            return f"[{','.join(['-1', *dims])}] with batch size 1 to {self.max_batch_size}{limits}"
        return f"[{','.join(dims)}]{limits}"

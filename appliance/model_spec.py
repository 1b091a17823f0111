"""``model.toml``: the declaration of one model version in the repository (schema in the README)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import (
    OPTIMIZATION_LEVELS,
    PROVIDER_NAMES,
    ConfigError,
    limits,
    apply_table,
    check_value,
)
from appliance.engines.tensors import V2_TO_NUMPY

TASKS = ("tensor", "embed", "generate")
TIERS = ("", "small", "mid")
ENGINE_KINDS = ("onnxruntime",)


@dataclass
class EngineSection:
    """``[engine]``: which runtime loads which file, and its session options (empty: the server default)."""

    kind: str = field(default="onnxruntime", metadata=limits(choices=ENGINE_KINDS))
    file: str = "model.onnx"
    providers: list[str] = field(default_factory=list, metadata=limits(choices=PROVIDER_NAMES))
    intra_op_threads: int = field(default=-1, metadata=limits(-1, 1024))
    inter_op_threads: int = field(default=-1, metadata=limits(-1, 1024))
    graph_optimization_level: str = field(default="", metadata=limits(choices=("",) + OPTIMIZATION_LEVELS))
    instances: int = field(default=1, metadata=limits(1, 64))


@dataclass
class BatchingSection:
    """``[batching]``, with Triton's meanings: ``max_batch_size`` 0 means the model has no batch dimension."""

    max_batch_size: int = field(default=0, metadata=limits(0, 1_000_000))
    max_queue_delay_microseconds: int = field(default=0, metadata=limits(0, 60_000_000))
    preferred_batch_size: list[int] = field(default_factory=list, metadata=limits(1))
    max_queue_size: int = field(default=0, metadata=limits(0, 1_000_000))  # 0: the server default
    max_batch_tokens: int = field(default=8192, metadata=limits(1, 10_000_000))  # embed: padded tokens per batch
    default_timeout_ms: float = field(default=-1.0, metadata=limits(-1))  # -1: the server default


@dataclass
class TensorSection:
    """``[[inputs]]`` / ``[[outputs]]``: a tensor as served. ``dims`` leave out the batch dimension when batching."""

    name: str = ""
    datatype: str = field(default="", metadata=limits(choices=tuple(V2_TO_NUMPY)))
    dims: list[int] = field(default_factory=list, metadata=limits(-1))
    max_dims: list[int] = field(default_factory=list, metadata=limits(1))


@dataclass
class WarmupSection:
    """``[warmup]``: requests run on a new version before it takes traffic."""

    runs: int = field(default=1, metadata=limits(0, 1000))
    batch_sizes: list[int] = field(default_factory=list, metadata=limits(1))  # empty: 1 and max_batch_size
    values: str = field(default="zeros", metadata=limits(choices=("zeros", "random")))


@dataclass
class TokenizerSection:
    """``[tokenizer]``: the ``tokenizers`` file of a text model and its input limit."""

    file: str = "tokenizer.json"
    max_seq_length: int = field(default=0, metadata=limits(0, 10_000_000))  # 0: no text input


@dataclass
class EmbeddingSection:
    """``[embedding]``: what an embedding model returns."""

    dimensions: int = field(default=0, metadata=limits(0, 1_000_000))
    pooling: str = field(default="mean", metadata=limits(choices=("mean", "cls", "max")))
    normalize: bool = True
    truncatable: bool = False  # whether a request may ask for fewer dimensions (Matryoshka-trained models)


@dataclass
class GenerationSection:
    """``[generation]``: files that describe a decoder (shapes, special tokens) and its chat template."""

    config: str = "generation.json"
    chat_template: str = "chat_template.jinja"
    context_length: int = field(default=0, metadata=limits(0, 10_000_000))
    max_running: int = field(default=16, metadata=limits(1, 1024))  # KV-cache rows: sequences decoding at once
    kv_capacity: int = field(default=2048, metadata=limits(16, 1_000_000))  # tokens per row (prompt + output)
    prefill_chunk: int = field(default=256, metadata=limits(1, 1_000_000))  # prompt tokens per step, at most
    max_waiting: int = field(default=64, metadata=limits(0, 1_000_000))
    # Multi-row calls through a float32-weight twin of a 4-bit graph: faster batches for ~4 bytes per weight of RAM.
    dense_batches: bool = False
    spin_threads: bool = True  # ONNX Runtime threads spin between a step's parallel regions (faster, busier)


@dataclass
class CostSection:
    """``[cost]``: rates used for cost attribution."""

    per_request: float = field(default=0.0, metadata=limits(0))
    per_compute_second: float = field(default=0.0, metadata=limits(0))
    per_million_input_tokens: float = field(default=0.0, metadata=limits(0))
    per_million_output_tokens: float = field(default=0.0, metadata=limits(0))


@dataclass
class ModelSpec:
    """One version of one model, as declared by its ``model.toml``."""

    name: str
    version: int
    path: Path
    task: str = field(default="tensor", metadata=limits(choices=TASKS))
    description: str = ""
    tier: str = field(default="", metadata=limits(choices=TIERS))
    aliases: list[str] = field(default_factory=list)
    deterministic: bool = True
    engine: EngineSection = field(default_factory=EngineSection)
    batching: BatchingSection = field(default_factory=BatchingSection)
    inputs: list[TensorSection] = field(default_factory=list)
    outputs: list[TensorSection] = field(default_factory=list)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    cost: CostSection = field(default_factory=CostSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    embedding: EmbeddingSection = field(default_factory=EmbeddingSection)
    generation: GenerationSection = field(default_factory=GenerationSection)

    @property
    def model_file(self) -> Path:
        """The engine's artifact."""
        return self.path / self.engine.file


_SCALARS = {
    "task": ("str", limits(choices=TASKS)),
    "description": ("str", limits()),
    "tier": ("str", limits(choices=TIERS)),
    "aliases": ("list[str]", limits()),
    "deterministic": ("bool", limits()),
}
_TABLES = {
    "engine": EngineSection,
    "batching": BatchingSection,
    "warmup": WarmupSection,
    "cost": CostSection,
    "tokenizer": TokenizerSection,
    "embedding": EmbeddingSection,
    "generation": GenerationSection,
}


def read_model_spec(name: str, version: int, folder: Path) -> ModelSpec:
    """Parse and check ``folder/model.toml``; raise :class:`ConfigError` naming the field and what is allowed."""
    file = folder / "model.toml"
    origin = str(file)
    try:
        raw: dict[str, Any] = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file} is missing: every version folder needs a model.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}") from None
    spec = ModelSpec(name=name, version=version, path=folder)
    for key, value in raw.items():
        if key in _SCALARS:
            kind, limits = _SCALARS[key]
            setattr(spec, key, check_value(key, value, kind, limits, origin))
        elif key in _TABLES:
            apply_table(getattr(spec, key), key, value, origin)
        elif key in ("inputs", "outputs"):
            setattr(spec, key, _tensor_sections(key, value, origin))
        elif key == "name":
            if value != name:
                raise ConfigError(f"name = {value!r} in {origin} differs from the folder name {name!r}; rename one")
        else:
            allowed = ", ".join(["name", *_SCALARS, *_TABLES, "inputs", "outputs"])
            raise ConfigError(f"unknown key {key!r} in {origin}; model.toml has: {allowed}")
    _check_consistency(spec, origin)
    return spec


def _tensor_sections(key: str, value: Any, origin: str) -> list[TensorSection]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} in {origin} must be an array of tables ([[{key}]])")
    sections = []
    for index, table in enumerate(value):
        section = TensorSection()
        apply_table(section, f"{key}[{index}]", table, origin)
        if not section.name or not section.datatype:
            raise ConfigError(f"{key}[{index}] in {origin} needs both name and datatype")
        if section.max_dims and len(section.max_dims) != len(section.dims):
            raise ConfigError(f"{key}[{index}].max_dims in {origin} must have one entry per entry of dims")
        sections.append(section)
    return sections


def _check_consistency(spec: ModelSpec, origin: str) -> None:
    batching = spec.batching
    too_big = [size for size in batching.preferred_batch_size if size > batching.max_batch_size]
    if too_big:
        raise ConfigError(
            f"batching.preferred_batch_size = {batching.preferred_batch_size} in {origin}: sizes {too_big} exceed "
            f"max_batch_size = {batching.max_batch_size}"
        )
    if batching.max_batch_size == 0 and batching.max_queue_delay_microseconds:
        raise ConfigError(
            f"batching.max_queue_delay_microseconds in {origin} needs max_batch_size > 0 (0 means no batching)"
        )
    if spec.task == "embed" and (spec.tokenizer.max_seq_length <= 0 or batching.max_batch_size <= 0):
        raise ConfigError(
            f"{origin}: task = 'embed' needs [tokenizer] max_seq_length > 0 and [batching] max_batch_size > 0"
        )
    big_warmups = [size for size in spec.warmup.batch_sizes if size > max(batching.max_batch_size, 1)]
    if big_warmups:
        raise ConfigError(f"warmup.batch_sizes = {spec.warmup.batch_sizes} in {origin} exceed max_batch_size")

"""``model.toml``: the declaration of one model version in the repository (schema in the README)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from msgspec import Meta

from appliance import validation
from appliance.config import ConfigError, OptimizationLevel, Provider
from appliance.engines.tensors import V2_TO_NUMPY

Task = Literal["tensor", "embed", "generate"]
Tier = Literal["", "small", "mid"]
TASKS: tuple[str, ...] = get_args(Task)
TIERS: tuple[str, ...] = get_args(Tier)
EngineKind = Literal["onnxruntime", "tensorrt", "auto"]
ENGINE_KINDS: tuple[str, ...] = get_args(EngineKind)
Datatype = Literal[tuple(V2_TO_NUMPY)]  # the KServe v2 datatype names the engines know


@dataclass
class EngineSection:
    """``[engine]``: which runtime loads which file, and its session options (empty: the server default)."""

    kind: EngineKind = "onnxruntime"  # "auto": a TensorRT plan for this GPU, else ONNX Runtime (GPU, else CPU)
    file: str = "model.onnx"
    # Decoders: the graph ONNX Runtime's CUDA execution provider runs (FP16; "": none, the CPU runs ``file``)
    cuda_file: str = ""
    providers: list[Provider] = field(default_factory=list)
    intra_op_threads: Annotated[int, Meta(ge=-1, le=1024)] = -1
    inter_op_threads: Annotated[int, Meta(ge=-1, le=1024)] = -1
    graph_optimization_level: Literal["", OptimizationLevel] = ""
    instances: Annotated[int, Meta(ge=1, le=64)] = 1
    # Shape buckets: a batch is padded up to the next batch bucket (empty: 1, 2, 4, ... up to max_batch_size) and,
    # for embedding models on bound buffers, its sequences up to the next sequence bucket (empty: 16, 32, ... up to
    # max_seq_length on a GPU; none on the CPU).
    batch_buckets: list[Annotated[int, Meta(ge=1)]] = field(default_factory=list)
    sequence_buckets: list[Annotated[int, Meta(ge=1)]] = field(default_factory=list)
    # Buffers bound once per bucket (ONNX Runtime IOBinding): "auto" binds on a GPU (where it is faster and CUDA
    # graphs need it) and not on the CPU (where it measures no faster: see the README).
    io_binding: bool | Literal["auto"] = "auto"
    cuda_graphs: bool = True  # a CUDA graph per bucket shape, where the model runs on the CUDA execution provider
    device_id: Annotated[int, Meta(ge=0, le=64)] = 0


@dataclass
class BatchingSection:
    """``[batching]``, with Triton's meanings: ``max_batch_size`` 0 means the model has no batch dimension."""

    max_batch_size: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    max_queue_delay_microseconds: Annotated[int, Meta(ge=0, le=60_000_000)] = 0
    preferred_batch_size: list[Annotated[int, Meta(ge=1)]] = field(default_factory=list)
    max_queue_size: Annotated[int, Meta(ge=0, le=1_000_000)] = 0  # 0: the server default
    max_batch_tokens: Annotated[int, Meta(ge=1, le=10_000_000)] = 8192  # embed: padded tokens per batch
    gpu_max_batch_tokens: Annotated[int, Meta(ge=0, le=10_000_000)] = 0  # embed, on a GPU (0: max_batch_tokens)
    default_timeout_ms: Annotated[float, Meta(ge=-1)] = -1.0  # -1: the server default
    # embed: every input runs as a call of its own, so its vector never depends on other requests (and is cached)
    reproducible: bool = False


@dataclass
class TensorSection:
    """``[[inputs]]`` / ``[[outputs]]``: a tensor as served. ``dims`` leave out the batch dimension when batching."""

    name: str = ""
    datatype: Datatype = ""  # "": not given
    dims: list[Annotated[int, Meta(ge=-1)]] = field(default_factory=list)
    max_dims: list[Annotated[int, Meta(ge=1)]] = field(default_factory=list)


@dataclass
class WarmupSection:
    """``[warmup]``: requests run on a new version before it takes traffic."""

    runs: Annotated[int, Meta(ge=0, le=1000)] = 1
    batch_sizes: list[Annotated[int, Meta(ge=1)]] = field(default_factory=list)  # empty: 1 and max_batch_size
    values: Literal["zeros", "random"] = "zeros"


@dataclass
class TokenizerSection:
    """``[tokenizer]``: the ``tokenizers`` file of a text model and its input limit."""

    file: str = "tokenizer.json"
    max_seq_length: Annotated[int, Meta(ge=0, le=10_000_000)] = 0  # 0: no text input


@dataclass
class EmbeddingSection:
    """``[embedding]``: what an embedding model returns."""

    dimensions: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    pooling: Literal["mean", "cls", "max"] = "mean"
    normalize: bool = True
    truncatable: bool = False  # whether a request may ask for fewer dimensions (Matryoshka-trained models)


@dataclass
class GenerationSection:
    """``[generation]``: files that describe a decoder (shapes, special tokens) and its chat template."""

    config: str = "generation.json"
    chat_template: str = "chat_template.jinja"
    context_length: Annotated[int, Meta(ge=0, le=10_000_000)] = 0
    max_running: Annotated[int, Meta(ge=1, le=1024)] = 16  # KV-cache rows: sequences decoding at once
    kv_capacity: Annotated[int, Meta(ge=16, le=1_000_000)] = 2048  # tokens per row (prompt + output)
    prefill_chunk: Annotated[int, Meta(ge=1, le=1_000_000)] = 256  # prompt tokens per step, at most
    max_waiting: Annotated[int, Meta(ge=0, le=1_000_000)] = 64
    # A new prompt starts from the longest prefix of it a KV-cache row holds (copied, not computed)
    prompt_cache: bool = True
    # Multi-row calls through a float32-weight twin of a 4-bit graph: faster batches for ~4 bytes per weight of RAM.
    dense_batches: bool = False
    # One-row steps of a float32 graph with split 8-bit weights (the exact tier's Q8_0 LM head): "split" as built,
    # "dense" (float32, 4 bytes a weight), or "timed" at load on this CPU (dense where clearly faster: AVX2 here)
    split_weights: Literal["timed", "split", "dense"] = "timed"
    spin_threads: bool = True  # ONNX Runtime threads spin between a step's parallel regions (faster, busier)
    # Every sequence runs as if alone (fixed prefill chunks, decode steps of its own): greedy and seeded requests
    # then give the same tokens whatever else runs, and are cached.
    reproducible: bool = False


@dataclass
class CostSection:
    """``[cost]``: rates used for cost attribution."""

    per_request: Annotated[float, Meta(ge=0)] = 0.0
    per_compute_second: Annotated[float, Meta(ge=0)] = 0.0
    per_million_input_tokens: Annotated[float, Meta(ge=0)] = 0.0
    per_million_output_tokens: Annotated[float, Meta(ge=0)] = 0.0


@dataclass
class ModelSpec:
    """One version of one model, as declared by its ``model.toml``."""

    name: str
    version: int
    path: Path
    task: Task = "tensor"
    description: str = ""
    tier: Tier = ""
    aliases: list[str] = field(default_factory=list)
    deterministic: bool = True  # proved batch-invariant: a request's answer never depends on what ran beside it
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
    if raw.get("name", name) != name:
        raise ConfigError(f"name = {raw['name']!r} in {origin} differs from the folder name {name!r}; rename one")
    raw.pop("name", None)
    try:
        spec = validation.build(ModelSpec, raw, name=name, version=version, path=folder)
    except validation.Invalid as exc:
        if exc.kind == "unknown" and len(exc.loc) == 1:
            allowed = ", ".join(["name", *exc.known])
            raise ConfigError(f"unknown key {exc.loc[0]!r} in {origin}; model.toml has: {allowed}") from None
        raise ConfigError(exc.message(origin)) from None
    for key in ("inputs", "outputs"):
        for index, section in enumerate(getattr(spec, key)):
            if not section.name or not section.datatype:
                raise ConfigError(f"{key}[{index}] in {origin} needs both name and datatype")
            if section.max_dims and len(section.max_dims) != len(section.dims):
                raise ConfigError(f"{key}[{index}].max_dims in {origin} must have one entry per entry of dims")
    _check_consistency(spec, origin)
    return spec


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
    engine = spec.engine
    if spec.task == "generate" and engine.kind == "tensorrt":
        raise ConfigError(f"engine.kind = 'tensorrt' in {origin}: decoders run on ONNX Runtime (their graphs use its "
                          "contrib operators, which TensorRT does not parse); set kind = 'auto' or 'onnxruntime'")
    if engine.cuda_file and spec.task != "generate":
        raise ConfigError(f"engine.cuda_file in {origin} is only for task = 'generate'; other models name one file "
                          "for every execution provider in engine.file")
    if engine.batch_buckets and max(engine.batch_buckets) > max(batching.max_batch_size, 1):
        raise ConfigError(f"engine.batch_buckets = {engine.batch_buckets} in {origin} exceed batching.max_batch_size "
                          f"= {batching.max_batch_size}; drop the larger sizes or raise max_batch_size")
    if engine.sequence_buckets and (spec.task != "embed"
                                    or max(engine.sequence_buckets) > spec.tokenizer.max_seq_length):
        raise ConfigError(f"engine.sequence_buckets = {engine.sequence_buckets} in {origin}: only for task = 'embed', "
                          f"at most [tokenizer] max_seq_length = {spec.tokenizer.max_seq_length}")
    big_warmups = [size for size in spec.warmup.batch_sizes if size > max(batching.max_batch_size, 1)]
    if big_warmups:
        raise ConfigError(f"warmup.batch_sizes = {spec.warmup.batch_sizes} in {origin} exceed max_batch_size")

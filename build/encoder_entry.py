"""Build an embedding model entry from a sentence-transformers folder: import, optimize, quantize, tensorrt."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.build import tensorrt_stage
from appliance.build.entries import (
    EntryResult,
    Progress,
    QualityBelowThreshold,
    StageReport,
    existing,
    new_version,
    publish,
    stage,
)
from appliance.build.fp16 import DEFAULT_MIN_COSINE
from appliance.engines.runtime_choice import PORTABLE_GRAPH
from appliance.build.optimize import optimize, quantize_int8
from appliance.build.parity import encoder_parity
from appliance.build.provenance import build_key, sha256_file
from appliance.build.st_encoder import import_encoder

SOURCE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json")


@dataclass
class EncoderOptions:
    """How to build an encoder entry."""

    optimize: bool = True
    optimization_level: str = "extended"
    min_cosine_optimized: float = 0.9999
    quantize: bool = False  # also write <name>-int8
    min_cosine_int8: float = 0.97
    tensorrt: bool = True
    min_cosine_fp16: float = DEFAULT_MIN_COSINE  # TensorRT 11's FP16 copy of the model against the float model
    max_batch_size: int = 32
    # Padded tokens a batch. Measured on a 2-core AVX-512 VM: 32 short (12-token) inputs a batch run fastest, and
    # 128-token inputs run ~15% faster four at a time than sixteen (activations past 512 tokens spill out of L2).
    max_batch_tokens: int = 512
    max_queue_delay_microseconds: int = 1000
    instances: int = 2  # measured here: two single-threaded workers beat one worker with two threads
    threads_per_instance: int = 1


def source_digest(folder: Path) -> str:
    """One sha256 over the files that define the encoder."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + sha256_file(folder / name).encode())
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        digest.update(sha256_file(pooling).encode())
    return digest.hexdigest()


def build_encoder_entry(folder: Path, repo: Path, name: str, options: EncoderOptions, progress: Progress,
                        source_label: str = "") -> list[EntryResult]:
    """Build ``name`` (and ``name-int8`` when asked) from ``folder``; entries already built are left alone."""
    digest = source_digest(folder)
    float_options = {k: v for k, v in asdict(options).items() if k not in ("quantize", "min_cosine_int8")}
    key = build_key(digest, float_options)
    source = {"kind": "sentence-transformers", "path": source_label or str(folder), "sha256": digest}
    done = existing(repo, name, key)
    results: list[EntryResult] = []
    if done is not None:
        progress(f"{name}: up to date (version {done.version})")
        results.append(done)
    else:
        results.append(_build_float(folder, repo, name, options, progress, key, source, float_options))
    if options.quantize:
        int8_key = build_key(digest, {**asdict(options), "variant": "int8"})
        done = existing(repo, f"{name}-int8", int8_key)
        if done is not None:
            progress(f"{name}-int8: up to date (version {done.version})")
            results.append(done)
        else:
            results.append(_build_int8(results[0].folder, repo, name, options, progress, int8_key, source))
    return results


def _build_float(folder: Path, repo: Path, name: str, options: EncoderOptions, progress: Progress, key: str,
                 source: dict, float_options: dict) -> EntryResult:
    stages: list[StageReport] = []
    with new_version(repo, name) as scratch:
        raw = scratch / "model.raw.onnx"
        with stage(stages, f"{name}: import sentence-transformers", progress, raw) as report:
            read = import_encoder(folder, scratch)
            (scratch / "model.onnx").rename(raw)
            report.figures = {"max_seq_length": read.max_seq_length, "pooling": read.pooling,
                              "normalize": read.normalize, "dimensions": read.dimensions}
        parity: dict = {}
        final = scratch / "model.onnx"
        if options.optimize:
            with stage(stages, f"{name}: optimize ({options.optimization_level})", progress, final) as report:
                optimize(raw, final, options.optimization_level)
                report.figures = encoder_parity(raw, final, scratch / "tokenizer.json", read.max_seq_length)
                parity["optimized_vs_import"] = report.figures
                if report.figures["min_cosine"] < options.min_cosine_optimized:
                    raise QualityBelowThreshold(
                        f"{name}: optimized graph min cosine {report.figures['min_cosine']:.6f} is below "
                        f"{options.min_cosine_optimized}; not written")
            if options.tensorrt:  # TensorRT parses standard ONNX only, not ONNX Runtime's fused operators
                raw.rename(scratch / PORTABLE_GRAPH)
            else:
                raw.unlink()
        else:
            raw.rename(final)
        portable = scratch / PORTABLE_GRAPH
        _tensorrt(options, portable if portable.exists() else final, scratch, stages, name, progress,
                  read.max_seq_length)
        return publish(scratch, name, key=key, source=source, options=float_options, parity=parity,
                       stages=stages, model_toml=_model_toml(read, options, source["path"]))


def _build_int8(float_folder: Path, repo: Path, name: str, options: EncoderOptions, progress: Progress, key: str,
                source: dict) -> EntryResult:
    stages: list[StageReport] = []
    int8_name = f"{name}-int8"
    with new_version(repo, int8_name) as scratch:
        target = scratch / "model.onnx"
        with stage(stages, f"{int8_name}: quantize (int8 weights, per channel)", progress, target) as report:
            quantize_int8(float_folder / "model.onnx", target, per_channel=True)
            shutil.copy2(float_folder / "tokenizer.json", scratch / "tokenizer.json")
            max_length = _max_length(float_folder)
            report.figures = encoder_parity(float_folder / "model.onnx", target, scratch / "tokenizer.json",
                                            max_length)
            if report.figures["min_cosine"] < options.min_cosine_int8:
                raise QualityBelowThreshold(
                    f"{int8_name}: min cosine {report.figures['min_cosine']:.4f} against the float model is below "
                    f"the threshold {options.min_cosine_int8}; not written")
        toml = (float_folder / "model.toml").read_text().replace(
            'description = "', 'description = "int8 weights (per channel) of ', 1)
        return publish(scratch, int8_name, key=key, source=source, options={**asdict(options), "variant": "int8"},
                       parity={"int8_vs_float": report.figures}, stages=stages, model_toml=toml)


def _max_length(folder: Path) -> int:
    import tomllib

    return int(tomllib.loads((folder / "model.toml").read_text())["tokenizer"]["max_seq_length"])


def _tensorrt(options: EncoderOptions, model: Path, scratch: Path, stages: list[StageReport], name: str,
              progress: Progress, max_length: int) -> None:
    if not options.tensorrt:
        return
    with stage(stages, f"{name}: tensorrt", progress) as report:
        buckets = encoder_buckets(options.max_batch_size, max_length)
        report.figures = tensorrt_stage.build_plan(model, scratch / "plans", buckets, progress,
                                                   min_cosine_fp16=options.min_cosine_fp16,
                                                   tokenizer=scratch / "tokenizer.json")


def encoder_buckets(max_batch_size: int, max_length: int) -> list[tensorrt_stage.Bucket]:
    """The shapes a TensorRT encoder plan is optimized for: one short row, a typical batch, the largest batch."""
    return [{"input_ids": (1, 1), "attention_mask": (1, 1)},
            {"input_ids": (max_batch_size, 128), "attention_mask": (max_batch_size, 128)},
            {"input_ids": (max_batch_size, max_length), "attention_mask": (max_batch_size, max_length)}]


def _model_toml(read, options: EncoderOptions, source_path: str) -> str:
    return f'''# Built by `appliance build` from {source_path}
task = "embed"
description = "sentence embeddings ({read.pooling} pooling{', normalized' if read.normalize else ''})"
# Not batch-invariant (bench/invariance.py): a row's vector changes with the rows it shares a call with, padded or
# not, float or int8. Cached only in the reproducible mode ([batching] reproducible, or x-appliance-reproducible).
deterministic = false

[engine]
# auto: this machine's TensorRT plan (plans/), else ONNX Runtime on the GPU (CUDA graphs per bucket), else the CPU
kind = "auto"
file = "model.onnx"
instances = {options.instances}
intra_op_threads = {options.threads_per_instance}

[batching]
max_batch_size = {options.max_batch_size}
max_batch_tokens = {options.max_batch_tokens}  # measured on a 2-core CPU
gpu_max_batch_tokens = {options.max_batch_size * read.max_seq_length}  # on a GPU: the TensorRT plans' largest bucket
max_queue_delay_microseconds = {options.max_queue_delay_microseconds}

[[inputs]]
name = "input_ids"
datatype = "INT64"
dims = [-1]
max_dims = [{read.max_seq_length}]

[[inputs]]
name = "attention_mask"
datatype = "INT64"
dims = [-1]
max_dims = [{read.max_seq_length}]

[tokenizer]
file = "tokenizer.json"
max_seq_length = {read.max_seq_length}

[embedding]
dimensions = {read.dimensions}
pooling = "{read.pooling}"
normalize = {str(read.normalize).lower()}

[warmup]
batch_sizes = [1, 8]
'''

"""The TensorRT stage: a serialized engine per machine, where the ``tensorrt`` package imports.

Optimization profiles come from the model's shape buckets; a timing cache is kept beside the plans; the plan's file
name carries the plan key (``appliance.engines.tensorrt_plans``: GPU name, compute capability and TensorRT version),
so a new GPU, driver stack or TensorRT release builds a new plan instead of loading a stale one.
Where the GPU has fast FP16 the plan runs FP16: TensorRT 10 is given ``BuilderFlag.FP16`` and the FP32 model;
TensorRT 11 (strongly typed networks, no such flag: a plan runs the precision the ONNX model is written in) is given
an FP16 copy of the model (``appliance.build.fp16``), checked against the FP32 model before TensorRT sees it and
refused below ``min_cosine_fp16``, like the int8 tier.
Where ``tensorrt`` does not import (CPU-only machines), the stage says so in one line and the build goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance.build.fp16 import DEFAULT_MIN_COSINE, KEEP_FP32_OPS, check_min_cosine, convert_to_fp16, fp16_parity
from appliance.build.provenance import sha256_file
from appliance.engines.tensorrt_plans import Device, cuda_device, plan_key, tensorrt_module

Bucket = dict[str, tuple[int, ...]]  # input name -> shape


def build_plan(onnx_path: Path, plans_dir: Path, buckets: Sequence[Bucket], progress: Callable[[str], None], *,
               min_cosine_fp16: float = DEFAULT_MIN_COSINE, tokenizer: Path | None = None,
               keep_fp32_ops: Sequence[str] = KEEP_FP32_OPS,
               load_tensorrt: Callable[[], Any | None] = tensorrt_module,
               probe_device: Callable[[], Device | None] = cuda_device) -> dict[str, Any]:
    """Build ``plans_dir/<plan key>.plan`` from ``onnx_path``; returns figures for the provenance.

    ``load_tensorrt`` and ``probe_device`` give the installed ``tensorrt`` and the current CUDA device (tests
    inject fakes). With TensorRT 11 on a GPU with fast FP16, the plan is built from ``plans_dir/<model>.fp16.onnx``,
    written first and checked on the encoder parity texts (``tokenizer``, by default ``tokenizer.json`` beside the
    model, up to the longest bucket's length) against ``min_cosine_fp16``: below it,
    :class:`~appliance.build.entries.QualityBelowThreshold` and no plan. ``keep_fp32_ops``: the op types the copy
    keeps in FP32.

    The figures: ``precision`` (``fp16-onnx``: the FP16 copy, TensorRT 11; ``fp16-flag``: ``BuilderFlag.FP16`` on
    the FP32 model, TensorRT 10; ``fp32``: no fast FP16 here), ``fp16_parity`` (the copy's cosines, else ``None``),
    ``onnx`` and ``onnx_sha256`` (the file the plan was parsed from, relative to the version folder), ``key`` (the
    plan key) and ``plan``, and the GPU and TensorRT they were built for.
    """
    check_min_cosine(min_cosine_fp16)
    trt = load_tensorrt()
    if trt is None:
        progress("tensorrt: the tensorrt package is not installed here; skipping the engine build")
        return {"skipped": "tensorrt not installed"}
    device = probe_device()
    if device is None:
        progress("tensorrt: no CUDA device answers (cuda-python missing or no GPU); skipping the engine build")
        return {"skipped": "no CUDA device"}
    key = plan_key(device.name, device.capability, trt.__version__)
    plans_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11: every network is strongly typed, no flag needed
    fast_fp16 = _fast_fp16(builder, device)
    precision = ("fp16-onnx" if typed else "fp16-flag") if fast_fp16 else "fp32"
    source, copy_figures, parity = onnx_path, None, None
    texts = tokenizer or _beside(onnx_path, "tokenizer.json")
    if precision == "fp16-onnx" and texts is None:
        # A tensor model has no parity texts to check an FP16 copy on: it keeps the precision it is written in.
        progress(f"tensorrt: no tokenizer.json beside {onnx_path.name} to check an FP16 copy with; FP32 plan")
        precision = "fp32"
    if precision == "fp16-onnx":
        assert texts is not None
        source = plans_dir / f"{onnx_path.stem}.fp16.onnx"
        progress(f"tensorrt: writing the FP16 copy {source.name} for the strongly typed network")
        copy_figures = convert_to_fp16(onnx_path, source, keep_fp32_ops=keep_fp32_ops)
        try:
            parity = fp16_parity(onnx_path, source, texts, _longest(buckets), min_cosine_fp16, label=str(onnx_path))
        except BaseException:
            source.unlink(missing_ok=True)
            raise
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16-flag":
        config.set_flag(trt.BuilderFlag.FP16)
    cache_file = plans_dir / f"{key}.timing-cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        shapes = sorted((bucket[name] for bucket in buckets if name in bucket), key=lambda s: tuple(s))
        if shapes:
            profile.set_shape(name, shapes[0], shapes[len(shapes) // 2], shapes[-1])
    config.add_optimization_profile(profile)
    progress(f"tensorrt: building {key} ({precision}{', strongly typed' if typed else ''}) from {source.name}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {source}")
    plan = plans_dir / f"{key}.plan"
    plan.write_bytes(bytes(serialized))
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    figures = {"plan": plan.name, "key": key, "precision": precision, "fp16": precision != "fp32",
               "strongly_typed": typed, "onnx": _relative(source, plans_dir.parent),
               "onnx_sha256": sha256_file(source), "fp16_parity": parity, "gpu": device.name,
               "compute_capability": f"{device.capability[0]}.{device.capability[1]}", "tensorrt": trt.__version__}
    if copy_figures is not None:
        figures["fp16_copy"] = copy_figures
    return figures


def _fast_fp16(builder: Any, device: Device) -> bool:
    """Whether the GPU has fast FP16: TensorRT's answer where it still gives one (deprecated since 10), else by
    compute capability (every GPU TensorRT 11 supports, sm75 on, has it)."""
    answer = getattr(builder, "platform_has_fast_fp16", None)
    if answer is not None:
        return bool(answer)
    return device.capability >= (7, 0) or device.capability in ((5, 3), (6, 0), (6, 2))


def _longest(buckets: Sequence[Bucket]) -> int:
    """The longest sequence the plan is built for: the parity texts are cut there."""
    return max(shape[-1] for bucket in buckets for shape in bucket.values())


def _beside(model: Path, name: str) -> Path | None:
    path = model.with_name(name)
    return path if path.is_file() else None


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)

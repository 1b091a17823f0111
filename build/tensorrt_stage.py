"""The TensorRT stage: a serialized engine per machine, where the ``tensorrt`` package imports.

Optimization profiles come from the model's shape buckets; FP16 is enabled where the GPU has fast FP16; a timing
cache is kept beside the plans; the plan's file name carries the GPU name, compute capability and TensorRT
version, so a new GPU, driver stack or TensorRT release builds a new plan instead of loading a stale one.
Where ``tensorrt`` does not import (CPU-only machines), the stage says so in one line and the build goes on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Bucket = dict[str, tuple[int, ...]]  # input name -> shape


def plan_key(gpu_name: str, capability: tuple[int, int], trt_version: str) -> str:
    """``<gpu>-sm<major><minor>-trt<version>``, safe as a file name."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return f"{gpu}-sm{capability[0]}{capability[1]}-trt{trt_version}"


def current_plan_key() -> str | None:
    """The plan key of this machine's first GPU and TensorRT, or ``None`` where TensorRT or CUDA is missing."""
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    error, device = cudart.cudaGetDevice()
    if int(error) != 0:
        return None
    error, props = cudart.cudaGetDeviceProperties(device)
    if int(error) != 0:
        return None
    return plan_key(props.name.decode(errors="replace").rstrip("\x00"), (props.major, props.minor), trt.__version__)


def build_plan(onnx_path: Path, plans_dir: Path, buckets: Sequence[Bucket], progress: Callable[[str], None]
               ) -> dict[str, Any]:
    """Build ``plans_dir/<plan key>.plan`` from ``onnx_path``; returns figures for the provenance."""
    try:
        import tensorrt as trt
    except ImportError:
        progress("tensorrt: the tensorrt package is not installed here; skipping the engine build")
        return {"skipped": "tensorrt not installed"}
    from cuda.bindings import runtime as cudart  # cuda-python, part of the gpu extra

    error, device = cudart.cudaGetDevice()
    error, props = cudart.cudaGetDeviceProperties(device)
    gpu_name = props.name.decode(errors="replace").rstrip("\x00")
    key = plan_key(gpu_name, (props.major, props.minor), trt.__version__)
    plans_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    fp16 = bool(builder.platform_has_fast_fp16)
    if fp16:
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
    progress(f"tensorrt: building {key} (fp16={fp16})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    plan = plans_dir / f"{key}.plan"
    plan.write_bytes(bytes(serialized))
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"plan": plan.name, "fp16": fp16, "gpu": gpu_name, "compute_capability": f"{props.major}.{props.minor}",
            "tensorrt": trt.__version__}

"""The TensorRT stage: a serialized engine per machine, where the ``tensorrt`` package imports.

Optimization profiles come from the model's shape buckets; with TensorRT 10, FP16 is enabled where the GPU has fast
FP16 (TensorRT 11 networks are strongly typed and keep the ONNX model's precision); a timing cache is kept beside
the plans; the plan's file name carries the plan key (``appliance.engines.tensorrt_plans``: GPU name, compute
capability and TensorRT version), so a new GPU, driver stack or TensorRT release builds a new plan instead of
loading a stale one.
Where ``tensorrt`` does not import (CPU-only machines), the stage says so in one line and the build goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance.engines.tensorrt_plans import Device, cuda_device, plan_key, tensorrt_module

Bucket = dict[str, tuple[int, ...]]  # input name -> shape


def build_plan(onnx_path: Path, plans_dir: Path, buckets: Sequence[Bucket], progress: Callable[[str], None], *,
               load_tensorrt: Callable[[], Any | None] = tensorrt_module,
               probe_device: Callable[[], Device | None] = cuda_device) -> dict[str, Any]:
    """Build ``plans_dir/<plan key>.plan`` from ``onnx_path``; returns figures for the provenance.

    ``load_tensorrt`` and ``probe_device`` give the installed ``tensorrt`` and the current CUDA device (tests
    inject fakes).
    TensorRT 10 builds FP16 kernels where the GPU has fast FP16 (``BuilderFlag.FP16``). TensorRT 11 removed that
    flag: its networks are strongly typed, so the plan runs in the precision the ONNX model is written in.
    """
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
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    fp16 = not typed and bool(builder.platform_has_fast_fp16)
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
    progress(f"tensorrt: building {key} ({'strongly typed' if typed else f'fp16={fp16}'})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    plan = plans_dir / f"{key}.plan"
    plan.write_bytes(bytes(serialized))
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"plan": plan.name, "key": key, "fp16": fp16, "strongly_typed": typed, "gpu": device.name,
            "compute_capability": f"{device.capability[0]}.{device.capability[1]}", "tensorrt": trt.__version__}

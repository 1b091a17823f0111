"""Which TensorRT plan belongs to this machine: the plan key (GPU, compute capability, TensorRT version) that the
build names plans by and the runtime matches them with, so a stale plan (other GPU or TensorRT) is never loaded.

Imports TensorRT and cuda-python (the ``gpu`` extra) lazily; where either is missing there is no key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Device:
    """The CUDA device a plan is built for."""

    name: str
    capability: tuple[int, int]


def plan_key(gpu_name: str, capability: tuple[int, int], trt_version: str) -> str:
    """``<gpu>-sm<major><minor>-trt<version>``, safe as a file name."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return f"{gpu}-sm{capability[0]}{capability[1]}-trt{trt_version}"


def cuda_device() -> Device | None:
    """The current CUDA device, through cuda-python; ``None`` without cuda-python or a device."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    error, index = cudart.cudaGetDevice()
    if int(error) != 0:
        return None
    error, props = cudart.cudaGetDeviceProperties(index)
    if int(error) != 0:
        return None
    return Device(props.name.decode(errors="replace").rstrip("\x00"), (props.major, props.minor))


def tensorrt_module() -> Any | None:
    """The ``tensorrt`` module, or ``None`` where it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def current_plan_key() -> str | None:
    """The plan key of this machine's GPU and TensorRT, or ``None`` where TensorRT or CUDA is missing."""
    trt = tensorrt_module()
    device = cuda_device() if trt is not None else None
    if trt is None or device is None:
        return None
    return plan_key(device.name, device.capability, trt.__version__)


def cuda_device_count() -> int:
    """CUDA devices this process sees: through cuda-python where it is installed, else NVML; 0 without either."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        error, count = cudart.cudaGetDeviceCount()
        return int(count) if int(error) == 0 else 0
    from appliance.gpu_telemetry import open_nvml

    reader = open_nvml()
    if reader is None:
        return 0
    try:
        return len(reader.read())
    finally:
        reader.close()

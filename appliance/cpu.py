"""What this machine's CPU is, as far as the kernels ONNX Runtime picks for it depend on it."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def cpu_description() -> dict[str, Any]:
    """The CPU model and the vector extensions it has (from /proc/cpuinfo), so that figures and measured
    properties from machines with different kernels (AVX2 against AVX-512 VNNI) are never read as one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}

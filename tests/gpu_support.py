"""What the ``gpu``-marked tests need of the machine, and why they skip where it is missing."""

from __future__ import annotations


def why_no_gpu() -> str | None:
    """Why the GPU tests cannot run here (``None``: onnxruntime-gpu's CUDA provider and an NVIDIA GPU answer)."""
    import onnxruntime as ort

    from appliance.doctor import gpu_readings

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"needs onnxruntime-gpu (CUDAExecutionProvider); onnxruntime {ort.__version__} offers " + ", ".join(
            ort.get_available_providers())
    if not gpu_readings():
        return "needs an NVIDIA GPU: NVML finds none"
    return None

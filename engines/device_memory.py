"""Copies and fills inside one device's memory, for buffers ONNX Runtime allocated there (the device KV cache).

ONNX Runtime's Python API allocates device memory (``OrtValue.ortvalue_from_shape_and_type``) and binds it by
address, but copies only between host and device. :class:`CudaMemory` makes the device-to-device copies through
the CUDA runtime (cuda-python, the ``gpu`` extra); :class:`HostMemory` makes the same copies in host memory, for
buffers on ONNX Runtime's ``cpu`` device (the tests of the device cache on machines without a GPU).
"""

from __future__ import annotations

import ctypes
from typing import Protocol

from appliance.engines.cuda_runtime import CudaRuntime


class DeviceMemory(Protocol):
    """Byte copies and fills by address on one device."""

    def zero(self, pointer: int, nbytes: int) -> None:
        """Set ``nbytes`` at ``pointer`` to zero."""
        ...

    def copy_2d(self, target: int, target_pitch: int, source: int, source_pitch: int, width: int,
                height: int) -> None:
        """Copy ``height`` rows of ``width`` bytes, rows ``target_pitch`` / ``source_pitch`` bytes apart."""
        ...

    def synchronize(self) -> None:
        """Return once every copy made so far has landed (before the graph reads the memory)."""
        ...


class HostMemory:
    """:class:`DeviceMemory` for ONNX Runtime's ``cpu`` device: plain memory moves."""

    def zero(self, pointer: int, nbytes: int) -> None:
        ctypes.memset(pointer, 0, nbytes)

    def copy_2d(self, target: int, target_pitch: int, source: int, source_pitch: int, width: int,
                height: int) -> None:
        for row in range(height):
            ctypes.memmove(target + row * target_pitch, source + row * source_pitch, width)

    def synchronize(self) -> None:
        pass


class CudaMemory:
    """:class:`DeviceMemory` on a CUDA device. The copies run on the legacy default stream and are followed by a
    device-wide synchronization: ONNX Runtime's CUDA provider runs on streams of its own, and the copies are rare
    (a cache resize, a prompt shared by several samples), so the simple, safe order costs nothing that matters."""

    def __init__(self, runtime: CudaRuntime, device_id: int = 0) -> None:
        self._runtime, self._device_id = runtime, device_id

    def zero(self, pointer: int, nbytes: int) -> None:
        self._runtime.set_device(self._device_id)
        self._runtime.memset(pointer, 0, nbytes)

    def copy_2d(self, target: int, target_pitch: int, source: int, source_pitch: int, width: int,
                height: int) -> None:
        self._runtime.set_device(self._device_id)
        self._runtime.copy_2d_on_device(target, target_pitch, source, source_pitch, width, height)

    def synchronize(self) -> None:
        self._runtime.device_synchronize()

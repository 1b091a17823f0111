"""The decoder's KV cache: one buffer per layer and K/V, ``[rows, kv_heads, capacity, head_dim]``, bound to the graph
as both past and present (ONNX Runtime IOBinding), so GroupQueryAttention appends in place.

:class:`HostKvCache` keeps the buffers in numpy arrays (the CPU execution provider). :class:`DeviceKvCache` keeps
them in memory ONNX Runtime allocated on a device (a CUDA GPU) and never copies them to the host: a row range is
bound by address, and growing, shrinking and copying rows are device-to-device copies made by a
:class:`~appliance.engines.device_memory.DeviceMemory`. Both start small and double (keeping the rows' tokens)
when a sequence needs more positions, up to ``max_capacity``: attention costs in proportion to the buffer's length
on the CPU, so short conversations should not pay for the longest one the cache could hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from appliance.engines.device_memory import DeviceMemory


@dataclass(frozen=True, slots=True)
class KvShape:
    """What the buffers hold: layers (two buffers each), rows, KV heads, head size and element type."""

    layers: int
    rows: int
    heads: int
    head_dim: int
    dtype: np.dtype

    def bytes(self, positions: int) -> int:
        """Bytes of every buffer together at ``positions`` positions per row."""
        return self.layers * 2 * self.rows * self.heads * positions * self.head_dim * self.dtype.itemsize

    def names(self) -> list[tuple[str, str]]:
        """(past input, present output) names per buffer, in buffer order."""
        return [(f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}")
                for layer in range(self.layers) for kind in ("key", "value")]


class KvCache(Protocol):
    """The buffers of a decoder's rows; used by one thread at a time."""

    shape: KvShape
    capacity: int
    max_capacity: int
    generation: int  # counts reallocations: addresses bound before a change are stale after it

    def ensure(self, positions: int) -> None:
        """Room for ``positions`` tokens per row (doubling, at most ``max_capacity``), tokens kept."""
        ...

    def shrink(self) -> None:
        """Back to the initial size, each row's first positions kept; only when no sequence holds a row."""
        ...

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        """Row ``source``'s first ``positions`` tokens into rows ``targets``."""
        ...

    def bind(self, binding: Any, start: int, stop: int) -> None:
        """Bind rows ``[start, stop)`` of every buffer as the graph's past inputs and present outputs."""
        ...


class _Resizing:
    """Growth by doubling and shrinking back, for a cache whose ``_allocate(capacity, keep)`` makes new buffers
    holding the first ``keep`` positions of the old ones."""

    capacity: int
    max_capacity: int
    _initial: int

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        raise NotImplementedError

    def ensure(self, positions: int) -> None:
        """Room for ``positions`` tokens per row (doubling, at most ``max_capacity``), tokens kept."""
        if positions > self.capacity < self.max_capacity:  # full already: the buffers (and addresses) stay
            capacity = self.capacity
            while capacity < positions:
                capacity *= 2
            self._allocate(min(capacity, self.max_capacity), keep=self.capacity)

    def shrink(self) -> None:
        """Back to the initial size, each row's first positions kept (the scheduler's prompt cache reads them);
        only when no sequence holds a row."""
        if self.capacity > self._initial:
            self._allocate(self._initial, keep=self._initial)


class HostKvCache(_Resizing):
    """The buffers in numpy arrays; row ranges bound as OrtValues over views of them (no copy)."""

    def __init__(self, ort: Any, shape: KvShape, initial_capacity: int, max_capacity: int) -> None:
        self._ort = ort
        self.shape, self.max_capacity, self.generation = shape, max_capacity, 0
        self._names = shape.names()  # bound on every call
        self._initial = min(initial_capacity, max_capacity)
        self._buffers: list[np.ndarray] = []
        self._allocate(self._initial)

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        s = self.shape
        buffers = [np.zeros((s.rows, s.heads, capacity, s.head_dim), s.dtype) for _ in range(s.layers * 2)]
        if keep:
            for new, old in zip(buffers, self._buffers):
                new[:, :, :keep] = old[:, :, :keep]
        self._buffers, self.capacity = buffers, capacity
        self._values: dict[tuple[int, int], list[Any]] = {}  # OrtValues over row ranges of the buffers, by range
        self.generation += 1

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        for buffer in self._buffers:  # in place: the bound OrtValues see the same memory
            buffer[targets, :, :positions] = buffer[source, :, :positions]

    def bind(self, binding: Any, start: int, stop: int) -> None:
        key = (start, stop)
        if key not in self._values:
            self._values[key] = [self._ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self._buffers]
        for value, (past, present) in zip(self._values[key], self._names):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def close(self) -> None:
        self._buffers, self._values = [], {}


class DeviceKvCache(_Resizing):
    """The buffers in device memory allocated by ONNX Runtime (``OrtValue``s on ``device``), bound by address.

    Nothing of them is ever copied to the host: resizing and row copies run on the device (``memory``). The
    addresses change only when the cache is resized (``generation`` counts it), which is what a captured CUDA
    graph needs to know.
    """

    def __init__(self, ort: Any, shape: KvShape, initial_capacity: int, max_capacity: int, memory: DeviceMemory,
                 device: str = "cuda", device_id: int = 0) -> None:
        self._ort, self._memory = ort, memory
        self._device, self._device_id = device, device_id
        self.shape, self.max_capacity, self.generation = shape, max_capacity, 0
        self._names = shape.names()  # bound on every call
        self._initial = min(initial_capacity, max_capacity)
        self._values: list[Any] = []
        self._allocate(self._initial)

    def _row_bytes(self, capacity: int) -> int:
        s = self.shape
        return s.heads * capacity * s.head_dim * s.dtype.itemsize

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        s = self.shape
        values = [self._ort.OrtValue.ortvalue_from_shape_and_type([s.rows, s.heads, capacity, s.head_dim],
                                                                  s.dtype.type, self._device, self._device_id)
                  for _ in range(s.layers * 2)]
        position_bytes = s.head_dim * s.dtype.itemsize
        for index, value in enumerate(values):
            # Zeros, not whatever the allocator left: attention weighs unused positions by 0, and 0 x NaN is NaN.
            self._memory.zero(value.data_ptr(), s.rows * self._row_bytes(capacity))
            if keep:
                old = self._values[index]
                self._memory.copy_2d(value.data_ptr(), capacity * position_bytes, old.data_ptr(),
                                     self.capacity * position_bytes, keep * position_bytes, s.rows * s.heads)
        self._memory.synchronize()
        self._values, self.capacity = values, capacity
        self.generation += 1

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        s = self.shape
        row, pitch = self._row_bytes(self.capacity), self.capacity * s.head_dim * s.dtype.itemsize
        width = positions * s.head_dim * s.dtype.itemsize
        for value in self._values:
            base = value.data_ptr()
            for target in targets:
                self._memory.copy_2d(base + target * row, pitch, base + source * row, pitch, width, s.heads)
        self._memory.synchronize()

    def bind(self, binding: Any, start: int, stop: int) -> None:
        s = self.shape
        row = self._row_bytes(self.capacity)
        dims = [stop - start, s.heads, self.capacity, s.head_dim]
        for value, (past, present) in zip(self._values, self._names):
            address = value.data_ptr() + start * row
            binding.bind_input(past, self._device, self._device_id, s.dtype.type, dims, address)
            binding.bind_output(present, self._device, self._device_id, s.dtype.type, dims, address)

    def read(self, index: int) -> np.ndarray:
        """Buffer ``index`` copied to the host (tests and diagnostics only)."""
        return self._values[index].numpy()

    def close(self) -> None:
        self._values = []

"""The decoder's KV caches: the device cache (memory ONNX Runtime allocated, bound and copied by address) keeps
the same tokens as the numpy cache through growth, shrinking and row copies. On machines without a GPU the device
is ONNX Runtime's ``cpu`` device with host memory moves; the CUDA copies are the same calls on the GPU's memory."""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort
import pytest

from appliance.engines.device_memory import HostMemory
from appliance.engines.kv_cache import DeviceKvCache, HostKvCache, KvShape

SHAPE = KvShape(layers=2, rows=3, heads=2, head_dim=4, dtype=np.dtype(np.float16))


def _write(cache: DeviceKvCache, index: int, array: np.ndarray) -> None:
    """Put ``array`` (the whole buffer) into the device buffer ``index``."""
    array = np.ascontiguousarray(array, dtype=cache.shape.dtype)
    ctypes.memmove(cache._values[index].data_ptr(), array.ctypes.data, array.nbytes)


@pytest.fixture()
def caches():
    host = HostKvCache(ort, SHAPE, initial_capacity=4, max_capacity=32)
    device = DeviceKvCache(ort, SHAPE, initial_capacity=4, max_capacity=32, memory=HostMemory(), device="cpu")
    rng = np.random.default_rng(0)
    for index in range(SHAPE.layers * 2):
        values = rng.standard_normal((SHAPE.rows, SHAPE.heads, 4, SHAPE.head_dim)).astype(np.float16)
        host._buffers[index][...] = values
        _write(device, index, values)
    return host, device


def _same(host: HostKvCache, device: DeviceKvCache, positions: int) -> None:
    for index in range(SHAPE.layers * 2):
        np.testing.assert_array_equal(device.read(index)[:, :, :positions], host._buffers[index][:, :, :positions])


def test_a_new_device_cache_is_zeroed_and_sized_from_rows_and_positions():
    cache = DeviceKvCache(ort, SHAPE, initial_capacity=8, max_capacity=64, memory=HostMemory(), device="cpu")
    assert all(not cache.read(i).any() for i in range(SHAPE.layers * 2))
    assert cache.read(0).shape == (3, 2, 8, 4) and cache.capacity == 8
    assert SHAPE.bytes(64) == 2 * 2 * 3 * 2 * 64 * 4 * 2


def test_growth_keeps_every_rows_tokens_and_moves_the_addresses(caches):
    host, device = caches
    before = device.generation
    host.ensure(9)
    device.ensure(9)
    assert device.capacity == host.capacity == 16 and device.generation == before + 1
    _same(host, device, 4)
    assert not device.read(0)[:, :, 4:].any()  # the new positions start at zero
    device.ensure(100)
    assert device.capacity == 32  # at most max_capacity
    device.shrink()
    assert device.capacity == 4


def test_shrinking_keeps_each_rows_first_positions(caches):
    host, device = caches
    kept = [buffer.copy() for buffer in host._buffers]  # positions 0..3, the initial capacity
    for cache in (host, device):
        cache.ensure(20)
        cache.shrink()
        assert cache.capacity == 4
    _same(host, device, 4)
    for index, values in enumerate(kept):
        np.testing.assert_array_equal(host._buffers[index], values)


def test_row_copies_land_on_the_device_like_the_host_cache(caches):
    host, device = caches
    host.copy_row(0, [1, 2], 3)
    device.copy_row(0, [1, 2], 3)
    _same(host, device, 4)
    np.testing.assert_array_equal(device.read(1)[1, :, :3], device.read(1)[0, :, :3])
    assert not np.array_equal(device.read(1)[1, :, 3], device.read(1)[0, :, 3])  # position 3 was not copied


def test_a_row_range_is_bound_by_address_as_past_and_present(caches):
    _, device = caches

    class Recorder:
        def __init__(self):
            self.calls = []

        def bind_input(self, *args):
            self.calls.append(("in", *args))

        def bind_output(self, *args):
            self.calls.append(("out", *args))

    binding = Recorder()
    device.bind(binding, 1, 3)
    row_bytes = SHAPE.heads * device.capacity * SHAPE.head_dim * 2
    first_in, first_out = binding.calls[0], binding.calls[1]
    assert first_in[1] == "past_key_values.0.key" and first_out[1] == "present.0.key"
    assert first_in[-2] == [2, 2, 4, 4] and first_in[-1] == first_out[-1] == device._values[0].data_ptr() + row_bytes
    assert len(binding.calls) == SHAPE.layers * 2 * 2


class HostBackedCudart:
    """Shaped like ``cuda.bindings.runtime`` for the three calls the device cache makes, with the CUDA runtime's
    documented argument order (``cudaMemcpy2D(dst, dpitch, src, spitch, width, height, kind)``,
    ``cudaMemset(devPtr, value, count)``), acting on host memory: a swapped argument shows up in the tokens."""

    cudaMemcpyKind = type("Kinds", (), {"cudaMemcpyDeviceToDevice": 3})

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cudaSetDevice(self, device: int) -> tuple[int]:
        self.calls.append(f"cudaSetDevice({device})")
        return (0,)

    def cudaMemset(self, pointer: int, value: int, count: int) -> tuple[int]:
        self.calls.append("cudaMemset")
        ctypes.memset(pointer, value, count)
        return (0,)

    def cudaMemcpy2D(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                     kind: int) -> tuple[int]:
        assert kind == 3 and width <= min(dpitch, spitch)
        self.calls.append("cudaMemcpy2D")
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (0,)

    def cudaDeviceSynchronize(self) -> tuple[int]:
        self.calls.append("cudaDeviceSynchronize")
        return (0,)


def test_the_cuda_copies_keep_the_same_tokens_as_the_host_cache():
    from appliance.engines.cuda_runtime import CudaRuntime
    from appliance.engines.device_memory import CudaMemory

    cudart = HostBackedCudart()
    host = HostKvCache(ort, SHAPE, initial_capacity=4, max_capacity=32)
    device = DeviceKvCache(ort, SHAPE, initial_capacity=4, max_capacity=32,
                           memory=CudaMemory(CudaRuntime(cudart), device_id=1), device="cpu")
    rng = np.random.default_rng(1)
    for index in range(SHAPE.layers * 2):
        values = rng.standard_normal((SHAPE.rows, SHAPE.heads, 4, SHAPE.head_dim)).astype(np.float16)
        host._buffers[index][...] = values
        _write(device, index, values)
    for cache in (host, device):
        cache.copy_row(2, [0], 3)
        cache.ensure(20)
    _same(host, device, 4)
    assert {"cudaSetDevice(1)", "cudaMemset", "cudaMemcpy2D", "cudaDeviceSynchronize"} <= set(cudart.calls)

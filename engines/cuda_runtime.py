"""Checked calls into the CUDA runtime through cuda-python (``from cuda.bindings import runtime as cudart``).

Every cudart call returns a tuple whose first element is the error code. :class:`CudaRuntime` checks it on every
call and raises :class:`CudaError`, naming the call and the error, so callers only ever see plain values. The
cudart module is handed in (tests pass a fake); this module imports nothing of CUDA itself except in
:func:`cudart_module`.
"""

from __future__ import annotations

from typing import Any


class CudaError(RuntimeError):
    """A CUDA runtime call that returned an error code."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"CUDA call {call} failed: {name} ({code})")
        self.call = call
        self.code = code
        self.name = name


def cudart_module() -> Any | None:
    """cuda-python's runtime module, or ``None`` where cuda-python is not installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    return cudart


class CudaRuntime:
    """The few cudart calls the TensorRT engine and the device KV cache need, each with its error code checked."""

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.cudart, name)(*args)
        error, values = result[0], result[1:]
        if int(error) != 0:
            raise CudaError(name, int(error), self.error_name(error))
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def error_name(self, error: Any) -> str:
        """The runtime's name for an error code (``cudaErrorMemoryAllocation``...)."""
        try:
            status, name = self.cudart.cudaGetErrorName(error)
            if int(status) == 0:
                return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        except Exception:  # the name is only for the message; never hide the original error behind this one
            pass
        return getattr(error, "name", None) or f"cudaError {int(error)}"

    def set_device(self, device_id: int) -> None:
        """Make ``device_id`` the calling thread's current device."""
        self._call("cudaSetDevice", device_id)

    def create_stream(self) -> Any:
        """A new stream that does not synchronize with the legacy default stream."""
        return self._call("cudaStreamCreateWithFlags", self.cudart.cudaStreamNonBlocking)

    def destroy_stream(self, stream: Any) -> None:
        """Destroy a stream made by :meth:`create_stream`."""
        self._call("cudaStreamDestroy", stream)

    def malloc(self, nbytes: int) -> int:
        """Device memory (256-byte aligned); its address."""
        return int(self._call("cudaMalloc", nbytes))

    def free(self, pointer: int) -> None:
        """Free device memory from :meth:`malloc`."""
        self._call("cudaFree", pointer)

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory; its address."""
        return int(self._call("cudaMallocHost", nbytes))

    def free_host(self, pointer: int) -> None:
        """Free page-locked host memory from :meth:`malloc_host`."""
        self._call("cudaFreeHost", pointer)

    def copy_to_device(self, device: int, host: int, nbytes: int, stream: Any) -> None:
        """Enqueue a host to device copy on ``stream``."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", device, host, nbytes, kind, stream)

    def copy_to_host(self, host: int, device: int, nbytes: int, stream: Any) -> None:
        """Enqueue a device to host copy on ``stream``."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", host, device, nbytes, kind, stream)

    def memset(self, pointer: int, value: int, nbytes: int) -> None:
        """Set ``nbytes`` of device memory at ``pointer`` to the byte ``value`` (may return before it is done:
        synchronize before the memory is read)."""
        self._call("cudaMemset", pointer, value, nbytes)

    def copy_2d_on_device(self, target: int, target_pitch: int, source: int, source_pitch: int, width: int,
                          height: int) -> None:
        """Copy ``height`` rows of ``width`` bytes between device addresses, rows ``*_pitch`` bytes apart."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call("cudaMemcpy2D", target, target_pitch, source, source_pitch, width, height, kind)

    def device_synchronize(self) -> None:
        """Wait until the current device has finished everything enqueued on any stream."""
        self._call("cudaDeviceSynchronize")

    def synchronize(self, stream: Any) -> None:
        """Wait until everything enqueued on ``stream`` has finished."""
        self._call("cudaStreamSynchronize", stream)

    def begin_capture(self, stream: Any) -> None:
        """Start capturing ``stream`` into a graph; only this thread's unsafe calls can invalidate the capture."""
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", stream, mode)

    def end_capture(self, stream: Any) -> Any:
        """End the capture of ``stream``; the captured graph."""
        return self._call("cudaStreamEndCapture", stream)

    def abandon_capture(self, stream: Any) -> None:
        """After a failed capture: end the capture if ``stream`` is still capturing (an invalidated capture still
        has to be ended), destroy the graph it left, and clear the error it set. Never raises."""
        try:
            error, status = self.cudart.cudaStreamIsCapturing(stream)
            capturing = int(error) != 0 or int(status) != 0  # not cudaStreamCaptureStatusNone, or unknown
        except Exception:
            capturing = True
        if capturing:
            try:
                result = self.cudart.cudaStreamEndCapture(stream)
                graph = result[1] if len(result) > 1 else None
                if graph is not None and int(graph) != 0:
                    self.cudart.cudaGraphDestroy(graph)
            except Exception:  # already failing; the caller reports the original error
                pass
        self.clear_error()

    def instantiate(self, graph: Any) -> Any:
        """An executable graph made from ``graph`` (no flags)."""
        return self._call("cudaGraphInstantiate", graph, 0)

    def launch(self, graph_exec: Any, stream: Any) -> None:
        """Replay an executable graph on ``stream``."""
        self._call("cudaGraphLaunch", graph_exec, stream)

    def destroy_graph_exec(self, graph_exec: Any) -> None:
        """Destroy an executable graph."""
        self._call("cudaGraphExecDestroy", graph_exec)

    def destroy_graph(self, graph: Any) -> None:
        """Destroy a captured graph."""
        self._call("cudaGraphDestroy", graph)

    def clear_error(self) -> int:
        """Read and reset the calling thread's last runtime error (``cudaGetLastError``); its code."""
        try:
            return int(self.cudart.cudaGetLastError()[0])
        except Exception:
            return -1

"""NVIDIA GPU state through NVML (nvidia-ml-py): per GPU utilization, memory, temperature and power, for
``/metrics`` (``appliance_gpu_*``) and ``appliance doctor``.

Without a driver (or without nvidia-ml-py) there is no reader: no series, no error. NVML is imported on first use
only, and every call that may block runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("appliance.gpu")

SAMPLE_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU at one moment."""

    index: int
    name: str
    utilization: float  # 0..1, the share of the last sample period a kernel ran
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float
    power_w: float


@dataclass(frozen=True, slots=True)
class DriverInfo:
    """The driver NVML talks to, and the GPUs it sees."""

    driver: str
    cuda: str  # the CUDA driver API version, e.g. "13.0"
    gpus: list[str]


def _import_nvml() -> Any:
    return importlib.import_module("pynvml")


class NvmlReader:
    """An initialized NVML session. Blocking: call from a worker thread."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self._names = [_text(nvml.nvmlDeviceGetName(handle)) for handle in self._handles]

    def driver(self) -> DriverInfo:
        """The driver version, the CUDA driver API version and the GPU names."""
        nvml = self._nvml
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        return DriverInfo(_text(nvml.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}",
                          list(self._names))

    def read(self) -> list[GpuReading]:
        """Every GPU's state now."""
        nvml = self._nvml
        readings = []
        for index, handle in enumerate(self._handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            readings.append(GpuReading(
                index=index, name=self._names[index],
                utilization=nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                memory_used_bytes=int(memory.used), memory_total_bytes=int(memory.total),
                temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))
        return readings

    def close(self) -> None:
        """End the NVML session."""
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def open_nvml(load: Callable[[], Any] = _import_nvml) -> NvmlReader | None:
    """An NVML reader, or ``None`` when there is no NVIDIA driver (or no nvidia-ml-py); blocking."""
    try:
        nvml = load()
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:  # no driver: NVMLError_LibraryNotFound, or a driver that does not answer
        log.debug("no GPU telemetry: %s", exc)
        return None
    try:
        return NvmlReader(nvml)
    except nvml.NVMLError as exc:
        log.warning("NVML started but cannot list the GPUs (%s): no GPU telemetry", exc)
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
        return None


class GpuGauges:
    """The ``appliance_gpu_*`` gauges, registered on the first reading (a machine without GPUs has none)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._gauges: dict[str, Gauge] | None = None

    def record(self, readings: list[GpuReading]) -> None:
        """Set every gauge from one round of readings."""
        if not readings:
            return
        if self._gauges is None:
            self._gauges = self._register()
        gauges = self._gauges
        for reading in readings:
            labels = (str(reading.index), reading.name)
            gauges["utilization"].labels(*labels).set(reading.utilization)
            gauges["memory_used"].labels(*labels).set(reading.memory_used_bytes)
            gauges["memory_total"].labels(*labels).set(reading.memory_total_bytes)
            gauges["temperature"].labels(*labels).set(reading.temperature_c)
            gauges["power"].labels(*labels).set(reading.power_w)

    def _register(self) -> dict[str, Gauge]:
        labels = ("gpu", "name")

        def gauge(name: str, description: str) -> Gauge:
            # Every worker process reads the same GPU: the most recent reading stands for all of them.
            return Gauge(name, description, labels, registry=self._registry, multiprocess_mode="mostrecent")

        return {
            "utilization": gauge("appliance_gpu_utilization_ratio", "Share of the last sample period a kernel ran"),
            "memory_used": gauge("appliance_gpu_memory_used_bytes", "GPU memory in use (all processes)"),
            "memory_total": gauge("appliance_gpu_memory_total_bytes", "GPU memory in all"),
            "temperature": gauge("appliance_gpu_temperature_celsius", "GPU core temperature"),
            "power": gauge("appliance_gpu_power_watts", "GPU power draw"),
        }


async def sample_forever(reader: NvmlReader, gauges: GpuGauges, interval_s: float = SAMPLE_INTERVAL_S) -> None:
    """Read the GPUs every ``interval_s`` into the gauges until cancelled; a failed read is logged once."""
    loop = asyncio.get_running_loop()
    failing = False
    while True:
        try:
            gauges.record(await loop.run_in_executor(None, reader.read))
            failing = False
        except Exception as exc:  # noqa: BLE001 - a GPU that stops answering must not stop the server
            if not failing:
                log.warning("GPU telemetry: reading NVML failed (%s); retrying every %.0f s", exc, interval_s)
            failing = True
        await asyncio.sleep(interval_s)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

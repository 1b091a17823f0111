"""GPU telemetry through NVML, with a fake NVML module injected: readings, the appliance_gpu_* series over HTTP,
and nothing at all (no series, no error) where there is no driver."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import requests

from appliance.gpu_telemetry import GpuGauges, NvmlReader, open_nvml
from appliance.telemetry import Metrics
from conftest import RunningServer, make_config
from waiting import wait_until


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """What nvidia-ml-py offers, for two GPUs (or, with ``driver=False``, for a machine without a driver)."""

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, driver: bool = True) -> None:
        self.driver, self.shut = driver, False

    def nvmlInit(self) -> None:
        if not self.driver:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.82.07"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=40 + handle, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=141 * 2**30, free=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 123_400  # milliwatts


def test_readings_and_driver_from_nvml():
    fake = FakeNvml()
    reader = open_nvml(lambda: fake)
    assert isinstance(reader, NvmlReader)
    first, second = reader.read()
    assert (first.index, first.name, first.utilization, first.memory_used_bytes) == (0, "NVIDIA H200", 0.40, 2**30)
    assert second.utilization == 0.41 and second.power_w == pytest.approx(123.4) and second.temperature_c == 55
    info = reader.driver()
    assert (info.driver, info.cuda, info.gpus) == ("580.82.07", "13.0", ["NVIDIA H200", "NVIDIA H200"])
    reader.close()
    assert fake.shut


def test_no_driver_or_no_package_is_no_reader():
    assert open_nvml(lambda: FakeNvml(driver=False)) is None

    def missing():
        raise ImportError("No module named 'pynvml'")

    assert open_nvml(missing) is None


def test_gauges_appear_with_the_first_reading_only():
    metrics = Metrics()
    gauges = GpuGauges(metrics.registry)
    gauges.record([])
    assert b"appliance_gpu" not in metrics.exposition()
    reader = open_nvml(lambda: FakeNvml())
    assert reader is not None
    gauges.record(reader.read())
    text = metrics.exposition().decode()
    assert 'appliance_gpu_utilization_ratio{gpu="1",name="NVIDIA H200"} 0.41' in text
    assert 'appliance_gpu_memory_total_bytes{gpu="0",name="NVIDIA H200"} 1.51397597184e+11' in text
    assert 'appliance_gpu_power_watts{gpu="0",name="NVIDIA H200"} 123.4' in text


def test_the_server_exports_gpu_series_only_where_there_is_a_gpu(standard_repo, tmp_path):
    with_gpu = RunningServer(make_config(standard_repo, tmp_path / "a"),
                             gpu_probe=lambda: open_nvml(lambda: FakeNvml())).start()
    without = RunningServer(make_config(standard_repo, tmp_path / "b"),
                            gpu_probe=lambda: open_nvml(lambda: FakeNvml(driver=False))).start()
    try:
        def sampled() -> str | None:
            text = requests.get(f"{with_gpu.url}/metrics", timeout=10).text
            return text if "appliance_gpu_temperature_celsius" in text else None

        text = wait_until(sampled, 30, "the first GPU sample")
        assert re.search(r'appliance_gpu_temperature_celsius\{gpu="0",name="NVIDIA H200"\} 55', text)
        plain = requests.get(f"{without.url}/metrics", timeout=10)
        assert plain.status_code == 200 and "appliance_gpu" not in plain.text
    finally:
        with_gpu.stop()
        without.stop()

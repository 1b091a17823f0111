"""The TensorRT stage against fake ``tensorrt`` modules shaped like TensorRT 10 and 11 (no GPU here): the plan key,
FP16 only where TensorRT 10 offers the flag, strongly typed plans on 11, and the figures for the provenance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from appliance.build.tensorrt_stage import build_plan
from appliance.engines.tensorrt_plans import Device, plan_key


class FakeConfig:
    def __init__(self) -> None:
        self.flags: list[str] = []

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> None: ...

    def get_timing_cache(self) -> SimpleNamespace:
        return SimpleNamespace(serialize=lambda: b"timing")

    def add_optimization_profile(self, profile: object) -> None:
        self.profile = profile


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, low: tuple, middle: tuple, high: tuple) -> None:
        self.shapes[name] = (low, middle, high)


def fake_tensorrt(version: str, with_fp16_flag: bool) -> SimpleNamespace:
    config = FakeConfig()
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name="input_ids"))
    builder = SimpleNamespace(platform_has_fast_fp16=True, create_network=lambda flags: network,
                              create_builder_config=lambda: config, create_optimization_profile=FakeProfile,
                              build_serialized_network=lambda net, cfg: b"plan-bytes")
    flags = SimpleNamespace(FP16="FP16") if with_fp16_flag else SimpleNamespace()
    return SimpleNamespace(__version__=version, Logger=FakeLogger, Builder=lambda logger: builder,
                           BuilderFlag=flags, config=config,
                           OnnxParser=lambda net, logger: SimpleNamespace(parse_from_file=lambda path: True))


class FakeLogger:
    WARNING = 1

    def __init__(self, level: int) -> None:
        self.level = level


H200 = Device("NVIDIA H200", (9, 0))
BUCKETS = [{"input_ids": (1, 128)}, {"input_ids": (8, 128)}, {"input_ids": (32, 128)}]


@pytest.mark.parametrize("version, flag, fp16, typed", [("10.13.0", True, True, False), ("11.4.0", False, False, True)])
def test_plans_for_tensorrt_10_and_11(tmp_path, version, flag, fp16, typed):
    trt = fake_tensorrt(version, flag)
    figures = build_plan(tmp_path / "model.onnx", tmp_path / "plans", BUCKETS, lambda line: None,
                         load_tensorrt=lambda: trt, probe_device=lambda: H200)
    key = plan_key("NVIDIA H200", (9, 0), version)
    assert figures["plan"] == f"{key}.plan" and (tmp_path / "plans" / f"{key}.plan").read_bytes() == b"plan-bytes"
    assert (figures["fp16"], figures["strongly_typed"], figures["compute_capability"]) == (fp16, typed, "9.0")
    assert trt.config.flags == (["FP16"] if fp16 else [])  # TensorRT 11 has no FP16 flag to set
    assert trt.config.profile.shapes["input_ids"] == ((1, 128), (8, 128), (32, 128))
    assert (tmp_path / "plans" / f"{key}.timing-cache").read_bytes() == b"timing"


def test_the_plan_key_names_gpu_capability_and_tensorrt():
    assert plan_key("NVIDIA H200", (9, 0), "11.4.0") == "nvidia-h200-sm90-trt11.4.0"
    assert plan_key("Tesla T4 (PCIe)", (7, 5), "10.13.0") == "tesla-t4-pcie-sm75-trt10.13.0"


def test_no_tensorrt_or_no_device_skips_in_one_line(tmp_path):
    said: list[str] = []
    trt = fake_tensorrt("10.13.0", True)
    no_device = build_plan(tmp_path / "m.onnx", tmp_path / "plans", BUCKETS, said.append,
                           load_tensorrt=lambda: trt, probe_device=lambda: None)
    no_tensorrt = build_plan(tmp_path / "m.onnx", tmp_path / "plans", BUCKETS, said.append,
                             load_tensorrt=lambda: None, probe_device=lambda: H200)
    assert (no_device, no_tensorrt) == ({"skipped": "no CUDA device"}, {"skipped": "tensorrt not installed"})
    assert len(said) == 2 and not (tmp_path / "plans").exists()

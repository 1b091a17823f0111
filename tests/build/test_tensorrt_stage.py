"""The TensorRT stage against fake ``tensorrt`` modules shaped like TensorRT 10 and 11 (no GPU here): the plan key,
FP16 through the flag on TensorRT 10, through a checked FP16 copy of the model on 11 (the real MiniLM, converted and
measured on this CPU before TensorRT is called), and the figures for the provenance."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.build.entries import QualityBelowThreshold
from appliance.build.provenance import sha256_file
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


def fake_tensorrt(version: str, with_fp16_flag: bool, fast_fp16: bool | None = True) -> SimpleNamespace:
    """TensorRT 10 (``with_fp16_flag``) or 11; ``fast_fp16=None``: no ``platform_has_fast_fp16`` (removed)."""
    config = FakeConfig()
    parsed: list[Path] = []
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name="input_ids"))
    builder = SimpleNamespace(create_network=lambda flags: network,
                              create_builder_config=lambda: config, create_optimization_profile=FakeProfile,
                              build_serialized_network=lambda net, cfg: b"plan-bytes")
    if fast_fp16 is not None:
        builder.platform_has_fast_fp16 = fast_fp16
    flags = SimpleNamespace(FP16="FP16") if with_fp16_flag else SimpleNamespace()
    parser = SimpleNamespace(parse_from_file=lambda path: parsed.append(Path(path)) or True)
    return SimpleNamespace(__version__=version, Logger=FakeLogger, Builder=lambda logger: builder,
                           BuilderFlag=flags, config=config, parsed=parsed, OnnxParser=lambda net, logger: parser)


class FakeLogger:
    WARNING = 1

    def __init__(self, level: int) -> None:
        self.level = level


H200 = Device("NVIDIA H200", (9, 0))
BUCKETS = [{"input_ids": (1, 128)}, {"input_ids": (8, 128)}, {"input_ids": (32, 128)}]


@pytest.fixture
def dummy_model(tmp_path) -> Path:
    """A stand-in ONNX file for the paths where the stage only hands the model to (fake) TensorRT."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx")
    return model


@pytest.mark.parametrize("version, flag, fast, precision", [
    ("10.13.0", True, True, "fp16-flag"),  # TensorRT 10: the flag, on the FP32 model
    ("10.13.0", True, False, "fp32"),
    ("11.4.0", False, False, "fp32"),  # TensorRT 11 without fast FP16: the FP32 model, strongly typed
])
def test_plans_from_the_fp32_model(tmp_path, dummy_model, version, flag, fast, precision):
    trt = fake_tensorrt(version, flag, fast)
    figures = build_plan(dummy_model, tmp_path / "plans", BUCKETS, lambda line: None,
                         load_tensorrt=lambda: trt, probe_device=lambda: H200)
    key = plan_key("NVIDIA H200", (9, 0), version)
    assert figures["plan"] == f"{key}.plan" and (tmp_path / "plans" / f"{key}.plan").read_bytes() == b"plan-bytes"
    assert figures["key"] == key and figures["precision"] == precision
    assert (figures["fp16"], figures["strongly_typed"], figures["compute_capability"]) == (
        precision == "fp16-flag", not flag, "9.0")
    assert trt.config.flags == (["FP16"] if precision == "fp16-flag" else [])
    assert trt.parsed == [dummy_model] and not list((tmp_path / "plans").glob("*.onnx"))
    assert (figures["onnx"], figures["onnx_sha256"]) == ("model.onnx", sha256_file(dummy_model))
    assert figures["fp16_parity"] is None and "fp16_copy" not in figures
    assert trt.config.profile.shapes["input_ids"] == ((1, 128), (8, 128), (32, 128))
    assert (tmp_path / "plans" / f"{key}.timing-cache").read_bytes() == b"timing"


@pytest.fixture
def minilm_folder(minilm_repo, tmp_path) -> Path:
    """The session's MiniLM (model.onnx, tokenizer.json) in a version folder of this test's own (links)."""
    folder = tmp_path / "minilm-l6" / "1"
    folder.mkdir(parents=True)
    for name in ("model.onnx", "tokenizer.json"):
        (folder / name).symlink_to(minilm_repo / "minilm-l6" / "1" / name)
    return folder


ENCODER_BUCKETS = [{"input_ids": (1, 1), "attention_mask": (1, 1)},
                   {"input_ids": (32, 256), "attention_mask": (32, 256)}]


def test_tensorrt_11_builds_from_a_checked_fp16_copy(minilm_folder):
    trt = fake_tensorrt("11.4.0", with_fp16_flag=False, fast_fp16=None)  # fast FP16 told by sm90 alone
    said: list[str] = []
    figures = build_plan(minilm_folder / "model.onnx", minilm_folder / "plans", ENCODER_BUCKETS, said.append,
                         load_tensorrt=lambda: trt, probe_device=lambda: H200)
    copy = minilm_folder / "plans" / "model.fp16.onnx"
    assert trt.parsed == [copy] and trt.config.flags == []  # the copy, and no flag to set
    assert figures["precision"] == "fp16-onnx" and figures["fp16"] and figures["strongly_typed"]
    assert (figures["onnx"], figures["onnx_sha256"]) == ("plans/model.fp16.onnx", sha256_file(copy))
    assert figures["key"] == plan_key("NVIDIA H200", (9, 0), "11.4.0")
    assert figures["fp16_parity"]["min_cosine"] >= figures["fp16_parity"]["min_required"] == 0.999
    assert figures["fp16_copy"]["fp32_nodes"]["LayerNormalization"] == 13
    assert any("FP16 copy model.fp16.onnx" in line for line in said)


def test_tensorrt_11_refuses_a_copy_below_the_threshold_before_tensorrt_parses(minilm_folder):
    trt = fake_tensorrt("11.4.0", with_fp16_flag=False)
    below = r"min cosine 0\.9\d+ \(mean 0\.9\d+\) against the FP32 model is below the threshold min_cosine_fp16 = 1\.0;"
    with pytest.raises(QualityBelowThreshold, match=below):
        build_plan(minilm_folder / "model.onnx", minilm_folder / "plans", ENCODER_BUCKETS, lambda line: None,
                   min_cosine_fp16=1.0, load_tensorrt=lambda: trt, probe_device=lambda: H200)
    assert trt.parsed == [] and sorted(p.name for p in (minilm_folder / "plans").iterdir()) == []


def test_without_tensorrts_answer_fast_fp16_is_told_by_compute_capability(tmp_path, dummy_model):
    trt = fake_tensorrt("11.4.0", with_fp16_flag=False, fast_fp16=None)
    figures = build_plan(dummy_model, tmp_path / "plans", BUCKETS, lambda line: None, load_tensorrt=lambda: trt,
                         probe_device=lambda: Device("Tesla P40", (6, 1)))  # Pascal sm61: slow FP16
    assert figures["precision"] == "fp32" and trt.parsed == [dummy_model]


@pytest.mark.parametrize("threshold", [0.0, 1.5, True])
def test_the_threshold_must_be_a_cosine(dummy_model, tmp_path, threshold):
    with pytest.raises(ValueError, match="min_cosine_fp16 = .* is not a cosine threshold; give a number in"):
        build_plan(dummy_model, tmp_path / "plans", BUCKETS, lambda line: None, min_cosine_fp16=threshold,
                   load_tensorrt=lambda: None)


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


def test_tensorrt_11_keeps_a_tensor_model_without_parity_texts_in_fp32(tmp_path, dummy_model):
    trt = fake_tensorrt("11.4.0", with_fp16_flag=False)
    said: list[str] = []
    figures = build_plan(dummy_model, tmp_path / "plans", BUCKETS, said.append, load_tensorrt=lambda: trt,
                         probe_device=lambda: H200)
    assert figures["precision"] == "fp32" and trt.parsed == [dummy_model] and figures["fp16_parity"] is None
    assert any("no tokenizer.json beside" in line and "FP32 plan" in line for line in said)

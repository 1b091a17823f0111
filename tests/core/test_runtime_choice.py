"""Engine choice on machines injected by their probe: plan-key matching, stale plans, execution providers, and
what a served version reports of its choice (v2 metadata and config, the repository index, `appliance models`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

import tiny_models
from appliance.config import ConfigError
from appliance.engine_factory import default_engines
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine
from appliance.engines.runtime_choice import Machine, choose_decoder_runtime, choose_runtime
from appliance.errors import ModelLoadFailed
from appliance.model_spec import read_model_spec
from appliance.repository import ModelManager
from conftest import RunningServer, make_config

H200_KEY = "nvidia-h200-sm90-trt11.4.0"
CPU_ONLY = Machine(plan_key=None, providers=("CPUExecutionProvider",))
CUDA_ONLY = Machine(plan_key=None, providers=("CUDAExecutionProvider", "CPUExecutionProvider"), gpus=(0,))
H200 = Machine(plan_key=H200_KEY, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                             "CPUExecutionProvider"), gpus=(0, 1), native_tensorrt=True)
PREFERENCE = ("tensorrt", "cuda", "cpu")


def version_with_plans(tmp_path: Path, *keys: str) -> Path:
    folder = tmp_path / "m" / "1"
    (folder / "plans").mkdir(parents=True)
    for key in keys:
        (folder / "plans" / f"{key}.plan").write_bytes(b"plan")
    return folder


def test_auto_takes_the_plan_whose_key_matches_this_gpu(tmp_path):
    folder = version_with_plans(tmp_path, H200_KEY, "nvidia-a100-sm80-trt10.9.0")
    choice = choose_runtime("auto", folder, PREFERENCE, H200)
    assert (choice.kind, choice.platform, choice.instance_kind, choice.gpus) == ("tensorrt", "tensorrt_plan",
                                                                                   "KIND_GPU", (0,))
    assert choice.plan == folder / "plans" / f"{H200_KEY}.plan"
    assert "stale plans not loaded: nvidia-a100-sm80-trt10.9.0" in choice.reason


def test_a_stale_plan_is_never_loaded(tmp_path):
    folder = version_with_plans(tmp_path, "nvidia-h200-sm90-trt10.9.0")  # same GPU, older TensorRT
    choice = choose_runtime("auto", folder, PREFERENCE, H200)
    assert choice.kind == "onnxruntime" and choice.plan is None
    assert choice.providers[0] == "TensorrtExecutionProvider" and choice.on_gpu
    assert choice.reason.startswith(f"auto: no plan for this machine ({H200_KEY})")
    with pytest.raises(ModelLoadFailed, match=r"no TensorRT plan for this machine .*appliance build --refresh"):
        choose_runtime("tensorrt", folder, PREFERENCE, H200)


def test_tensorrt_without_tensorrt_here_says_what_to_do(tmp_path):
    folder = version_with_plans(tmp_path, H200_KEY)
    with pytest.raises(ModelLoadFailed, match="needs TensorRT, cuda-python and a CUDA GPU.*kind = 'auto'"):
        choose_runtime("tensorrt", folder, PREFERENCE, CPU_ONLY)


def test_auto_falls_back_to_the_cuda_provider_then_the_cpu(tmp_path):
    folder = version_with_plans(tmp_path)
    cuda = choose_runtime("auto", folder, PREFERENCE, CUDA_ONLY)
    assert cuda.providers == ("CUDAExecutionProvider", "CPUExecutionProvider") and cuda.instance_kind == "KIND_GPU"
    cpu = choose_runtime("auto", folder, PREFERENCE, CPU_ONLY)
    assert cpu.providers == ("CPUExecutionProvider",) and cpu.instance_kind == "KIND_CPU" and cpu.gpus == ()
    assert cpu.reason == "auto: no GPU execution provider here (onnxruntime offers CPUExecutionProvider)"
    # onnxruntime-gpu installed, but no device answers: the CPU, and the reason says so.
    no_device = Machine(plan_key=None, providers=CUDA_ONLY.providers)
    assert choose_runtime("onnxruntime", folder, PREFERENCE, no_device).providers == ("CPUExecutionProvider",)
    assert choose_runtime("onnxruntime", folder, ("cpu",), CUDA_ONLY).providers == ("CPUExecutionProvider",)


def test_model_toml_takes_the_new_kinds_and_checks_the_buckets(tmp_path):
    folder = tiny_models.write_version(tmp_path, "m", 1, 'task = "tensor"\n[engine]\nkind = "auto"\n'
                                       'batch_buckets = [1, 4]\nio_binding = true\n[batching]\nmax_batch_size = 4\n',
                                       tiny_models.add_constant)
    spec = read_model_spec("m", 1, folder)
    assert (spec.engine.kind, spec.engine.batch_buckets, spec.engine.io_binding) == ("auto", [1, 4], True)
    (folder / "model.toml").write_text('task = "tensor"\n[engine]\nbatch_buckets = [16]\n[batching]\n'
                                       'max_batch_size = 8\n')
    with pytest.raises(ConfigError, match=r"engine.batch_buckets = \[16\] .* exceed batching.max_batch_size = 8"):
        read_model_spec("m", 1, folder)
    (folder / "model.toml").write_text('[engine]\nio_binding = "sometimes"\n')
    with pytest.raises(ConfigError, match="io_binding"):
        read_model_spec("m", 1, folder)


def test_the_factory_builds_what_the_choice_says_with_an_injected_probe(tmp_path):
    folder = tiny_models.write_version(tmp_path, "m", 1, 'task = "tensor"\n[engine]\nkind = "auto"\n'
                                       'io_binding = true\n[batching]\nmax_batch_size = 8\n', tiny_models.add_constant)
    spec = read_model_spec("m", 1, folder)
    config = make_config(tmp_path, tmp_path / "state")
    engine = default_engines(lambda: CPU_ONLY)(spec, config)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.choice.kind == "onnxruntime"
    engine.load()
    assert engine.bound is not None and engine.providers == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(engine.run({"INPUT0": np.zeros((3, 4), np.float32)})["OUTPUT0"], np.ones((3, 4)))
    (folder / "model.toml").write_text('task = "tensor"\n[engine]\nkind = "tensorrt"\n')
    with pytest.raises(ModelLoadFailed, match="needs TensorRT"):
        default_engines(lambda: CPU_ONLY)(read_model_spec("m", 1, folder), config)


async def test_a_tensorrt_version_without_its_plan_fails_to_load_and_the_old_one_keeps_serving(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "m", 1, 'task = "tensor"\n[batching]\nmax_batch_size = 4\n',
                              tiny_models.add_constant)
    manager = ModelManager(make_config(repo, tmp_path / "state"), default_engines(lambda: H200))
    await manager.load("m")
    folder = tiny_models.write_version(repo, "m", 2, 'task = "tensor"\n[engine]\nkind = "tensorrt"\n',
                                       tiny_models.add_constant)
    (folder / "plans").mkdir()
    (folder / "plans" / "nvidia-a100-sm80-trt10.9.0.plan").write_bytes(b"stale")
    with pytest.raises(ModelLoadFailed, match="no TensorRT plan for this machine.*stale plans not loaded"):
        await manager.load("m")
    assert manager.resolve("m").version == 1
    await manager.close()


@pytest.fixture(scope="module")
def bucketed_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bucketed")
    tiny_models.write_version(root / "repo", "bucketed", 1,
                              'task = "tensor"\n[engine]\nkind = "auto"\nio_binding = true\nbatch_buckets = [1, 2, 4, '
                              '8]\n[batching]\nmax_batch_size = 8\n', tiny_models.add_constant)
    server = RunningServer(make_config(root / "repo", root / "state")).start()
    yield server
    server.stop()


def test_padded_batches_through_http_equal_the_unpadded_answer(bucketed_server):
    rng = np.random.default_rng(3)
    for rows in (1, 3, 5, 8):
        data = rng.standard_normal((rows, 4)).astype(np.float32)
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [rows, 4], "data": data.ravel().tolist()}]}
        answer = requests.post(f"{bucketed_server.url}/v2/models/bucketed/infer", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        output = answer.json()["outputs"][0]
        assert output["shape"] == [rows, 4]
        np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(rows, 4), data + np.float32(1))


def test_metadata_config_and_index_report_the_runtime_choice(bucketed_server):
    metadata = requests.get(f"{bucketed_server.url}/v2/models/bucketed", timeout=10).json()
    assert metadata["platform"] == "onnxruntime_onnx"
    config = requests.get(f"{bucketed_server.url}/v2/models/bucketed/config", timeout=10).json()
    assert (config["backend"], config["instance_group"]) == ("onnxruntime", [{"count": 1, "kind": "KIND_CPU"}])
    assert config["parameters"]["runtime"]["string_value"].startswith("onnxruntime (CPUExecutionProvider) on cpu: "
                                                                       "auto: no GPU execution provider here")
    index = requests.post(f"{bucketed_server.url}/v2/repository/index", json={}, timeout=10).json()
    assert index[0]["runtime"] == config["parameters"]["runtime"]["string_value"]


# ------------------------------------------------------------------------------------------ decoders

def decoder_version(tmp_path: Path, cuda_file: str = "model.cuda.onnx") -> Path:
    folder = tmp_path / "llm" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"cpu graph")
    if cuda_file:
        (folder / cuda_file).write_bytes(b"fp16 graph")
    return folder


def test_a_decoder_runs_its_cuda_graph_where_the_cuda_provider_and_a_gpu_answer(tmp_path):
    folder = decoder_version(tmp_path)
    choice = choose_decoder_runtime(folder, "model.cuda.onnx", PREFERENCE, H200)
    assert choice.providers == ("CUDAExecutionProvider", "CPUExecutionProvider") and choice.gpus == (0,)
    assert choice.on_gpu and "model.cuda.onnx" in choice.reason
    assert choose_decoder_runtime(folder, "model.cuda.onnx", PREFERENCE, CUDA_ONLY).on_gpu


@pytest.mark.parametrize(("machine", "cuda_file", "preference", "why"), [
    (CPU_ONLY, "model.cuda.onnx", PREFERENCE, "no CUDA execution provider here"),
    (Machine(plan_key=None, providers=CUDA_ONLY.providers), "model.cuda.onnx", PREFERENCE, "no CUDA device answers"),
    (H200, "", PREFERENCE, "no graph for the CUDA execution provider"),
    (H200, "model.cuda.onnx", ("cpu",), "not among the preferred providers"),
], ids=["cpu_machine", "no_gpu", "no_cuda_graph", "cpu_preferred"])
def test_otherwise_a_decoder_runs_its_cpu_graph_and_says_why(tmp_path, machine, cuda_file, preference, why):
    choice = choose_decoder_runtime(decoder_version(tmp_path, cuda_file), cuda_file, preference, machine)
    assert choice.providers == ("CPUExecutionProvider",) and not choice.on_gpu and why in choice.reason


def test_a_missing_cuda_graph_fails_the_load_on_a_gpu_machine_with_what_to_do(tmp_path):
    folder = decoder_version(tmp_path, cuda_file="")
    with pytest.raises(ModelLoadFailed, match="cuda_file = 'model.cuda.onnx' is missing; rebuild"):
        choose_decoder_runtime(folder, "model.cuda.onnx", PREFERENCE, H200)


@pytest.mark.parametrize(("toml", "message"), [
    ('task = "generate"\n[engine]\nkind = "tensorrt"', "decoders run on ONNX Runtime"),
    ('task = "tensor"\n[engine]\ncuda_file = "model.cuda.onnx"', "only for task = 'generate'"),
])
def test_model_toml_refuses_what_a_decoder_cannot_run_on(tmp_path, toml, message):
    folder = tmp_path / "llm" / "1"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        read_model_spec("llm", 1, folder)


def test_the_decoder_factory_follows_the_choice_and_says_what_a_gpu_decoder_lacks(tmp_path, monkeypatch):
    from appliance.engine_factory import default_decoders
    from appliance.engines.generation import GenerationLimits

    folder = decoder_version(tmp_path)
    (folder / "model.toml").write_text('task = "generate"\n[engine]\nkind = "auto"\ncuda_file = "model.cuda.onnx"\n')
    spec = read_model_spec("llm", 1, folder)
    config = make_config(tmp_path / "repo", tmp_path / "state")
    limits = GenerationLimits(slots=2, capacity=64, prefill_chunk=16, max_waiting=4)
    # A GPU machine where cuda-python is missing: the load fails and says what to install.
    monkeypatch.setattr("appliance.engines.cuda_runtime.cudart_module", lambda: None)
    with pytest.raises(ModelLoadFailed, match=r"needs cuda-python; install the gpu extra"):
        default_decoders(lambda: H200)(spec, config, {}, limits)
    # A CPU machine: the CPU graph, which this fake version's bytes are not, so ONNX Runtime refuses to load it.
    with pytest.raises(Exception, match="model.onnx"):
        default_decoders(lambda: CPU_ONLY)(spec, config, {}, limits)


def test_an_embedding_model_on_a_gpu_batches_to_its_gpu_token_budget():
    from appliance.model_spec import BatchingSection
    from appliance.models.embedding import token_budget

    built = BatchingSection(max_batch_size=32, max_batch_tokens=512, gpu_max_batch_tokens=8192)
    assert token_budget(built, on_gpu=False) == 512  # the budget measured on a CPU
    assert token_budget(built, on_gpu=True) == 8192
    assert token_budget(BatchingSection(max_batch_tokens=512), on_gpu=True) == 512  # none set for the GPU

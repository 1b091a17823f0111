"""Which runtime serves a model version on this machine, and why.

``[engine] kind`` in ``model.toml``:

* ``tensorrt``: the version's TensorRT plan for this machine's plan key (GPU, compute capability, TensorRT
  version) in ``plans/``; without one the version does not load, and the message says what to run.
* ``onnxruntime``: ONNX Runtime with the first of the preferred execution providers this machine has (TensorRT,
  CUDA, CPU).
* ``auto``: the matching TensorRT plan when there is one and TensorRT runs here, else ONNX Runtime with the
  TensorRT or CUDA execution provider, else ONNX Runtime on the CPU.

A plan built for another GPU or TensorRT release (a stale plan) is never loaded; ``appliance build --refresh``
builds the one this machine needs. The probe of the machine is injected, so tests choose for machines they are not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ModelLoadFailed

PLANS_FOLDER = "plans"
PORTABLE_GRAPH = "portable.onnx"
"""The imported graph without ONNX Runtime's fused operators, kept beside an optimized ``model.onnx`` for
TensorRT (the plan build and the TensorRT execution provider), whose ONNX parser knows only standard operators."""
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROVIDER_IDS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
                "cpu": "CPUExecutionProvider"}
PROVIDER_NAMES = {provider: name for name, provider in PROVIDER_IDS.items()}  # ONNX Runtime's id -> ours


def choose_providers(preference: Sequence[str], available: Sequence[str]) -> list[str]:
    """The ONNX Runtime provider ids to use: ``preference`` filtered by ``available``, CPU always last."""
    chosen = [PROVIDER_IDS[name] for name in preference if PROVIDER_IDS[name] in available]
    if PROVIDER_IDS["cpu"] not in chosen:
        chosen.append(PROVIDER_IDS["cpu"])
    return chosen


@dataclass(frozen=True, slots=True)
class Machine:
    """What this machine offers the runtimes."""

    plan_key: str | None  # None: TensorRT or a CUDA device is missing
    providers: tuple[str, ...]  # ONNX Runtime's available execution providers
    gpus: tuple[int, ...] = ()  # CUDA device ids
    native_tensorrt: bool = False  # tensorrt and cuda-python import and a device answers


@functools.cache
def probe_machine() -> Machine:
    """This machine, probed once per process (lazily imports onnxruntime, and TensorRT and cuda-python where they
    are installed)."""
    import onnxruntime as ort

    from appliance.engines.tensorrt_plans import cuda_device_count, current_plan_key

    key = current_plan_key()
    return Machine(plan_key=key, providers=tuple(ort.get_available_providers()),
                   gpus=tuple(range(cuda_device_count())), native_tensorrt=key is not None)


@dataclass(frozen=True, slots=True)
class RuntimeChoice:
    """The runtime a version runs on: kind, execution providers or plan, device, and the reason, for logs and
    metadata."""

    kind: str  # "onnxruntime" or "tensorrt"
    reason: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    plan: Path | None = None
    gpus: tuple[int, ...] = ()

    @property
    def on_gpu(self) -> bool:
        """Whether the model runs on a GPU."""
        return self.kind == "tensorrt" or (bool(self.providers) and self.providers[0] in GPU_PROVIDERS)

    @property
    def platform(self) -> str:
        """The v2 / Triton platform name: ``tensorrt_plan`` or ``onnxruntime_onnx``."""
        return "tensorrt_plan" if self.kind == "tensorrt" else "onnxruntime_onnx"

    @property
    def backend(self) -> str:
        """The v2 / Triton backend name."""
        return self.kind

    @property
    def instance_kind(self) -> str:
        """``KIND_GPU`` or ``KIND_CPU``, as Triton's model configuration says it."""
        return "KIND_GPU" if self.on_gpu else "KIND_CPU"

    @property
    def summary(self) -> str:
        """One line: what runs, where, and why."""
        where = f"gpu {','.join(map(str, self.gpus))}" if self.on_gpu else "cpu"
        what = f"plan {self.plan.name}" if self.plan is not None else ",".join(self.providers)
        return f"{self.kind} ({what}) on {where}: {self.reason}"


CPU_CHOICE = RuntimeChoice("onnxruntime", "runtime chosen by the engine factory")
"""What a version reports when its engines do not say (engines made by injected factories)."""

DECODER_CHOICE = RuntimeChoice("onnxruntime", "decoder made by the decoder factory")
"""What a generative version reports when its decoder does not say (decoders made by injected factories)."""


def choose_decoder_runtime(model_dir: Path, cuda_file: str, preference: Sequence[str],
                           machine: Machine) -> RuntimeChoice:
    """Where a decoder version runs: ONNX Runtime's CUDA execution provider on ``cuda_file`` (the version's FP16
    graph) when this machine has it, a CUDA device answers and ``preference`` allows it; else the CPU on the
    version's ``file``. Decoders never run on TensorRT: their graphs use ONNX Runtime's contrib operators."""
    cuda, cpu = PROVIDER_IDS["cuda"], PROVIDER_IDS["cpu"]
    if not cuda_file:
        reason = "the version has no graph for the CUDA execution provider ([engine] cuda_file)"
    elif cuda not in machine.providers:
        reason = "no CUDA execution provider here (onnxruntime offers " + ", ".join(machine.providers) + ")"
    elif not machine.gpus:
        reason = "onnxruntime-gpu is installed but no CUDA device answers"
    elif "cuda" not in preference:
        reason = "the CUDA execution provider is not among the preferred providers"
    elif not (model_dir / cuda_file).is_file():
        raise ModelLoadFailed(f"{model_dir}: [engine] cuda_file = {cuda_file!r} is missing; rebuild the version with "
                              "`appliance build`, or remove cuda_file to run on the CPU")
    else:
        return RuntimeChoice("onnxruntime", f"{cuda} is available: {cuda_file} (FP16) on the GPU",
                             providers=(cuda, cpu), gpus=machine.gpus[:1])
    return RuntimeChoice("onnxruntime", f"{reason}; the CPU execution provider runs [engine] file")


def plans_of(model_dir: Path) -> list[Path]:
    """The TensorRT plans a version holds."""
    folder = model_dir / PLANS_FOLDER
    return sorted(folder.glob("*.plan")) if folder.is_dir() else []


def _stale_note(plans: Sequence[Path], key: str | None) -> str:
    stale = [p.stem for p in plans if p.stem != key]
    return f"; stale plans not loaded: {', '.join(stale)}" if stale else ""


def choose_runtime(kind: str, model_dir: Path, preference: Sequence[str], machine: Machine) -> RuntimeChoice:
    """The runtime for a version folder of engine ``kind`` on ``machine``; ``preference`` names the ONNX Runtime
    execution providers in order (``tensorrt``, ``cuda``, ``cpu``).

    Raises :class:`~appliance.errors.ModelLoadFailed` for ``kind = "tensorrt"`` without a plan for this machine.
    """
    plans = plans_of(model_dir)
    matching = next((p for p in plans if machine.plan_key is not None and p.stem == machine.plan_key), None)
    stale = _stale_note(plans, machine.plan_key)
    if kind == "tensorrt":
        if machine.plan_key is None or not machine.native_tensorrt:
            raise ModelLoadFailed(
                f"{model_dir / 'model.toml'}: [engine] kind = 'tensorrt' needs TensorRT, cuda-python and a CUDA GPU, "
                f"and this machine lacks one of them; install the gpu extra, or set kind = 'auto'{stale}")
        if matching is None:
            raise ModelLoadFailed(
                f"{model_dir}: no TensorRT plan for this machine ({machine.plan_key}){stale}; run "
                f"`appliance build --refresh` to build it, or set [engine] kind = 'auto'")
        return RuntimeChoice("tensorrt", f"plan {machine.plan_key} matches this GPU and TensorRT{stale}",
                             providers=(), plan=matching, gpus=machine.gpus[:1])
    if kind == "auto" and matching is not None and machine.native_tensorrt:
        return RuntimeChoice("tensorrt", f"auto: plan {machine.plan_key} matches this GPU and TensorRT{stale}",
                             providers=(), plan=matching, gpus=machine.gpus[:1])
    chosen = choose_providers(preference, machine.providers)
    if chosen[0] in GPU_PROVIDERS and not machine.gpus:
        chosen = [p for p in chosen if p not in GPU_PROVIDERS]  # the GPU build of ONNX Runtime, but no GPU answers
        reason = "onnxruntime-gpu is installed but no CUDA device answers"
    elif chosen[0] in GPU_PROVIDERS:
        reason = f"{chosen[0]} is available"
    else:
        reason = "no GPU execution provider here (onnxruntime offers " + ", ".join(machine.providers) + ")"
    if kind == "auto":
        if plans and matching is None:
            reason = f"no plan for this machine ({machine.plan_key or 'no TensorRT GPU'}); {reason}"
        elif matching is not None:
            reason = f"plan {machine.plan_key} present but TensorRT does not run here; {reason}"
        reason = f"auto: {reason}"
    on_gpu = chosen[0] in GPU_PROVIDERS
    return RuntimeChoice("onnxruntime", reason + stale, providers=tuple(chosen),
                         gpus=machine.gpus[:1] if on_gpu else ())

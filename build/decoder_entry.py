"""Build the generation tiers of a Llama-family GGUF: ``<name>`` (exact, tier mid) and ``<name>-fast`` (small).

The exact tier computes in float32 with the 4-bit weights dequantized exactly; the fast tier lets the 4-bit
matmuls quantize activations to int8. The exact tier's version also holds ``model.cuda.onnx``, the graph ONNX
Runtime's CUDA execution provider runs (FP16 activations and KV cache over the same 4-bit weights), which ``auto``
loads on a machine with a CUDA GPU. The fast tier's and the CUDA graph's agreement with the exact tier is measured
on built-in prompts (teacher-forced top-1 agreement and tokens before the first divergence) and a graph below the
configured threshold is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.build.entries import (
    EntryResult,
    Progress,
    QualityBelowThreshold,
    StageReport,
    existing,
    new_version,
    publish,
    stage,
)
from appliance.build.batch_invariance import ROWS as INVARIANCE_ROWS
from appliance.build.batch_invariance import measure_batch_invariance
from appliance.build.gguf_decoder import (INT8_ACTIVATIONS, VARIANTS, DecoderBuild, import_gguf, render_chat,
                                          write_variant_graph)
from appliance.build.parity import greedy, parity_decoder, teacher_forced_argmax
from appliance.build.provenance import build_key, sha256_file
from appliance.build.q8_form import Q8FormTimer
from appliance.cpu import cpu_description

TIERS = {"exact": "mid", "fast": "small"}
CUDA_GRAPH = "model.cuda.onnx"
PARITY_STEPS = 16
PARITY_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
]


@dataclass
class DecoderOptions:
    """How to build decoder tiers."""

    variants: tuple[str, ...] = ("exact", "fast")
    max_seq_len: int = 0  # 0: the model's context length
    min_fast_agreement: float = 0.85  # teacher-forced top-1 agreement of the fast tier with the exact tier
    cuda_graph: bool = True  # the exact tier's FP16 graph for ONNX Runtime's CUDA execution provider
    min_cuda_agreement: float = 0.85  # its agreement with the exact tier (measured on the CPU execution provider)
    tensorrt: bool = True
    logits: str = "last"  # the scheduler only samples the last position: skip the LM head elsewhere
    ragged_prefill: bool = True  # the query_seqlens input: several prompts' chunks of different lengths in one call


def entry_name(name: str, variant: str) -> str:
    """The repository name of a tier."""
    return name if variant == "exact" else f"{name}-{variant}"


def build_decoder_tiers(gguf_path: Path, repo: Path, name: str, options: DecoderOptions, progress: Progress,
                        source_label: str = "") -> list[EntryResult]:
    """Build each requested tier (the exact one first: the others are measured against it)."""
    digest = sha256_file(gguf_path)
    source = {"kind": "gguf", "path": source_label or str(gguf_path), "sha256": digest}
    results: list[EntryResult] = []
    exact_folder: Path | None = None
    for variant in sorted(options.variants, key=lambda v: v != "exact"):
        tier_options = {"variant": variant, "max_seq_len": options.max_seq_len, "tensorrt": options.tensorrt,
                        "logits": options.logits, "ragged_prefill": options.ragged_prefill,
                        "dense_batches": variant == "exact",
                        # int8 activations: a Q8_0 table in the form timed faster on the building machine
                        **({"q8_0_form": "timed"} if VARIANTS[variant] == INT8_ACTIVATIONS else {}),
                        # a tier that can be batch-invariant is claimed so only where measured on the building CPU
                        **({"batch_invariance": "measured"} if INVARIANT.get(variant, False) else {}),
                        "min_fast_agreement": options.min_fast_agreement if variant != "exact" else None}
        if variant == "exact" and options.cuda_graph:
            tier_options["cuda_graph"] = {"min_agreement": options.min_cuda_agreement,
                                          "outputs": ["logits", "next_token"]}
        key = build_key(digest, tier_options)
        target = entry_name(name, variant)
        done = existing(repo, target, key)
        if done is not None:
            progress(f"{target}: up to date (version {done.version})")
            result = done
        else:
            result = _build_tier(gguf_path, repo, target, variant, options, progress, key, source, tier_options,
                                 exact_folder)
        results.append(result)
        if variant == "exact":
            exact_folder = result.folder
    return results


def _build_tier(gguf_path: Path, repo: Path, target: str, variant: str, options: DecoderOptions,
                progress: Progress, key: str, source: dict, tier_options: dict, exact_folder: Path | None
                ) -> EntryResult:
    stages: list[StageReport] = []
    with new_version(repo, target) as scratch:
        with stage(stages, f"{target}: import GGUF ({variant})", progress, scratch / "model.onnx") as report:
            timer = Q8FormTimer() if VARIANTS[variant] == INT8_ACTIVATIONS else None
            build = import_gguf(gguf_path, scratch, variant, options.max_seq_len or None,
                                progress=lambda line: progress(f"{target}: {line}"), logits=options.logits,
                                with_query_seqlens=options.ragged_prefill, whole_q8=timer)
            if timer is not None and timer.figures:
                report.figures = figures = timer.figures
                timings = ", ".join(f"{form} {figures[f'{form}_ms_per_row']:.2f} ms a row"
                                    if f"{form}_ms_per_row" in figures else f"{form} failed: {figures[f'{form}_error']}"
                                    for form in ("8-bit", "split"))
                progress(f"{target}: Q8_0 table kept {figures['q8_0_form']} ({timings})")
        parity: dict = {}
        if variant != "exact":
            if exact_folder is None:
                raise ValueError("the fast tier is measured against the exact tier: build both")
            with stage(stages, f"{target}: agreement with the exact tier", progress) as report:
                report.figures = agreement(DecoderBuild.from_folder(exact_folder), build.model_path)
                parity["agreement_with_exact"] = report.figures
                _refuse_below(report.figures, options.min_fast_agreement, target)
        invariant = False
        if INVARIANT.get(variant, False):
            with stage(stages, f"{target}: batch invariance on this CPU", progress) as report:
                decoder = parity_decoder(build.model_path, json.loads(build.generation_path.read_text()), 256,
                                         rows=INVARIANCE_ROWS)
                # The claim holds on CPUs with these kernels: a version loaded on another one is not trusted with it.
                report.figures = {**measure_batch_invariance(decoder), "cpu": cpu_description()}
                decoder.close()
                parity["batch_invariance"] = report.figures
                invariant = bool(report.figures["invariant"])
                progress(f"{target}: " + ("batch-invariant: marked deterministic" if invariant else
                                          f"not batch-invariant on this CPU ({report.figures['differing']} of "
                                          f"{report.figures['checks']} checks differ): not marked deterministic"))
        cuda_graph = variant == "exact" and options.cuda_graph
        if cuda_graph:
            with stage(stages, f"{target}: graph for the CUDA execution provider (FP16)", progress,
                       scratch / CUDA_GRAPH):
                write_variant_graph(gguf_path, scratch / CUDA_GRAPH, "cuda", options.max_seq_len or None,
                                    progress=lambda line: progress(f"{target}: {line}"), logits=options.logits)
            with stage(stages, f"{target}: agreement of {CUDA_GRAPH} with the exact tier", progress) as report:
                # On the CPU execution provider, which runs some FP16 nodes in FP32 and accumulates unlike CUDA:
                # it proves the graph right, not the GPU's rounding, which the gpu tests bound by this figure.
                report.figures = {**agreement(build, scratch / CUDA_GRAPH), "provider": "CPUExecutionProvider"}
                parity["cuda_graph_agreement_with_exact"] = report.figures
                _refuse_below(report.figures, options.min_cuda_agreement, f"{target}/{CUDA_GRAPH}")
        if options.tensorrt:
            with stage(stages, f"{target}: tensorrt", progress) as report:
                # GroupQueryAttention and MatMulNBits are ONNX Runtime contrib operators that TensorRT's ONNX parser
                # does not take; on GPUs the decoder runs through ONNX Runtime's CUDA provider instead.
                progress(f"{target}: tensorrt: skipped for decoders (contrib operators); "
                         "ONNX Runtime's CUDA provider serves them on GPUs")
                report.figures = {"skipped": "decoder uses ONNX Runtime contrib operators"}
        return publish(scratch, target, key=key, source=source, options=tier_options, parity=parity,
                       stages=stages, model_toml=_model_toml(build, variant, source["path"], cuda_graph, invariant))


def _refuse_below(figures: dict[str, object], threshold: float, what: str) -> None:
    measured = float(figures["teacher_forced_top1"])  # type: ignore[arg-type]
    if measured < threshold:
        raise QualityBelowThreshold(f"{what}: teacher-forced top-1 agreement {measured:.3f} with the exact tier is "
                                    f"below the threshold {threshold}; not written")


def agreement(exact: DecoderBuild, candidate: Path) -> dict[str, object]:
    """How often the graph ``candidate`` picks the exact tier's greedy token, on the built-in prompts."""
    template = exact.chat_template_path.read_text()
    generation = json.loads(exact.generation_path.read_text())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(exact.tokenizer_path))
    prompts = [tokenizer.encode(render_chat(template, messages), add_special_tokens=False).ids
               for messages in PARITY_CHATS]
    longest = max(len(prompt) for prompt in prompts) + PARITY_STEPS
    reference = parity_decoder(exact.model_path, generation, longest)
    measured = parity_decoder(candidate, generation, longest)
    eos = generation.get("eos_token_ids", [])
    agreed, total, divergences = 0, 0, []
    for prompt in prompts:
        want, _ = greedy(reference, prompt, PARITY_STEPS, eos)
        got, _ = greedy(measured, prompt, PARITY_STEPS, eos)
        forced = teacher_forced_argmax(measured, prompt, want, eos)
        agreed += int((forced == np.array(want)).sum())
        total += len(want)
        divergences.append(next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want)))
    reference.close()
    measured.close()
    return {"teacher_forced_top1": agreed / total, "tokens_before_divergence": divergences,
            "steps": PARITY_STEPS, "prompts": len(PARITY_CHATS)}


# The exact tier's multi-row steps through float32 weights (engines/dense_weights): 8 rows decode ~1.5x faster.
DENSE_BATCHES = """
dense_batches = true  # multi-row steps use a float32 copy of the weights (faster batches, ~4 bytes per weight)"""


# Which variants can be batch-invariant (bench/invariance.py, tests/api/test_reproducible.py): the fast tier's int8
# activations are quantized per row, so its rows are bitwise the same whatever calls they share where ONNX
# Runtime's kernels have no one-row special case (measured at build: appliance.build.batch_invariance); the exact
# tier's are not (one-row steps run the 4-bit kernel, multi-row steps the float32 twin), so its greedy and seeded
# requests are cached only in the reproducible mode ([generation] reproducible, or x-appliance-reproducible).
INVARIANT = {"exact": False, "fast": True}


def _invariance_line(variant: str, measured: bool) -> str:
    """The value of ``deterministic`` and the comment that says why (``measured``: the build's check passed)."""
    if INVARIANT.get(variant, False) and measured:
        return "true  # measured batch-invariant on the building CPU (provenance.json; the README's Reproducibility)"
    if INVARIANT.get(variant, False):
        return ("false  # not batch-invariant on the building CPU: its kernels compute a row differently in one-row "
                "and multi-row calls (provenance.json; the README's Reproducibility)")
    return ("false  # not batch-invariant: a row's tokens may change with the rows it runs beside (see the README's "
            "Reproducibility)")


def _model_toml(build: DecoderBuild, variant: str, source_path: str, cuda_graph: bool, invariant: bool) -> str:
    cuda_file = (f'\ncuda_file = "{CUDA_GRAPH}"  # FP16 activations and KV cache: what the CUDA execution provider '
                 'runs' if cuda_graph else "")
    return f'''# Built by `appliance build` from {source_path}
task = "generate"
tier = "{TIERS.get(variant, "small")}"
description = "decoder, {variant} variant ({'float32 activations' if variant == 'exact' else 'int8 activations'})"
deterministic = {_invariance_line(variant, invariant)}

[engine]
kind = "auto"  # the CUDA execution provider where a GPU answers and cuda_file is set, else the CPU
file = "model.onnx"  # {'float32' if variant == 'exact' else 'int8'} activations, for the CPU provider{cuda_file}

[batching]
max_batch_size = 0

[tokenizer]
file = "tokenizer.json"
max_seq_length = {build.context_length}

[generation]
config = "generation.json"
chat_template = "chat_template.jinja"
context_length = {build.context_length}{DENSE_BATCHES if variant == "exact" else ""}

[warmup]
runs = 0  # the decoder is warmed up by the generation scheduler, which owns its KV buffers
'''


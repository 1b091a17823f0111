"""Tracing's cost in throughput, measured in pairs: a server with ``[tracing]`` off and one with it on (the default
sampling, or ``--max-traces-per-second``) run side by side, and wrk alternates between them in short runs (off, on,
on, off, ...), so that what the shared machine does meanwhile weighs on both alike. Each alternation gives one ratio
(traced req/s over untraced); a fresh pair of processes is started ``--pairs`` times, since two processes doing the
same work can differ by a few percent for as long as they live. The median of all ratios is the figure (target:
at least 0.95 at concurrency 64), with its quartiles.

Tiny tensor model, one worker per server, concurrency 64, spans over OTLP/HTTP to a discarding collector in a
process of its own (bench/otlp_sink.py). Prints a table, writes bench/results/tracing-paired-*.json.

    python bench/tracing_paired.py [--pairs 3] [--alternations 6] [--seconds 2] [--format binary]
                                   [--max-traces-per-second 0]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import report  # noqa: E402
import tiny_models  # noqa: E402
from appliance_server import running_appliance_process  # noqa: E402
from otlp_sink import otlp_sink  # noqa: E402
from overhead import FORMATS, MODEL_TOML, bodies, traces_dropped  # noqa: E402
from wrk import post_load, require_wrk  # noqa: E402

CONCURRENCY = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="pairs of server processes started, one after another")
    parser.add_argument("--alternations", type=int, default=6, help="off/on load runs per pair")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each load run")
    parser.add_argument("--format", choices=FORMATS, default="binary")
    parser.add_argument("--max-traces-per-second", type=float, default=None,
                        help="tracing.max_traces_per_second of the traced server (0: no cap; default: the "
                             "configuration's)")
    args = parser.parse_args()
    require_wrk()
    body, content_type, header_length = bodies()[args.format]
    rows: list[dict] = []
    dropped = 0.0
    with tempfile.TemporaryDirectory() as folder, otlp_sink() as (endpoint, sink):
        root = Path(folder)
        tiny_models.write_version(root / "repo", "add_one", 1, MODEL_TOML, tiny_models.add_constant)
        traced = {"tracing_enabled": "true", "tracing_endpoint": endpoint}
        if args.max_traces_per_second is not None:
            traced["tracing_max_traces_per_second"] = str(args.max_traces_per_second)
        for pair in range(args.pairs):
            with contextlib.ExitStack() as servers:
                urls = {}
                for name, settings in (("off", {}), ("on", traced)):
                    url, _ = servers.enter_context(running_appliance_process(
                        root / "repo", root / f"state-{pair}-{name}", root / f"{pair}-{name}.log", server_workers="1",
                        **settings))
                    urls[name] = url
                    post_load(f"{url}/v2/models/add_one/infer", body, content_type, 8, 1, header_length)  # warm up
                for index in range(args.alternations):
                    rps = {}
                    for name in (("off", "on") if index % 2 == 0 else ("on", "off")):
                        result = post_load(f"{urls[name]}/v2/models/add_one/infer", body, content_type, CONCURRENCY,
                                           args.seconds, header_length)
                        rps[name] = result.rps
                    rows.append({"pair": pair, "alternation": index, "off_rps": rps["off"], "on_rps": rps["on"],
                                 "ratio": rps["on"] / rps["off"]})
                    print(f"  pair {pair} run {index}: off {rps['off']:,.0f} on {rps['on']:,.0f} req/s, "
                          f"{rows[-1]['ratio']:.3f}x", flush=True)
                dropped += traces_dropped(urls["on"])
    ratios = [row["ratio"] for row in rows]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    cap = "default" if args.max_traces_per_second is None else f"{args.max_traces_per_second:g}"
    report.print_table(f"Tracing on / off, c={CONCURRENCY}, {args.format}, traces a second: {cap}",
                       ["pairs", "runs", "median", "lower quartile", "upper quartile", "traces dropped"],
                       [[args.pairs, len(ratios), quartiles[1], quartiles[0], quartiles[2], dropped]])
    print(f"median traced/untraced req/s {quartiles[1]:.3f}x (target >= 0.95)")
    path = report.write_json("tracing-paired", {"rows": rows, "median": quartiles[1], "quartiles": quartiles,
                                                "format": args.format, "max_traces_per_second": cap,
                                                "traces_dropped": dropped, "exports": sink.exports})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

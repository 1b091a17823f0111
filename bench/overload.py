"""Overload: interactive load at one, two and three times local capacity, with admission control and overflow to
a cloud upstream, with shedding only, and with admission off (an unbounded queue, as many servers do by default).

The model is a real ONNX graph (the input row expanded to 128 rows, then a chain of 512x512 MatMuls; one request per
batch, one engine thread) whose service time is about 10 ms here. The cloud is a second appliance process on loopback serving the same model. Load is
open-loop (requests are sent at a fixed rate whatever the answers do), from an asyncio client. Capacity is measured
first, closed-loop. Latency is reported as the client saw it and as the local server's access log timed it (the
client shares the CPUs, so under overload part of its number is its own scheduling). Prints a table and writes bench/results/overload-*.json.

    python bench/overload.py [--seconds 6] [--layers 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance_server import running_appliance  # noqa: E402

WIDTH = 512
MAX_WAIT_MS = 250.0
BODY = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.01] * WIDTH}]}
MODEL_TOML = """task = "tensor"
[engine]
intra_op_threads = 1
[batching]
max_batch_size = 1
max_queue_size = 100000
"""


def build_model(repo: Path, layers: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    fan_out = helper.make_tensor("fan_out", TensorProto.INT64, [3], [128, 1, WIDTH])
    nodes = [helper.make_node("Expand", ["x", "fan_out"], ["wide"])]
    weights, previous = [fan_out], "wide"
    for index in range(layers):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        weights.append(helper.make_tensor(f"w{index}", TensorProto.FLOAT, weight.shape, weight.ravel()))
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [f"h{index}"]))
        previous = f"h{index}"
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[0], keepdims=0))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", WIDTH])], weights)
    folder = repo / "chain" / "1"
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    (folder / "model.toml").write_text(MODEL_TOML)


async def capacity(url: str, token: str, seconds: float) -> float:
    """Closed-loop requests per second with a few connections: what the box serves locally."""
    done = 0
    end = time.perf_counter() + seconds
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}",
                                              "Cache-Control": "no-store"}) as session:
        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < end:
                async with session.post(f"{url}/v2/models/chain/infer", json=BODY) as response:
                    await response.read()
                    done += response.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(4)))
    return done / (time.perf_counter() - started)


async def open_loop(url: str, token: str, rate: float, seconds: float) -> dict:
    """Send ``rate`` requests per second for ``seconds``; latency of each answer, status and where it ran."""
    results: list[tuple[float, int, str]] = []
    headers = {"Authorization": f"Bearer {token}", "Cache-Control": "no-store", "x-appliance-lane": "interactive"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> None:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v2/models/chain/infer", json=BODY) as response:
                    await response.read()
                    place = "cloud" if response.headers.get("x-appliance-model", "").startswith("edge:") else "local"
                    results.append((time.perf_counter() - started, response.status, place))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                results.append((time.perf_counter() - started, 599, "error"))

        tasks = []
        begin = time.perf_counter()
        for index in range(int(rate * seconds)):
            delay = begin + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    ok = np.array([latency for latency, status, _ in results if status == 200])
    return {
        "sent": len(results),
        "ok": int(ok.size),
        "error_rate": 1 - ok.size / max(1, len(results)),
        "cloud_share": sum(1 for _, status, place in results if status == 200 and place == "cloud") / max(1, ok.size),
        "p50_ms": float(np.percentile(ok, 50) * 1e3) if ok.size else float("nan"),
        "p99_ms": float(np.percentile(ok, 99) * 1e3) if ok.size else float("nan"),
    }


def server_side(log: Path, mark: int) -> dict:
    """p50 and p99 of the answered requests as the server timed them (its access log), from line ``mark`` on."""
    totals = []
    for line in log.read_text().splitlines()[mark:]:
        if line.startswith("{") and '"type":"access"' in line:
            entry = json.loads(line)
            if entry["status"] == 200 and entry["path"].endswith("/infer"):
                totals.append(entry["total_ms"])
    if not totals:
        return {"server_p50_ms": float("nan"), "server_p99_ms": float("nan")}
    return {"server_p50_ms": float(np.percentile(totals, 50)), "server_p99_ms": float(np.percentile(totals, 99))}


def config_text(upstream_url: str) -> str:
    return f"""
[upstreams.edge]
kind = "kserve"
base_url = "{upstream_url}"
models = {{ chain = "chain" }}
max_concurrency = 64
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    from appliance.keys import KeyStore

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_model(root / "repo", args.layers)
        store = KeyStore(root / "state" / "keys.json")
        cloudy = store.create(name="cloudy", tenant="bench", cloud=True)[1]
        local_only = store.create(name="local", tenant="bench")[1]
        common = {"CACHE_ENABLED": "false", "ADMISSION_INTERACTIVE_MAX_WAIT_MS": str(MAX_WAIT_MS)}
        # The "cloud" is another appliance with the same lanes. It stands for a service elsewhere; on this box it
        # shares the same CPUs, so it adds little real capacity.
        with running_appliance(root / "repo", root / "cloud-state", root / "cloud.log", **common) as cloud_url:
            (root / "config.toml").write_text(config_text(cloud_url))
            scenarios = [("admission + cloud overflow", cloudy, {}),
                         ("admission, shedding only", local_only, {}),
                         ("admission off (unbounded queue)", local_only, {"ADMISSION_ENABLED": "false"})]
            for name, token, settings in scenarios:
                with running_appliance(root / "repo", root / "state", root / "local.log",
                                       CONFIG=str(root / "config.toml"), **common, **settings) as url:
                    local_rate = asyncio.run(capacity(url, token if name != scenarios[0][0] else local_only, 3))
                    print(f"{name}: local capacity {local_rate:.0f} req/s", flush=True)
                    for factor in (1, 2, 3):
                        time.sleep(0.5)
                        mark = len((root / "local.log").read_text().splitlines())
                        result = asyncio.run(open_loop(url, token, local_rate * factor, args.seconds))
                        time.sleep(0.5)  # the access log is flushed every 0.2 s
                        result.update(server_side(root / "local.log", mark))
                        rows.append({"scenario": name, "load": factor, "rate": local_rate * factor,
                                     "capacity": local_rate, **result})
                        print(f"  {factor}x: {result}", flush=True)
                        time.sleep(1.0)
    service_ms = 1e3 / rows[0]["capacity"]
    report.print_table(
        f"Overload: interactive lane max wait {MAX_WAIT_MS:.0f} ms, service time about {service_ms:.1f} ms",
        ["scenario", "load", "req/s offered", "p50 ms", "p99 ms", "server p99 ms", "errors", "served by cloud"],
        [[r["scenario"], f"{r['load']}x", r["rate"], r["p50_ms"], r["p99_ms"], r["server_p99_ms"],
          f"{r['error_rate']:.1%}", f"{r['cloud_share']:.1%}"] for r in rows])
    print(f"target: with admission, p99 < {MAX_WAIT_MS:.0f} ms + one service time at every load")
    print("p50/p99: the client's view (open loop, on the same CPUs); server p99: the local server's access log")
    path = report.write_json("overload", {"rows": rows, "max_wait_ms": MAX_WAIT_MS})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

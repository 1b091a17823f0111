"""What it costs to hand one engine call from the event loop to another thread and back, for the tiny model.

The request path runs every engine call off the event loop; at concurrency 1 that round trip, not the model (a
few microseconds), is much of a request's latency. Measured on uvloop, one call at a time with a short idle gap
between calls (as at concurrency 1 over HTTP, where the loop sleeps between requests):

  * ``session.run`` in the loop's own thread (the floor; the server never does this);
  * the batcher's way: a worker thread asleep on a ``queue.SimpleQueue``, woken per call, answering through
    ``loop.call_soon_threadsafe``;
  * ONNX Runtime's ``run_async``, whose callback (on ONNX Runtime's own pool thread) answers through
    ``call_soon_threadsafe``, with the pool's threads spinning between calls or sleeping.

For each: the median and p90 round trip, and the process's CPU time per call (a spinning thread's cost shows
there). Prints a table, writes bench/results/handoff-*.json.

    python bench/handoff.py [--calls 4000] [--gap-us 300]
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import report  # noqa: E402
import tiny_models  # noqa: E402

FEED = {"INPUT0": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)}
WARM_UP = 500


def session(model: Path, threads: int, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


Call = Callable[[asyncio.AbstractEventLoop], Awaitable[object]]


def in_loop(sess) -> Call:
    async def call(loop: asyncio.AbstractEventLoop) -> object:
        return sess.run(None, FEED)
    return call


def worker_thread(sess) -> Call:
    """The batcher's hand-off: a thread woken through a SimpleQueue, answering with call_soon_threadsafe."""
    wake: queue.SimpleQueue = queue.SimpleQueue()
    loop_of: list[asyncio.AbstractEventLoop] = []

    def serve() -> None:
        while True:
            future = wake.get()
            output = sess.run(None, FEED)
            loop_of[0].call_soon_threadsafe(future.set_result, output)

    threading.Thread(target=serve, daemon=True).start()

    async def call(loop: asyncio.AbstractEventLoop) -> object:
        if not loop_of:
            loop_of.append(loop)
        future = loop.create_future()
        wake.put(future)
        return await future
    return call


def run_async(sess) -> Call:
    async def call(loop: asyncio.AbstractEventLoop) -> object:
        future = loop.create_future()

        def done(output: object, _user_data: object, error: str) -> None:
            if error:
                loop.call_soon_threadsafe(future.set_exception, RuntimeError(f"run_async failed: {error}"))
            else:
                loop.call_soon_threadsafe(future.set_result, output)

        sess.run_async(None, FEED, done, None)
        return await future
    return call


async def measure(call: Call, calls: int, gap_s: float) -> dict:
    loop = asyncio.get_running_loop()
    times = []
    cpu_before = time.process_time()
    for index in range(WARM_UP + calls):
        if index == WARM_UP:
            cpu_before = time.process_time()
        started = time.perf_counter()
        await call(loop)
        if index >= WARM_UP:
            times.append(time.perf_counter() - started)
        await asyncio.sleep(gap_s)
    cpu_s = time.process_time() - cpu_before
    times.sort()
    return {"median_us": statistics.median(times) * 1e6, "p90_us": times[int(len(times) * 0.9)] * 1e6,
            "cpu_us_per_call": cpu_s / calls * 1e6}


def main() -> int:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--gap-us", type=float, default=300.0, help="idle time between calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        tiny_models.write_version(repo, "add_one", 1, 'task = "tensor"\n', tiny_models.add_constant)
        model = repo / "add_one" / "1" / "model.onnx"
        ways = [("session.run in the loop (floor)", lambda: in_loop(session(model, 1, False))),
                ("worker thread (the batcher's)", lambda: worker_thread(session(model, 1, False))),
                ("run_async, pool threads spin", lambda: run_async(session(model, 2, True))),
                ("run_async, pool threads sleep", lambda: run_async(session(model, 2, False)))]
        rows = []
        for name, make in ways:
            result = uvloop.run(measure(make(), args.calls, args.gap_us / 1e6))
            rows.append({"way": name, **result})
            print(f"  {name}: {result}", flush=True)
    report.print_table(f"Engine-call hand-off round trip (tiny model, uvloop, {args.gap_us:g} us idle between calls)",
                       ["way", "median us", "p90 us", "CPU us/call"],
                       [[r["way"], r["median_us"], r["p90_us"], r["cpu_us_per_call"]] for r in rows])
    path = report.write_json("handoff", {"rows": rows, "calls": args.calls, "gap_us": args.gap_us})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

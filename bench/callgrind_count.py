"""Instructions a serving process spends per request, counted by valgrind's callgrind.

Callgrind counts instructions, not seconds, so its figures hold still on a shared machine where throughput ratios of
separate server processes move by 10% or more. Only the requests are counted: instrumentation is switched on after
start-up and a warm-up, and off before the server stops; child processes (the span exporter) are not followed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

from appliance_server import running_appliance_process
from overhead import bodies

CONCURRENCY = 16


def require_valgrind() -> None:
    """Exit with what to install when valgrind is missing."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed: `apt-get install -y valgrind` and run the benchmark again")


async def post_many(url: str, count: int, headers: dict[str, str] | None = None, wire: str = "binary") -> None:
    """``count`` infer requests of the tiny model in ``wire`` format, ``CONCURRENCY`` at a time, each answered
    200."""
    body, content_type, header_length = bodies()[wire]
    sent = {"Content-Type": content_type, **(headers or {})}
    if wire == "binary":
        sent["Inference-Header-Content-Length"] = str(header_length)
    left = count
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=sent) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


def instructions_per_request(root: Path, name: str, settings: dict[str, str], requests_counted: int,
                             headers: dict[str, str] | None = None, wire: str = "binary",
                             settle_s: float = 0.0) -> float:
    """Serve ``root/repo`` under callgrind with ``settings`` (APPLIANCE_* overrides, without the prefix); the
    instructions it spent on ``requests_counted`` requests to the tiny model ``add_one``, each. ``settle_s``: how
    long counting goes on after the last answer (for work the server hands off after answering)."""
    out = root / f"callgrind-{len(os.listdir(root))}.out"
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    with running_appliance_process(root / "repo", root / "state", root / "server.log", wrapper=wrapper,
                                   start_timeout_s=900, server_workers="1",
                                   **{key.lower(): value for key, value in settings.items()}) as (url, process):
        infer = f"{url}/v2/models/add_one/infer"
        asyncio.run(post_many(infer, 300, headers, wire))  # warm-up, not counted
        subprocess.run(["callgrind_control", "--instr=on", str(process.pid)], check=True, capture_output=True)
        asyncio.run(post_many(infer, requests_counted, headers, wire))
        time.sleep(settle_s)
        subprocess.run(["callgrind_control", "--instr=off", str(process.pid)], check=True, capture_output=True)
    totals = re.findall(r"^totals: (\d+)$", out.read_text(errors="replace"), re.M)
    if not totals:
        raise SystemExit(f"{name}: callgrind wrote no totals to {out}")
    return int(totals[-1]) / requests_counted

"""Drive HTTP load with wrk (a C load generator, so the client costs little CPU) and parse its latency report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local header = os.getenv("WRK_HEADER_LENGTH")
if header ~= nil and header ~= "" then wrk.headers["Inference-Header-Content-Length"] = header end
local extra = os.getenv("WRK_EXTRA_HEADERS")
if extra ~= nil then
  for line in extra:gmatch("[^\\n]+") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end
local f = io.open(os.getenv("WRK_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
"""
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class LoadResult:
    """One wrk run: throughput, latency percentiles (seconds) and failures."""

    requests: int
    rps: float
    p50_s: float
    p99_s: float
    errors: int


def require_wrk() -> str:
    """The wrk binary, or an error that says how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (Debian) and run the benchmark again")
    return path


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def post_load(url: str, body: bytes, content_type: str, connections: int, seconds: float,
              header_length: int | None = None, headers: dict[str, str] | None = None,
              timeout_s: float = 2.0) -> LoadResult:
    """POST ``body`` to ``url`` over ``connections`` keep-alive connections for ``seconds``, with ``headers``.

    ``timeout_s`` is wrk's per-request timeout (its default is 2 s): an answer slower than it is dropped from the
    latency figures and counted as an error, so benchmarks of slow answers raise it."""
    wrk = require_wrk()
    with tempfile.TemporaryDirectory() as folder:
        script, payload = Path(folder) / "post.lua", Path(folder) / "body"
        script.write_text(_SCRIPT)
        payload.write_bytes(body)
        env = {**os.environ, "WRK_BODY": str(payload), "WRK_CONTENT_TYPE": content_type,
               "WRK_HEADER_LENGTH": "" if header_length is None else str(header_length),
               "WRK_EXTRA_HEADERS": "\n".join(f"{name}: {value}" for name, value in (headers or {}).items())}
        out = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s:g}s", "--latency",
             "-s", str(script), url],
            env=env, capture_output=True, text=True, check=True, timeout=seconds + timeout_s + 60,
        ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                                                       r"timeout (\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return LoadResult(
        requests=requests,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_s=_seconds(re.search(r"\s50%\s+(\S+)", out).group(1)),
        p99_s=_seconds(re.search(r"\s99%\s+(\S+)", out).group(1)),
        errors=errors,
    )

"""Start `appliance serve` as a separate process for a benchmark, and stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by ``root_pid`` and its descendants, split into the span export
    processes (``export``) and the rest (``serving``: the supervisor and its workers), read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    used = {"serving": 0.0, "export": 0.0}
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in tree:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        kind = "export" if b"appliance.trace_export" in command else "serving"
        used[kind] += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return used


@contextlib.contextmanager
def running_appliance(repo: Path, state: Path, log: Path, **settings: str) -> Iterator[str]:
    """:func:`running_appliance_process`, yielding the URL alone."""
    with running_appliance_process(repo, state, log, **settings) as (url, _):
        yield url


@contextlib.contextmanager
def running_appliance_process(repo: Path, state: Path, log: Path, wrapper: tuple[str, ...] = (),
                              start_timeout_s: float = 120.0,
                              **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Serve ``repo`` on a free port until the block ends; ``settings`` are APPLIANCE_* overrides (e.g.
    ``SERVER_WORKERS="2"``). Yields the base URL once ``/v2/health/ready`` answers 200 (within
    ``start_timeout_s``). ``wrapper`` runs the server under another program (valgrind, say).

    The response cache is off unless ``settings`` turn it on: benchmarks repeat one request, and a hit would
    measure the cache instead of the model."""
    settings = {"CACHE_ENABLED": "false", **settings}
    port = free_port()
    env = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo), "APPLIANCE_PATHS_STATE_DIR": str(state),
           "APPLIANCE_SERVER_PORT": str(port), **{f"APPLIANCE_{k.upper()}": v for k, v in settings.items()}}
    with open(log, "w") as out:
        process = subprocess.Popen([*wrapper, sys.executable, "-m", "appliance.cli", "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with answering(process, lambda: requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200,
                   f"the appliance (see {log})", start_timeout_s, stop_timeout_s=max(60.0, start_timeout_s)):
        yield url, process


@contextlib.contextmanager
def answering(process: subprocess.Popen, ready: Callable[[], bool], name: str, start_timeout_s: float,
              stop_timeout_s: float = 60.0) -> Iterator[None]:
    """Wait until ``ready()`` (a request to the server ``process`` runs; a connection error counts as not yet) is
    true within ``start_timeout_s``, then run the block; stop the process after it. Exits, naming ``name``, if the
    process ends or does not get ready in time."""
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited while starting")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become ready within {start_timeout_s:.0f} s")
            try:
                if ready():
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

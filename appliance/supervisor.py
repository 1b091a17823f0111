"""Run ``server.workers`` server processes on one port and keep them running.

The supervisor binds nothing itself: each worker binds the port with SO_REUSEPORT, so the kernel spreads
connections over them. SIGTERM/SIGINT are passed on to every worker, which drains as a single server would. A
worker that dies unexpectedly is started again. Workers' metrics are summed through prometheus-client's
multiprocess mode.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from appliance.config import Config
from appliance.workers import WorkerGroup

log = logging.getLogger("appliance.supervisor")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


def _worker_main(config: Config, group: WorkerGroup, log_level: str) -> None:
    import uvloop

    from appliance.server import run_server

    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s worker-{group.index} "
                                                        "%(name)s: %(message)s")
    uvloop.run(run_server(config, workers=group))


def supervise(config: Config) -> int:
    """Start the workers, restart any that die, stop them all on SIGTERM/SIGINT; returns the exit status."""
    count = config.server.workers
    control_dir = Path(tempfile.mkdtemp(prefix="appliance-workers-"))  # private: mode 0700
    metrics_dir = control_dir / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # read by the workers' prometheus-client
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start(index: int) -> BaseProcess:
        group = WorkerGroup(index=index, count=count, control_dir=control_dir)
        process = context.Process(target=_worker_main, args=(config, group, config.server.log_level),
                                  name=f"appliance-worker-{index}")
        process.start()
        return process

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    workers = {index: start(index) for index in range(count)}
    restarts = {index: 0 for index in range(count)}
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    log.info("started %d workers on http://%s:%s", count, config.server.host, config.server.port)
    try:
        while not stopping:
            wait([p.sentinel for p in workers.values()], timeout=1.0)
            for index, process in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                _forget(process)
                delay = RESTART_BACKOFF_S[min(restarts[index], len(RESTART_BACKOFF_S) - 1)]
                log.error("worker %d exited with status %s; restarting it in %.1f s", index, process.exitcode, delay)
                time.sleep(delay)
                restarts[index] += 1
                workers[index] = start(index)
        deadline = time.monotonic() + config.server.drain_timeout_s + 10
        for process in workers.values():
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.name)
                process.kill()
                process.join()
        failed = [p.name for p in workers.values() if p.exitcode not in (0, -signal.SIGTERM)]
        return 1 if failed else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(control_dir, ignore_errors=True)


def _forget(process: BaseProcess) -> None:
    from prometheus_client import multiprocess

    if process.pid is not None:
        multiprocess.mark_process_dead(process.pid)

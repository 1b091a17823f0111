"""Run ``server.workers`` server processes on one port and keep them running.

The supervisor binds nothing itself: each worker binds the port with SO_REUSEPORT, so the kernel spreads
connections over them. SIGTERM/SIGINT are passed on to every worker, which drains as a single server would. A
worker that dies unexpectedly is started again. Workers' metrics are summed through prometheus-client's
multiprocess mode.

systemd hears from the supervisor only: each worker reports READY=1 over the same notify protocol to a datagram
socket of the supervisor's (one per worker), and the supervisor sends READY=1 once every worker has, STATUS= lines
as they come up, and the WATCHDOG=1 pings. SIGHUP is passed on to the workers that are up; each reloads itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from appliance.config import Config
from appliance.notify import notifier as process_notifier
from appliance.reload import ConfigSource
from appliance.workers import WorkerGroup

log = logging.getLogger("appliance.supervisor")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


def _worker_main(config: Config, group: WorkerGroup, log_level: str, source: ConfigSource | None = None) -> None:
    import uvloop

    from appliance.server import run_server

    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s worker-{group.index} "
                                                        "%(name)s: %(message)s")
    uvloop.run(run_server(config, workers=group, config_source=source, freeze_heap=True))


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    sock.bind(str(path))
    return sock


def supervise(config: Config, source: ConfigSource | None = None) -> int:
    """Start the workers, restart any that die, stop them all on SIGTERM/SIGINT; returns the exit status.

    With ``source``, SIGHUP makes every running worker reload (see :mod:`appliance.reload`).
    """
    count = config.server.workers
    control_dir = Path(tempfile.mkdtemp(prefix="appliance-workers-"))  # private: mode 0700
    metrics_dir = control_dir / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # read by the workers' prometheus-client
    context = multiprocessing.get_context("spawn")
    stopping = False
    systemd = process_notifier()
    groups = {index: WorkerGroup(index=index, count=count, control_dir=control_dir) for index in range(count)}
    inboxes = {index: _notify_socket(group.notify_socket(index)) for index, group in groups.items()}
    ready: dict[int, bool] = {index: False for index in range(count)}
    announced = False

    def start(index: int) -> BaseProcess:
        ready[index] = False
        process = context.Process(target=_worker_main, args=(config, groups[index], config.server.log_level, source),
                                  name=f"appliance-worker-{index}")
        process.start()
        return process

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        systemd.stopping("draining")
        for process in workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def on_hangup(_signum: int, _frame: object) -> None:
        # Only workers that are up have their reload handler; one still starting reads the new state anyway.
        for index, process in workers.items():
            if ready[index] and process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

    def read_inboxes() -> None:
        nonlocal announced
        for index, inbox in inboxes.items():
            while True:
                try:
                    message = inbox.recv(4096).decode(errors="replace")
                except BlockingIOError:
                    break
                if "READY=1" in message.splitlines() and not ready[index]:
                    ready[index] = True
                    up = sum(ready.values())
                    log.info("worker %d is ready (%d of %d)", index, up, count)
                    if up == count and not announced:
                        announced = True
                        systemd.ready(f"serving on http://{config.server.host}:{config.server.port} "
                                      f"with {count} workers")
                    elif not announced:
                        systemd.status(f"loading and warming models: {up} of {count} workers ready")

    workers = {index: start(index) for index in range(count)}
    restarts = {index: 0 for index in range(count)}
    restart_at: dict[int, float] = {}  # dead workers and when to start them again
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    log.info("started %d workers on http://%s:%s", count, config.server.host, config.server.port)
    systemd.status(f"loading and warming models: 0 of {count} workers ready")
    interval = systemd.watchdog_interval_s
    pinged = 0.0
    try:
        while not stopping:
            alive = [p.sentinel for i, p in workers.items() if i not in restart_at]
            wait(alive + list(inboxes.values()), timeout=min(1.0, interval or 1.0))
            read_inboxes()
            if interval is not None and time.monotonic() - pinged >= interval:
                systemd.watchdog()
                pinged = time.monotonic()
            now = time.monotonic()
            for index, process in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                if index not in restart_at:
                    _forget(process)
                    delay = RESTART_BACKOFF_S[min(restarts[index], len(RESTART_BACKOFF_S) - 1)]
                    log.error("worker %d exited with status %s; restarting it in %.1f s", index, process.exitcode,
                              delay)
                    restart_at[index] = now + delay  # the loop keeps pinging the watchdog and hearing signals
                elif now >= restart_at[index]:
                    del restart_at[index]
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
        for inbox in inboxes.values():
            inbox.close()
        shutil.rmtree(control_dir, ignore_errors=True)


def _forget(process: BaseProcess) -> None:
    from prometheus_client import multiprocess

    if process.pid is not None:
        multiprocess.mark_process_dead(process.pid)

"""Run the application: uvloop, signals, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from appliance.api.state import LIFECYCLE
from appliance.app import create_app
from appliance.config import Config
from appliance.workers import WorkerGroup

log = logging.getLogger("appliance.server")


async def run_server(
    config: Config,
    app: web.Application | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    workers: WorkerGroup | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain: stop accepting, finish in-flight requests, exit.

    As one of several ``workers``, share the port with the siblings and listen on a private control socket too.
    """
    app = app or create_app(config, workers=workers)
    server = config.server
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=server.drain_timeout_s)
    await runner.setup()  # runs the lifespan: models load and warm up here
    site = web.TCPSite(runner, server.host, server.port, backlog=2048, reuse_address=True,
                       reuse_port=workers is not None)
    await site.start()
    if workers is not None:
        await web.UnixSite(runner, str(workers.socket(workers.index))).start()
    lifecycle = app[LIFECYCLE]
    lifecycle.port = runner.addresses[0][1]  # the real port when server.port is 0
    log.info("serving on http://%s:%s", server.host, lifecycle.port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    lifecycle.draining = True
    log.info("draining: %d requests in flight, waiting up to %.1f s", lifecycle.in_flight, server.drain_timeout_s)
    await runner.cleanup()  # closes the listener, waits for in-flight handlers up to drain_timeout_s, unloads
    log.info("stopped")


def serve(config: Config) -> int:
    """Run the server on uvloop; returns the process exit status."""
    uvloop.run(run_server(config))
    return 0

"""Run the application: uvloop, signals (SIGTERM/SIGINT drain, SIGHUP reloads), systemd notifications."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

import uvloop
from aiohttp import web

from appliance.api.state import LIFECYCLE
from appliance.app import create_app
from appliance.config import Config
from appliance.listener import listen_error
from appliance.notify import Notifier, notifier as process_notifier
from appliance.reload import ConfigSource, Reloader
from appliance.workers import WorkerGroup

log = logging.getLogger("appliance.server")


async def run_server(
    config: Config,
    app: web.Application | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    workers: WorkerGroup | None = None,
    config_source: ConfigSource | None = None,
    notifier: Notifier | None = None,
    freeze_heap: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain: stop accepting, finish in-flight requests, exit.

    As one of several ``workers``, share the port with the siblings and listen on a private control socket too.
    With ``config_source`` and ``handle_signals``, SIGHUP reloads the configuration and the model repository.
    ``notifier`` (default: systemd's, from the environment; a worker's goes to its supervisor) hears READY=1
    once the models are warm and the port listens, STATUS= lines, WATCHDOG=1 pings and STOPPING=1.
    ``freeze_heap`` (a process of its own, not a test's): :func:`settle_heap` once warm and after each reload.
    Raises :class:`~appliance.listener.ListenError` (after unloading the models) when the port cannot be bound.
    """
    app = app or create_app(config, workers=workers)
    if notifier is None:
        notifier = Notifier(str(workers.notify_socket(workers.index))) if workers else process_notifier()
    watchdog = asyncio.get_running_loop().create_task(notifier.watchdog_loop())
    try:
        await _serve(config, app, stop, handle_signals, workers, config_source, notifier, freeze_heap)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


def settle_heap() -> None:
    """Free what is garbage now, then leave every object left out of the garbage collector's walks for good.

    What a serving process holds once warm (modules, models, tokenizers: some 70,000 objects) lives as long as it
    does, yet each full collection walked all of it: 20 ms, a pause of every request in flight, every couple of
    seconds at a few thousand requests a second. Frozen, it is never walked; what requests make still is. Objects
    frozen are not freed if they become garbage in a cycle, so call this again (it unfreezes first) once a reload
    has replaced what they held."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _serve(config: Config, app: web.Application, stop: asyncio.Event | None, handle_signals: bool,
                 workers: WorkerGroup | None, config_source: ConfigSource | None, notifier: Notifier,
                 freeze_heap: bool) -> None:
    server = config.server
    # handler_cancellation: a client that leaves cancels its handler, so that its queued or running work stops
    # (a generation frees its KV-cache row at the next step) instead of running for no one.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=server.drain_timeout_s,
                           handler_cancellation=True)
    loop = asyncio.get_running_loop()
    if handle_signals:
        loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: the server is still starting")
    notifier.status("loading and warming models")
    await runner.setup()  # runs the lifespan: models load and warm up here
    if freeze_heap:
        settle_heap()
    site = web.TCPSite(runner, server.host, server.port, backlog=2048, reuse_address=True,
                       reuse_port=workers is not None)
    try:
        await site.start()
    except OSError as exc:  # `appliance serve` probed the port before loading; another process took it since
        await runner.cleanup()
        raise listen_error(server.host, server.port, exc) from exc
    if workers is not None:
        await web.UnixSite(runner, str(workers.socket(workers.index))).start()
    lifecycle = app[LIFECYCLE]
    lifecycle.port = runner.addresses[0][1]  # the real port when server.port is 0
    log.info("serving on http://%s:%s", server.host, lifecycle.port)
    stop = stop or asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task] = set()
    if handle_signals and config_source is not None:
        reloader = Reloader(app, config_source, notifier)

        def on_hangup() -> None:
            log.info("SIGHUP: reloading the configuration and the model repository")
            task = loop.create_task(reloader.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)
            if freeze_heap:  # the models it replaced are garbage now, and what it loaded is here to stay
                task.add_done_callback(lambda _: settle_heap())

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if handle_signals:
        signals = (*signals, signal.SIGHUP)
    notifier.ready(f"serving on http://{server.host}:{lifecycle.port}")
    try:
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    for task in list(reloads):
        task.cancel()
    await asyncio.gather(*reloads, return_exceptions=True)
    notifier.stopping("draining")
    lifecycle.draining = True
    log.info("draining: %d requests in flight, waiting up to %.1f s", lifecycle.in_flight, server.drain_timeout_s)
    await runner.cleanup()  # closes the listener, waits for in-flight handlers up to drain_timeout_s, unloads
    log.info("stopped")


def serve(config: Config, config_source: ConfigSource | None = None) -> int:
    """Run the server on uvloop; returns the process exit status. ``config_source`` enables SIGHUP reloads."""
    uvloop.run(run_server(config, config_source=config_source, freeze_heap=True))
    return 0

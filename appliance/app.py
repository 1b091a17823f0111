"""The aiohttp application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TextIO

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.api import openai_api, openai_generate, v2
from appliance.api.middleware import TRACING, request_middleware
from appliance.api.openapi import openapi_document
from appliance.api import admin, status, usage
from appliance.accounting import Accounting
from appliance.admission import Admission
from appliance.api.state import (ACCESS_LOG, AUTH, CACHE, CONFIG, DATAPLANE, GPU_PROBE, LEDGER, LIFECYCLE, LIMITER,
                                 METRICS, MODELS, QUALITY, UPSTREAMS, WORKERS, Lifecycle)
from appliance.auth import Authenticator, RateLimiter, is_loopback
from appliance.cache.service import ResponseCacheService
from appliance.cloud import Cloud
from appliance.config import Config
from appliance.gpu_telemetry import GpuGauges, NvmlReader, open_nvml, sample_forever
from appliance.dataplane import DataPlane
from appliance.engine_factory import create_engine
from appliance.engine_registry import DecoderFactory
from appliance.keys import KeyStore
from appliance.ledger import CostLedger
from appliance.placement import Placement
from appliance.routing import Router
from appliance.routing_quality import RoutingQuality
from appliance.upstreams import Upstream
from appliance.model_version import EngineFactory
from appliance.repository import ModelManager
from appliance.telemetry import AccessLog, Metrics
from appliance.tracing import ExporterFactory, Tracing
from appliance.worker_activity import SharedActivity
from appliance.workers import WorkerGroup

log = logging.getLogger("appliance.app")
ACCESS_LOG_FLUSH_S = 0.2


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, app[AUTH].load)  # an invalid key store stops the start, with its reason
    await app[CACHE].open()
    if LEDGER in app:
        await app[LEDGER].start()
    for upstream in app[UPSTREAMS].values():
        await upstream.start()
    models = app[MODELS]
    states = await models.load_all()
    for state in states:
        log.info("model %s: %s %s", state.name, state.state, state.reason)
    if not states:
        log.warning("the model repository %s has no models", models.root)
    gpus = await loop.run_in_executor(None, app[GPU_PROBE])
    app[LIFECYCLE].started = True
    tasks = [loop.create_task(_flush_periodically(app[ACCESS_LOG], app[METRICS])),
             loop.create_task(app[AUTH].watch())]
    if gpus is not None:
        tasks.append(loop.create_task(sample_forever(gpus, GpuGauges(app[METRICS].registry))))
    if app[QUALITY].enabled:
        tasks.append(loop.create_task(app[QUALITY].run()))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if gpus is not None:
        await loop.run_in_executor(None, gpus.close)
    await models.close()
    await app[CACHE].close()
    for upstream in app[UPSTREAMS].values():
        await upstream.close()
    if LEDGER in app:
        await app[LEDGER].close()
    app[ACCESS_LOG].flush()
    app[METRICS].flush()  # the last increments (ledger counters, cache lookups) reach the shared files too


async def _flush_periodically(access_log: AccessLog, metrics: Metrics) -> None:
    """The buffered access log lines, and the batched metric increments (other worker processes' scrapes read
    this one's values from the shared files)."""
    while True:
        await asyncio.sleep(ACCESS_LOG_FLUSH_S)
        try:
            access_log.flush()
            metrics.flush()
        except Exception:  # a bug; but the timer must go on, or no line and no increment is written again
            log.exception("flushing the access log or the metric increments failed")


def _model_requests_in_flight(app: web.Application, config: Config, lifecycle: Lifecycle,
                              workers: WorkerGroup | None) -> Callable[[], int]:
    """What the routing-quality replays wait on: this worker's model requests in flight, or, with several workers
    and replays sampled, the whole group's (published through a shared file while the app runs)."""
    if workers is None or config.routing.quality_sample_ratio <= 0:
        return lambda: lifecycle.model_requests
    activity = SharedActivity(workers, lifecycle)
    app.cleanup_ctx.append(activity.lifespan)
    return activity.in_flight


def _generation_tiers(router: Router) -> tuple[str | None, str | None]:
    """The serving small and mid generation models, by name."""
    small, mid = router.tier("generate", "small"), router.tier("generate", "mid")
    return (small.name if small else None), (mid.name if mid else None)


def create_app(
    config: Config,
    *,
    engine_factory: EngineFactory = create_engine,
    decoder_factory: DecoderFactory | None = None,
    metrics: Metrics | None = None,
    access_log_stream: TextIO | None = None,
    workers: WorkerGroup | None = None,
    gpu_probe: Callable[[], NvmlReader | None] = open_nvml,
    span_exporter: ExporterFactory | None = None,
    status_interval_s: float = 5.0,
) -> web.Application:
    """Build the application; models load when it starts (``cleanup_ctx``) and unload when it stops.

    ``gpu_probe`` opens the GPU telemetry reader at start (``None``: no GPU, no ``appliance_gpu_*`` series).
    ``span_exporter`` makes a span exporter in the serving process when ``[tracing]`` is enabled (default: an export
    process per serving process sends OTLP/HTTP to its endpoint).
    ``status_interval_s``: how often the status page's history takes a reading of the metrics.
    """
    app = web.Application(middlewares=[request_middleware], client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = metrics or Metrics()
    app[ACCESS_LOG] = AccessLog(access_log_stream, enabled=config.server.access_log)
    app[MODELS] = ModelManager(config, engine_factory, app[METRICS], decoder_factory=decoder_factory)
    app[CACHE] = ResponseCacheService(config.cache, config.paths.response_cache_dir(), app[METRICS])
    app[UPSTREAMS] = {name: Upstream(upstream, metrics=app[METRICS]) for name, upstream in config.upstreams.items()}
    placement = Placement(Router(config.routing, app[MODELS]), Admission(config.admission), app[UPSTREAMS],
                          app[METRICS])
    app[METRICS].watch_lanes(lambda: placement.lanes(app[MODELS].serving()))
    if config.ledger.enabled:
        app[LEDGER] = CostLedger(config.paths.ledger_dir(), app[METRICS].registry,
                                 max_workflows=config.ledger.max_workflows, pending=app[METRICS].pending)
    app[AUTH] = Authenticator(KeyStore(config.paths.keys()), loopback_only=is_loopback(config.server.host))
    app[LIMITER] = RateLimiter(share=1.0 / (workers.count if workers is not None else 1))
    accounting = Accounting(app.get(LEDGER), app[LIMITER], config.ledger.device_rate_per_hour)
    app[DATAPLANE] = dataplane = DataPlane(app[MODELS], app[CACHE], placement, Cloud(app[UPSTREAMS]), accounting)
    app[LIFECYCLE] = lifecycle = Lifecycle()
    app[QUALITY] = dataplane.quality = RoutingQuality(
        config.routing, dataplane.generate, dataplane.embed, lambda: _generation_tiers(placement.router),
        _model_requests_in_flight(app, config, lifecycle, workers), app[METRICS].registry)
    app[GPU_PROBE] = gpu_probe
    if workers is not None:
        app[WORKERS] = workers
    v2.add_routes(app)
    openai_api.add_routes(app)
    openai_generate.add_routes(app)
    admin.add_routes(app)
    usage.add_routes(app)
    status.add_routes(app, interval_s=status_interval_s)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_document)
    if config.tracing.enabled:  # the provider is made in the serving process, first in and last out
        app[TRACING] = tracing = Tracing(config.tracing, span_exporter, app[METRICS].traces_dropped.inc)
        app.cleanup_ctx.append(tracing.lifespan)
    app.cleanup_ctx.append(_lifespan)
    return app

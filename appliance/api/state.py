"""Typed keys for what the aiohttp application and its requests carry, and the server's lifecycle state."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from appliance.auth import Authenticator, RateLimiter
from appliance.cache.service import ResponseCacheService
from appliance.config import Config
from appliance.ledger import CostLedger
from appliance.dataplane import DataPlane
from appliance.repository import ModelManager
from appliance.routing_quality import RoutingQuality
from appliance.telemetry import AccessLog, Metrics
from appliance.types import Caller, Trace
from appliance.workers import WorkerGroup


@dataclass
class Lifecycle:
    """Whether the server has finished starting, whether it drains, and how many requests are in flight."""

    started: bool = False
    draining: bool = False
    in_flight: int = 0
    model_requests: int = 0  # of those in flight, the ones that run models (inference, embeddings, generation)
    model_started: int = 0  # model requests started since the server started
    port: int = 0


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
MODELS = web.AppKey("models", ModelManager)
DATAPLANE = web.AppKey("dataplane", DataPlane)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
AUTH = web.AppKey("auth", Authenticator)
CACHE = web.AppKey("cache", ResponseCacheService)
LEDGER = web.AppKey("ledger", CostLedger)  # absent when [ledger] enabled = false
UPSTREAMS = web.AppKey("upstreams", dict)  # name -> Upstream
LIMITER = web.AppKey("limiter", RateLimiter)
GPU_PROBE = web.AppKey("gpu_probe", object)  # opens the GPU telemetry reader at start (None: no GPU)
QUALITY = web.AppKey("quality", RoutingQuality)  # the routing-quality replays (sampling may be off)
WORKERS = web.AppKey("workers", WorkerGroup)  # present only when several worker processes share the port
TRACE = web.RequestKey("trace", Trace)  # per-request Trace: made by the middleware, filled in by the data plane
CALLER = web.RequestKey("caller", Caller)  # who sent the request and under which policy, set by the middleware
__all__ = [
    "ACCESS_LOG", "AUTH", "CACHE", "CALLER", "CONFIG", "GPU_PROBE", "LEDGER", "UPSTREAMS", "LIMITER", "DATAPLANE", "LIFECYCLE",
    "METRICS", "MODELS", "QUALITY", "TRACE", "WORKERS", "Lifecycle", "Trace",
]

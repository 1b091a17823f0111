"""The operator's status page: ``GET /`` and ``GET /ui`` (one self-contained HTML file, no data in it) and
``GET /v1/status``, the JSON it polls.

Who sees what: the HTML shell is public, like ``/openapi.json``; it carries nothing but code. ``/v1/status``
answers like every other non-public path (the local operator of a keyless loopback server, else any valid key);
with ``server.metrics_access = "admin"`` it needs an admin key, as ``/metrics`` does, since it shows the same
series. A key limited to some models sees only those models. Today's cost by tenant and workflow (the ledger's,
as ``/v1/usage`` gives it) is in the answer for an admin caller only.

With several worker processes the rates, percentiles and lanes are those of every worker together, read from the
shared metric files as ``/metrics`` reads them; the model states, the upstreams' breakers and the in-flight counts
are those of the worker that answered (``server.worker``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import importlib.resources
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from appliance import __version__
from appliance.api.state import AUTH, CALLER, CONFIG, LEDGER, LIFECYCLE, METRICS, MODELS, QUALITY, UPSTREAMS, WORKERS
from appliance.auth import require_admin
from appliance.errors import BadRequest
from appliance.keys import LANES
from appliance.models import GenerativeModel
from appliance.status_history import Reading, StatusHistory, derive, read_now, sample_forever
from appliance.types import Principal

STATUS_HISTORY = web.AppKey("status_history", StatusHistory)
PAGE_PATHS = ("/", "/ui")
DEFAULT_WINDOW_S = 300
WINDOW_RANGE_S = (10, 900)  # up to the history's span (15 minutes by default)


@functools.cache
def _page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy: only its own inline script and style run, and it may
    connect to this server alone (so the browser itself refuses anything from outside the box)."""
    html = importlib.resources.files("appliance.api").joinpath("status_page.html").read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert body is not None, f"status_page.html has no <{tag}>"
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.group(1).encode()).digest()).decode() + "'"

    policy = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), policy


async def status_page(request: web.Request) -> web.Response:
    """GET / and /ui: the status page (HTML, inline CSS and JS; it polls ``/v1/status``)."""
    body, policy = await asyncio.get_running_loop().run_in_executor(None, _page)
    if request.app[AUTH].required:  # the page asks for a key at once instead of drawing a 401 first
        body = body.replace(b'<html lang="en">', b'<html lang="en" data-keys="required">', 1)
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": policy, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer"})


def _window(request: web.Request) -> int:
    unknown = sorted(set(request.query) - {"window_s"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; /v1/status takes window_s", param=unknown[0])
    raw = request.query.get("window_s", str(DEFAULT_WINDOW_S))
    low, high = WINDOW_RANGE_S
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
        raise BadRequest(f"window_s must be a whole number of seconds from {low} to {high}, not {raw!r}",
                         param="window_s")
    return int(raw)


async def get_status(request: web.Request) -> web.Response:
    """GET /v1/status: the server, its models and lanes, recent latency, throughput, cache and routing figures
    with their history, upstreams, GPUs and (admin) today's cost."""
    app = request.app
    principal = request[CALLER].principal
    assert principal is not None  # not a public path: the middleware authenticated the caller
    if app[CONFIG].server.metrics_access == "admin":
        require_admin(principal, "GET /v1/status (server.metrics_access = 'admin')")
    window_s = _window(request)
    history = app[STATUS_HISTORY]
    now = await read_now(app[METRICS])
    then = history.before(now.t - window_s)
    recent = derive(now, then)
    payload: dict[str, Any] = {
        "object": "status",
        "server": _server(app, now.t),
        "caller": {"name": principal.key_name, "tenant": principal.tenant, "admin": principal.admin},
        "window_s": round(now.t - then.t, 3) if then is not None else None,
        "recent": recent,
        "models": _models(app, principal, now, then),
        "upstreams": _upstreams(app, principal, recent),
        "gpus": _gpus(now),
        "routing_quality": app[QUALITY].report(),  # score bands and agreement, no tenant or request data
        "history": history.series(),
    }
    if principal.admin:
        payload["cost"] = await _cost(app)
    return web.Response(body=orjson.dumps(payload), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _server(app: web.Application, t: float) -> dict[str, Any]:
    lifecycle = app[LIFECYCLE]
    workers = app.get(WORKERS)
    started = app[STATUS_HISTORY].started_at
    return {"version": __version__, "time": t, "started_at": started,
            "uptime_s": round(t - started, 3) if started is not None else None,
            "ready": lifecycle.started and not lifecycle.draining, "draining": lifecycle.draining,
            "in_flight": lifecycle.in_flight, "keys_required": app[AUTH].required,
            "worker": {"index": workers.index, "count": workers.count} if workers is not None else None,
            "sample_interval_s": app[STATUS_HISTORY].interval_s}


def _models(app: web.Application, principal: Principal, now: Reading, then: Reading | None) -> list[dict]:
    manager = app[MODELS]
    serving = {model.name: model for model in manager.serving()}
    admission = app[CONFIG].admission
    max_wait = {"interactive": admission.interactive_max_wait_ms / 1000, "batch": admission.batch_max_wait_ms / 1000}
    gauges = now.gauges
    entries = []
    for state in manager.index():  # lists the repository's folders, as POST /v2/repository/index does
        served = serving.get(state.name)
        if not principal.may_use(state.name, *(served.spec.aliases if served is not None else ())):
            continue
        entry: dict[str, Any] = {"name": state.name, "state": state.state, "reason": state.reason,
                                 "version": state.version}
        if served is not None and state.state == "READY":
            spec, runtime = served.spec, served.runtime
            version = (state.name, str(served.version))
            entry.update({
                "task": spec.task, "tier": spec.tier or None, "aliases": spec.aliases,
                "deterministic": spec.deterministic,
                "runtime": {"kind": runtime.kind, "providers": list(runtime.providers),
                            "plan": runtime.plan.name if runtime.plan is not None else None,
                            "summary": runtime.summary},
                "device": f"gpu {','.join(map(str, runtime.gpus))}" if runtime.on_gpu else "cpu",
                "resident_since": served.loaded_at,
                "lanes": _lanes(gauges, version, max_wait),
                "recent": derive(now, then, state.name),
            })
            if isinstance(served, GenerativeModel) and served.generation_limits is not None:
                entry["kv_cache"] = {
                    "rows": served.generation_limits.slots, "tokens_per_row": served.generation_limits.capacity,
                    "running": gauges["appliance_running_sequences"].get(version, 0.0),
                    "waiting": gauges["appliance_waiting_sequences"].get(version, 0.0),
                    "usage_ratio": gauges["appliance_kv_cache_usage_ratio"].get(version, 0.0), **served.kv_cache}
        entries.append(entry)
    return entries


def _lanes(gauges: dict[str, dict[tuple[str, ...], float]], version: tuple[str, str],
           max_wait: dict[str, float]) -> dict[str, Any] | None:
    """The gate of a version, as its ``appliance_lane_*`` gauges give it (``None`` with admission off)."""
    if version not in gauges["appliance_lane_queue_capacity"]:
        return None
    return {
        "capacity": gauges["appliance_lane_queue_capacity"][version],
        "active": gauges["appliance_lane_active"].get(version, 0.0),
        "active_limit": gauges["appliance_lane_active_limit"].get(version, 0.0),
        "lanes": {lane: {"waiting": gauges["appliance_lane_queue_depth"].get((*version, lane), 0.0),
                         "estimated_wait_s": gauges["appliance_lane_estimated_wait_seconds"].get((*version, lane), 0.0),
                         "max_wait_s": max_wait[lane]} for lane in LANES},
    }


def _upstreams(app: web.Application, principal: Principal, recent: dict[str, Any]) -> list[dict]:
    entries = []
    for name, upstream in app[UPSTREAMS].items():
        config = upstream.config
        entry = {"name": name, "kind": config.kind, "breaker": upstream.breaker.state,
                 "available": upstream.available(), "in_flight": upstream.in_flight,
                 "max_concurrency": config.max_concurrency,
                 "models": sorted(name for name in config.models if principal.may_use(name) or name == "*"),
                 "recent_calls": recent["upstream_calls"].get(name, {})}
        if principal.admin:
            entry["base_url"] = config.base_url
        entries.append(entry)
    return entries


def _gpus(now: Reading) -> list[dict]:
    gauges = now.gauges
    fields = {"utilization_ratio": "appliance_gpu_utilization_ratio",
              "memory_used_bytes": "appliance_gpu_memory_used_bytes",
              "memory_total_bytes": "appliance_gpu_memory_total_bytes",
              "temperature_celsius": "appliance_gpu_temperature_celsius", "power_watts": "appliance_gpu_power_watts"}
    gpus = sorted(gauges["appliance_gpu_utilization_ratio"], key=lambda key: int(key[0]) if key[0].isdigit() else 0)
    return [{"index": gpu, "name": name, **{field: gauges[series].get((gpu, name)) for field, series in fields.items()}}
            for gpu, name in gpus]


async def _cost(app: web.Application) -> dict[str, Any] | None:
    """Today's (UTC) ledger totals by tenant, workflow and place; ``None`` when the ledger is off."""
    ledger = app.get(LEDGER)
    if ledger is None:
        return None
    day = time.strftime("%Y-%m-%d", time.gmtime())
    rows = await ledger.query(since=day, until=day, group_by=("tenant", "workflow", "place"))
    fields = ("requests", "input_tokens", "output_tokens", "cost", "cost_avoided")

    def by(dimension: str) -> list[dict[str, Any]]:
        sums: dict[str, dict[str, Any]] = {}
        for row in rows:
            total = sums.setdefault(row[dimension], {dimension: row[dimension], **dict.fromkeys(fields, 0.0)})
            for name in fields:
                total[name] += row[name]
        return sorted(sums.values(), key=lambda total: (-total["cost"], -total["requests"], total[dimension]))

    return {"day": day, "total": sum(row["cost"] for row in rows),
            "avoided": sum(row["cost_avoided"] for row in rows),
            "requests": sum(row["requests"] for row in rows),
            "by_tenant": by("tenant"), "by_workflow": by("workflow"), "by_place": by("place")}


def add_routes(app: web.Application, interval_s: float = 5.0, keep_s: float = 900.0) -> None:
    """Register the page and ``/v1/status``, and the sampler of the history (a reading every ``interval_s``,
    kept for ``keep_s``) that runs while the app does."""
    app[STATUS_HISTORY] = StatusHistory(interval_s, keep_s)
    for path in PAGE_PATHS:
        app.router.add_get(path, status_page)
    app.router.add_get("/v1/status", get_status)
    app.cleanup_ctx.append(_sampler)


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    app[STATUS_HISTORY].started_at = time.time()
    task = asyncio.get_running_loop().create_task(sample_forever(app[STATUS_HISTORY], app[METRICS]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

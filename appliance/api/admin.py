"""Admin endpoints (an admin key is required; the middleware checks it): the response cache's state and purge,
and the routing-quality replays' agreement per score band."""

from __future__ import annotations

import orjson
from aiohttp import web

from appliance.api.openai_api import read_json
from appliance.api.state import CACHE, QUALITY
from appliance.errors import BadRequest
from appliance.keys import NAME


def _json(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def cache_stats(request: web.Request) -> web.Response:
    """GET /admin/cache: entries, bytes and the size cap of the response cache, and what the answering worker holds
    in its memory (``memory``)."""
    cache = request.app[CACHE]
    stats = await cache.stats()
    return _json({**stats, "enabled": cache.enabled, "ttl_s": cache.config.ttl_s, "memory": cache.memory_stats()})


async def cache_purge(request: web.Request) -> web.Response:
    """POST /admin/cache/purge with ``{"tenant": ..., "key": ..., "model": ...}``: delete matching entries.

    ``tenant`` purges the entries shared by a tenant's keys, ``key`` (an id) those private to one key; with
    ``model`` alone every scope's entries of that model go; ``{"all": true}`` empties the cache.
    """
    body = await read_json(request)
    unknown = sorted(set(body) - {"tenant", "key", "model", "all"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; purge takes tenant, key, model or all")
    for field in ("tenant", "key", "model"):
        value = body.get(field)
        if value is not None and (not isinstance(value, str) or not NAME.fullmatch(value)):
            raise BadRequest(f"{field} must be a name of 1 to 64 letters, digits, '.', '_' or '-', not {value!r}")
    if body.get("all") is not None and not isinstance(body["all"], bool):
        raise BadRequest(f"all must be true or false, not {body['all']!r}")
    if body.get("tenant") and body.get("key"):
        raise BadRequest("give tenant or key, not both: a key's private entries and a tenant's shared ones are "
                         "different scopes")
    scope = f"tenant:{body['tenant']}" if body.get("tenant") else f"key:{body['key']}" if body.get("key") else None
    if scope is None and not body.get("model") and body.get("all") is not True:
        raise BadRequest('say what to purge: tenant, key and/or model, or {"all": true} for everything')
    purged = await request.app[CACHE].purge(scope, body.get("model"))
    return _json({"purged": purged})


async def routing_quality(request: web.Request) -> web.Response:
    """GET /admin/routing/quality: how often the small and mid tiers agree, per complexity-score band."""
    return _json(request.app[QUALITY].report())


def add_routes(app: web.Application) -> None:
    """Register the admin routes."""
    app.router.add_get("/admin/cache", cache_stats)
    app.router.add_get("/admin/routing/quality", routing_quality)
    app.router.add_post("/admin/cache/purge", cache_purge)

"""``GET /v1/usage`` (admin key): the cost ledger's totals, filtered and grouped."""

from __future__ import annotations

import orjson
from aiohttp import web

from appliance.api.state import LEDGER
from appliance.errors import BadRequest, FeatureDisabled
from appliance.ledger import GROUP_FIELDS

FILTERS = ("tenant", "key", "model", "place", "workflow", "since", "until", "group_by")
TOTALS = ("requests", "input_tokens", "output_tokens", "compute_s", "cost", "cost_avoided")


async def get_usage(request: web.Request) -> web.Response:
    """Totals per day, tenant, key, model, place (local, cloud, cache) and workflow.

    Query parameters filter (``tenant``, ``key``, ``model``, ``place``, ``workflow``, ``since`` and ``until`` as
    ``YYYY-MM-DD``, inclusive) and ``group_by`` names the dimensions to keep (comma separated; the others are summed).
    """
    if LEDGER not in request.app:
        raise FeatureDisabled("the cost ledger is off on this server ([ledger] enabled = false, or "
                              "APPLIANCE_LEDGER_ENABLED=false); turn it on and restart to record usage")
    query = request.query
    unknown = sorted(set(query) - set(FILTERS))
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; /v1/usage takes {', '.join(FILTERS)}")
    # Spaces and empty items are ignored, and a dimension named twice is kept once.
    names = (name.strip(" ") for name in query.get("group_by", ",".join(GROUP_FIELDS)).split(","))
    group_by = list(dict.fromkeys(name for name in names if name))
    try:
        rows = await request.app[LEDGER].query(
            tenant=query.get("tenant"), key_id=query.get("key"), model=query.get("model"), place=query.get("place"),
            workflow=query.get("workflow"), since=query.get("since"), until=query.get("until"), group_by=group_by)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    totals = {name: sum(row[name] for row in rows) for name in TOTALS}
    return web.Response(body=orjson.dumps({"object": "list", "data": rows, "totals": totals}),
                        content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the usage route."""
    app.router.add_get("/v1/usage", get_usage)

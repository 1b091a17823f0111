"""The OpenAPI document matches the routes the server really has."""

from __future__ import annotations

import requests

from appliance.api.openapi import build_openapi
from appliance.app import create_app
from appliance.config import load_config


def test_every_route_is_documented_and_every_documented_route_exists():
    app = create_app(load_config(None, {}))
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info()
        routes.add((info.get("path") or info.get("formatter"), route.method.lower()))
    documented = {(path, method) for path, operations in build_openapi()["paths"].items() for method in operations}
    assert routes == documented


def test_served_document(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert "/v2/models/{model}/infer" in document["paths"]
    for operations in document["paths"].values():
        for operation in operations.values():
            assert operation["responses"]

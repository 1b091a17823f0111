"""What /metrics exposes and to whom: no ``_created`` series, and ``server.metrics_access = "admin"`` asks for an
admin key (the series name tenants and models)."""

from __future__ import annotations

import pytest
import requests

from appliance.keys import KeyStore
from conftest import RunningServer, make_config


def test_counters_and_histograms_have_no_created_series(server):
    requests.post(f"{server.url}/v2/models/add_one/infer", timeout=10, json={
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert "appliance_requests_total{" in metrics and "appliance_request_duration_seconds_bucket{" in metrics
    assert "_created" not in metrics


@pytest.fixture(scope="module")
def admin_metrics(standard_repo, tmp_path_factory):
    state = tmp_path_factory.mktemp("metrics-admin-state")
    store = KeyStore(state / "keys.json")
    tokens = {"admin": store.create(name="scraper", tenant="ops", admin=True)[1],
              "user": store.create(name="app", tenant="team-a")[1]}
    running = RunningServer(make_config(standard_repo, state, server={"metrics_access": "admin"})).start()
    yield running, tokens
    running.stop()


def test_admin_metrics_access_needs_an_admin_key(admin_metrics):
    server, tokens = admin_metrics
    url = f"{server.url}/metrics"
    anonymous = requests.get(url, timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]
    user = requests.get(url, headers={"Authorization": f"Bearer {tokens['user']}"}, timeout=10)
    assert user.status_code == 403 and "metrics_access" in user.json()["error"]
    admin = requests.get(url, headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=10)
    assert admin.status_code == 200 and "appliance_requests_total" in admin.text
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200  # probes stay public

"""API keys over real HTTP: 401, 403 and 429 with their bodies, admin endpoints, revocation while serving, the
loopback-only rule, and the rejection metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from appliance.keys import KeyStore
from conftest import RunningServer, free_port, make_config
from waiting import wait_until

BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def keyed(standard_repo, tmp_path_factory):
    """A server whose key store has an admin, a key for add_one only, a limited key and a spare to revoke."""
    state = tmp_path_factory.mktemp("auth-state")
    store = KeyStore(state / "keys.json")
    tokens = {
        "admin": store.create(name="ops", tenant="ops", admin=True)[1],
        "narrow": store.create(name="narrow", tenant="team-a", models=("add_one",))[1],
        "limited": store.create(name="limited", tenant="team-b", requests_per_minute=3)[1],
        "spare": store.create(name="spare", tenant="team-c")[1],
    }
    running = RunningServer(make_config(standard_repo, state)).start()
    yield running, store, tokens
    running.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def infer(url: str, model: str = "add_one", **headers: str) -> requests.Response:
    return requests.post(f"{url}/v2/models/{model}/infer", json=BODY, headers=headers, timeout=30)


def test_missing_or_unknown_key_is_401_with_a_json_body(keyed):
    running, _, tokens = keyed
    missing = infer(running.url)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["error"]
    wrong = infer(running.url, **bearer(tokens["narrow"][:-2] + "xx"))
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["error"]
    assert infer(running.url, Authorization="Basic abc").status_code == 401
    openai_shape = requests.post(f"{running.url}/v1/embeddings", json={"model": "x", "input": "y"}, timeout=10)
    assert openai_shape.status_code == 401 and openai_shape.json()["error"]["type"] == "authentication_error"


def test_a_valid_key_is_served_and_probes_stay_public(keyed):
    running, _, tokens = keyed
    response = infer(running.url, **bearer(tokens["narrow"]))
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [2, 3, 4, 5]
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"):
        assert requests.get(running.url + path, timeout=10).status_code == 200, path


def test_a_model_outside_the_keys_list_is_403_and_hidden_from_the_model_list(keyed):
    running, _, tokens = keyed
    response = infer(running.url, "int_double", **bearer(tokens["narrow"]))
    assert response.status_code == 403
    assert "may not call model 'int_double'" in response.json()["error"] and "add_one" in response.json()["error"]
    listed = requests.get(f"{running.url}/v1/models", headers=bearer(tokens["narrow"]), timeout=10).json()
    assert [entry["id"] for entry in listed["data"]] == ["add_one"]
    everything = requests.get(f"{running.url}/v1/models", headers=bearer(tokens["admin"]), timeout=10).json()
    assert len(everything["data"]) > 1


def test_admin_endpoints_need_an_admin_key(keyed):
    running, _, tokens = keyed
    index = f"{running.url}/v2/repository/index"
    refused = requests.post(index, headers=bearer(tokens["narrow"]), timeout=10)
    assert refused.status_code == 403 and "admin key" in refused.json()["error"]
    assert requests.post(index, headers=bearer(tokens["admin"]), timeout=10).status_code == 200
    purge = requests.post(f"{running.url}/admin/cache/purge", json={"all": True}, headers=bearer(tokens["narrow"]),
                          timeout=10)
    assert purge.status_code == 403


def test_over_the_request_limit_is_429_with_retry_after(keyed):
    running, _, tokens = keyed
    statuses = [infer(running.url, **bearer(tokens["limited"])) for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 20  # one request's share of a minute at 3 per minute
    assert "3 requests per minute" in limited.json()["error"]
    # Other keys are not affected.
    assert infer(running.url, **bearer(tokens["admin"])).status_code == 200


def test_revocation_takes_effect_without_a_restart(keyed):
    running, store, tokens = keyed
    assert infer(running.url, **bearer(tokens["spare"])).status_code == 200
    store.revoke("spare")  # the server watches the key file
    wait_until(lambda: infer(running.url, **bearer(tokens["spare"])).status_code != 200, 10,
               "the revoked key to be refused")
    assert infer(running.url, **bearer(tokens["spare"])).status_code == 401
    # A key created while serving works too.
    _, fresh = store.create(name="fresh", tenant="team-c")
    wait_until(lambda: infer(running.url, **bearer(fresh)).status_code == 200, 10, "the new key to be accepted")


def test_rejections_are_counted_by_reason(keyed):
    running, _, tokens = keyed
    infer(running.url)
    infer(running.url, "int_double", **bearer(tokens["narrow"]))
    text = requests.get(f"{running.url}/metrics", timeout=10).text
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("appliance_auth_rejected_total{")}
    assert counts["unauthenticated"] >= 1 and counts["forbidden"] >= 1
    assert tokens["narrow"] not in text and "narrow" not in text


def test_tokens_per_minute_limits_embedding_work(minilm_repo, tmp_path):
    state = tmp_path / "state"
    _, token = KeyStore(state / "keys.json").create(name="small", tenant="t", tokens_per_minute=40)
    running = RunningServer(make_config(minilm_repo, state)).start()
    try:
        url = f"{running.url}/v1/embeddings"
        body = {"model": "minilm-l6", "input": ["one two three four five six seven eight nine ten"] * 3}
        first = requests.post(url, json=body, headers=bearer(token), timeout=30)
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] > 30
        second = requests.post(url, json=body, headers=bearer(token), timeout=30)
        assert second.status_code in (200, 429)
        third = requests.post(url, json=body, headers=bearer(token), timeout=30)
        assert third.status_code == 429 and "40 tokens per minute" in third.json()["error"]["message"]
        assert int(third.headers["Retry-After"]) >= 1
    finally:
        running.stop()


def test_serve_refuses_a_public_address_without_keys_and_says_why(standard_repo, tmp_path):
    env = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(standard_repo),
           "APPLIANCE_PATHS_STATE_DIR": str(tmp_path / "state"), "APPLIANCE_SERVER_HOST": "0.0.0.0",
           "APPLIANCE_SERVER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "no active API keys" in result.stderr and "appliance keys create" in result.stderr


def test_a_server_bound_to_loopback_without_keys_serves_local_callers(server):
    assert infer(server.url).status_code == 200


def test_key_store_file_holds_hashes_only(keyed):
    _, store, tokens = keyed
    text = Path(store.path).read_text()
    for token in tokens.values():
        assert token.split("_", 2)[2] not in text

"""Routing quality through a real server: small-tier routes are replayed on both smollm2-135m tiers when the server
is idle, their agreement shows per score band at GET /admin/routing/quality and in /metrics (embedding cosine by
minilm-l6), requests of a no-retention key or asking ``x-appliance-data: local-only-no-retention`` are never kept
(nor cached), and interactive requests keep their answers while replays run."""

from __future__ import annotations

import os

import pytest
import requests

from appliance.keys import KeyStore
from conftest import RunningServer, make_config
from waiting import wait_until

SHORT = ["Hi!", "Hello there", "Thanks!", "Good morning"]


@pytest.fixture(scope="module")
def replaying(tmp_path_factory, smollm2_repo, minilm_repo):
    repo = tmp_path_factory.mktemp("quality-repo")
    for source in (smollm2_repo / "smollm2-135m", smollm2_repo / "smollm2-135m-fast", minilm_repo / "minilm-l6"):
        os.symlink(source, repo / source.name)
    state = tmp_path_factory.mktemp("quality-state")
    store = KeyStore(state / "keys.json")
    tokens = {"ops": store.create(name="ops", tenant="ops", admin=True)[1],
              "app": store.create(name="app", tenant="acme")[1],
              "private": store.create(name="private", tenant="acme", retention=False)[1]}
    config = make_config(repo, state, cache={"enabled": True},
                         routing={"quality_sample_ratio": 1.0, "quality_idle_ms": 50, "quality_max_tokens": 8})
    running = RunningServer(config).start()
    yield running, tokens
    running.stop()


def chat(url: str, token: str, text: str, **headers: str) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {token}",
                                                                             **headers},
                         json={"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                               "temperature": 0})


def report(url: str, token: str) -> dict:
    response = requests.get(f"{url}/admin/routing/quality", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_small_tier_routes_are_replayed_on_both_tiers_and_reported_per_band(replaying):
    server, tokens = replaying
    for text in SHORT:
        answer = chat(server.url, tokens["app"], text)
        assert answer.status_code == 200 and answer.headers["x-appliance-model"] == "smollm2-135m-fast", answer.text
    done = wait_until(lambda: (r := report(server.url, tokens["ops"])) and sum(
        b["replays"] for b in r["bands"]) >= len(SHORT) and r, 180, "the replays to run")
    assert (done["small_tier"], done["mid_tier"]) == ("smollm2-135m-fast", "smollm2-135m")
    assert done["pending"] == 0 and done["skipped"]["failed"] == 0
    for band in done["bands"]:
        assert band["band"] in ("0.0-0.1", "0.1-0.2", "0.2-0.3") and band["routed_to_small"]
        assert 0 <= band["exact_match_rate"] <= 1 and band["cosines_measured"] == band["replays"]
        assert -1.0 <= band["min_cosine"] <= band["mean_cosine"] <= 1.0
    status = requests.get(f"{server.url}/v1/status", headers={"Authorization": f"Bearer {tokens['app']}"},
                          timeout=30).json()["routing_quality"]  # what the status page draws, for any key
    assert sum(b["replays"] for b in status["bands"]) >= len(SHORT) and status["sample_ratio"] == 1.0
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    assert "appliance_routing_quality_replays_total{band=" in metrics
    assert "appliance_routing_quality_cosine_bucket{band=" in metrics
    # Replays are the appliance's own work, accounted to its own tenant in the batch lane.
    usage = requests.get(f"{server.url}/v1/usage?group_by=tenant", timeout=30,
                         headers={"Authorization": f"Bearer {tokens['ops']}"}).json()
    assert "appliance" in str(usage)


REPRODUCIBLE = {"x-appliance-reproducible": "true"}  # greedy and run as if alone: an answer the cache may keep


def test_no_retention_requests_are_never_kept_nor_cached(replaying):
    server, tokens = replaying
    before = report(server.url, tokens["ops"])["skipped"]["no_retention"]
    for _ in range(2):
        by_key = chat(server.url, tokens["private"], "Hi again!", **REPRODUCIBLE)
        assert by_key.status_code == 200 and by_key.headers.get("x-cache") in (None, "bypass"), by_key.headers
    by_header = chat(server.url, tokens["app"], "Hello once more",
                     **{"x-appliance-data": "local-only-no-retention", **REPRODUCIBLE})
    assert by_header.status_code == 200 and by_header.headers.get("x-cache") in (None, "bypass")
    assert report(server.url, tokens["ops"])["skipped"]["no_retention"] == before + 3
    kept = chat(server.url, tokens["app"], "Hello once more", **REPRODUCIBLE)  # without the policy: kept
    assert kept.headers.get("x-cache") == "miss"
    assert chat(server.url, tokens["app"], "Hello once more", **REPRODUCIBLE).headers.get("x-cache") == "hit"
    refused = chat(server.url, tokens["app"], "x", **{"x-appliance-data": "no-retention-please"})
    assert refused.status_code == 400 and "local-only-no-retention" in refused.json()["error"]["message"]


def test_interactive_answers_are_unchanged_while_replays_run(replaying):
    server, tokens = replaying
    alone = [chat(server.url, tokens["app"], text).json()["choices"][0]["message"]["content"] for text in SHORT]
    # Each answer above queued a replay that starts once the server idles; ask again while they run.
    again = [chat(server.url, tokens["app"], text, **{"Cache-Control": "no-cache"}).json()["choices"][0][
        "message"]["content"] for text in SHORT]
    assert again == alone

"""The permission-scoped response cache over real HTTP: hit, miss and bypass for v2 infer, embeddings and chat
(streamed and not), scopes that never share entries (a hypothesis property test), TTL, restart, purge, a damaged
store and the metrics."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cache.keys import scope_hash
from appliance.cache.service import LABEL_KEY, ResponseCacheService
from appliance.config import CacheConfig
from appliance.keys import KeyStore
from appliance.telemetry import Metrics
from conftest import RunningServer, make_config
from waiting import ManualClock

CACHE_ON = {"enabled": True}


def body(values: list[float]) -> dict:
    return {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": values}]}


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def scoped(standard_repo, tmp_path_factory):
    """A cache-on server with keys in two tenants, one key with a private scope and one that is never cached."""
    state = tmp_path_factory.mktemp("cache-state")
    store = KeyStore(state / "keys.json")
    keys = {
        "a1": store.create(name="a1", tenant="alpha"),
        "a2": store.create(name="a2", tenant="alpha"),
        "private": store.create(name="private", tenant="alpha", cache_scope="key"),
        "b1": store.create(name="b1", tenant="beta"),
        "never": store.create(name="never", tenant="gamma", cache_scope="none"),
        "admin": store.create(name="ops", tenant="ops", admin=True),
    }
    running = RunningServer(make_config(standard_repo, state, cache=CACHE_ON)).start()
    yield running, {name: token for name, (_, token) in keys.items()}, {name: key.scope() for name, (key, _) in
                                                                          keys.items()}
    running.stop()


def infer(url: str, token: str | None, values: list[float], **headers: str) -> requests.Response:
    return requests.post(f"{url}/v2/models/add_one/infer", json=body(values), headers={**bearer(token), **headers},
                         timeout=30)


def test_a_repeat_is_a_hit_with_the_same_answer_and_formats_share_the_entry(scoped):
    running, tokens, _ = scoped
    first = infer(running.url, tokens["a1"], [10, 20, 30, 40])
    second = infer(running.url, tokens["a1"], [10, 20, 30, 40])
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.json()["outputs"] == second.json()["outputs"]
    assert second.json()["outputs"][0]["data"] == [11, 21, 31, 41]
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([[10, 20, 30, 40]], np.float32), binary_data=True)
    result = client.infer("add_one", [tensor], headers=bearer(tokens["a1"]),
                          outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)])
    assert result.as_numpy("OUTPUT0").tolist() == [[11, 21, 31, 41]]
    assert result.get_response()["model_name"] == "add_one"


def test_cache_control_no_store_and_no_cache(scoped):
    running, tokens, _ = scoped
    values = [1.5, 2.5, 3.5, 4.5]
    assert infer(running.url, tokens["a1"], values, **{"Cache-Control": "no-store"}).headers["x-cache"] == "bypass"
    assert infer(running.url, tokens["a1"], values).headers["x-cache"] == "miss"  # no-store wrote nothing
    assert infer(running.url, tokens["a1"], values, **{"Cache-Control": "no-cache"}).headers["x-cache"] == "bypass"
    assert infer(running.url, tokens["a1"], values).headers["x-cache"] == "hit"


def test_scopes_share_within_a_tenant_and_never_across(scoped):
    running, tokens, _ = scoped
    values = [7, 7, 7, 7]
    assert infer(running.url, tokens["a1"], values).headers["x-cache"] == "miss"
    assert infer(running.url, tokens["a2"], values).headers["x-cache"] == "hit"  # same tenant, shared scope
    assert infer(running.url, tokens["private"], values).headers["x-cache"] == "miss"  # its own scope
    assert infer(running.url, tokens["b1"], values).headers["x-cache"] == "miss"  # another tenant
    assert infer(running.url, tokens["never"], values).headers["x-cache"] == "bypass"
    assert infer(running.url, tokens["never"], values).headers["x-cache"] == "bypass"


# Several principals send random requests; the model of the cache says which must hit. A hit where the model
# expects a miss would be an answer from another scope's entry.
seen: set[tuple[str, tuple[float, ...]]] = set()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a1", "a2", "private", "b1", "never"]),
                          st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=4, max_size=4),
                          st.booleans()), min_size=1, max_size=12))
def test_property_no_answer_ever_crosses_a_scope(scoped, calls):
    running, tokens, scopes = scoped
    for principal, values, no_store in calls:
        values = [v + 1000 for v in values]  # a region of inputs no other test uses
        headers = {"Cache-Control": "no-store"} if no_store else {}
        response = infer(running.url, tokens[principal], values, **headers)
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"] == [v + 1 for v in values]
        scope = scopes[principal]
        entry = (scope, tuple(values))
        if scope is None or no_store:
            expected = "bypass"
        else:
            expected = "hit" if entry in seen else "miss"
            seen.add(entry)
        assert response.headers["x-cache"] == expected, (principal, values)


def test_purge_by_tenant_and_metrics_carry_scope_hashes_only(scoped):
    running, tokens, scopes = scoped
    values = [3, 1, 4, 1]
    for name in ("a1", "b1"):
        infer(running.url, tokens[name], values)
    purge = requests.post(f"{running.url}/admin/cache/purge", json={"tenant": "alpha"},
                          headers=bearer(tokens["admin"]), timeout=10)
    assert purge.status_code == 200 and purge.json()["purged"] >= 1
    assert infer(running.url, tokens["a1"], values).headers["x-cache"] == "miss"
    assert infer(running.url, tokens["a1"], values).headers["x-cache"] == "hit"  # stored again after the purge
    assert infer(running.url, tokens["b1"], values).headers["x-cache"] == "hit"  # another tenant's entries stay
    bad = requests.post(f"{running.url}/admin/cache/purge", json={}, headers=bearer(tokens["admin"]), timeout=10)
    assert bad.status_code == 400 and "say what to purge" in bad.json()["error"]
    text = requests.get(f"{running.url}/metrics", timeout=10).text
    key = (running.config.paths.response_cache_dir() / LABEL_KEY).read_bytes()  # the install's own label key
    alpha = scope_hash(scopes["a1"], key)
    assert re.search(rf'appliance_cache_lookups_total{{model="add_one",result="hit",scope="{alpha}"}} [1-9]', text)
    assert scope_hash(scopes["a1"], b"\0" * 32) not in text  # a label cannot be matched without the key
    assert "tenant:alpha" not in text and tokens["a1"] not in text
    assert re.search(r"appliance_cache_size_bytes \d", text) and "appliance_cache_stored_bytes_total" in text
    stats = requests.get(f"{running.url}/admin/cache", headers=bearer(tokens["admin"]), timeout=10).json()
    assert stats["entries"] >= 1 and stats["healthy"]
    memory = stats["memory"]  # the one worker read or stored the answers since the purge, and holds them
    assert memory["max_bytes"] == running.config.cache.memory_bytes > 0 and memory["entries"] >= 2
    assert memory["bytes"] > 0


def test_a_model_not_marked_deterministic_is_never_cached(fresh_repo, server_factory):
    toml = fresh_repo / "add_one" / "1" / "model.toml"
    toml.write_text("deterministic = false\n" + toml.read_text())
    running = server_factory(fresh_repo, cache=CACHE_ON)
    for _ in range(2):
        assert infer(running.url, None, [1, 2, 3, 4]).headers["x-cache"] == "bypass"


async def test_entries_expire_after_the_configured_ttl(tmp_path):
    """The data plane's cache keeps an answer for ``cache.ttl_s`` by its clock (unix time; a fake one here)."""
    config, clock, path = CacheConfig(enabled=True, ttl_s=60), ManualClock(1_000_000.0), tmp_path / "response-cache"

    async def lookup(service: ResponseCacheService) -> str:
        decision = await service.lookup("tenant:t", "add_one", 1, "build", lambda: [5, 6, 7, 8], None, True)
        if decision.status == "miss":
            service.remember(decision, "add_one", 1, "build", b"the answer")
        return decision.status

    writer = ResponseCacheService(config, path, Metrics(), clock=clock)
    await writer.open()
    assert await lookup(writer) == "miss"
    await writer.close()  # waits for the write
    reader = ResponseCacheService(config, path, Metrics(), clock=clock)
    await reader.open()
    clock.advance(59.0)
    assert await lookup(reader) == "hit"
    clock.advance(1.0)
    assert await lookup(reader) == "miss"
    await reader.close()


async def test_a_scope_label_key_that_cannot_be_read_leaves_the_cache_off(tmp_path, caplog):
    """The store opens but its label key cannot be read (here a folder where the file should be): the server still
    starts, with the cache off (every lookup a miss, nothing stored) and the reason logged."""
    path = tmp_path / "response-cache"
    (path / LABEL_KEY).mkdir(parents=True)
    metrics = Metrics()
    service = ResponseCacheService(CacheConfig(enabled=True), path, metrics)
    with caplog.at_level(logging.ERROR, logger="appliance.cache"):
        await service.open()
    assert not service.enabled and "scope-label key cannot be read or made" in caplog.text
    assert metrics.registry.get_sample_value("appliance_cache_errors_total", {"operation": "open"}) == 1
    decision = await service.lookup("tenant:t", "add_one", 1, "build", lambda: [1], None, True)
    assert decision.status == "miss" and decision.payload is None
    await service.close()


def test_the_cache_survives_a_restart_and_its_files_are_private(standard_repo, tmp_path):
    config = make_config(standard_repo, tmp_path / "state", cache=CACHE_ON)
    first = RunningServer(config).start()
    try:
        assert infer(first.url, None, [9, 9, 9, 1]).headers["x-cache"] == "miss"
    finally:  # stopping waits for the cache's pending writes
        first.stop()
    second = RunningServer(make_config(standard_repo, tmp_path / "state", cache=CACHE_ON)).start()
    try:
        assert infer(second.url, None, [9, 9, 9, 1]).headers["x-cache"] == "hit"
    finally:
        second.stop()
    folder = tmp_path / "state" / "response-cache"
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600


def test_a_damaged_store_degrades_to_misses_with_a_logged_error(standard_repo, tmp_path, caplog):
    folder = tmp_path / "state" / "response-cache"
    folder.mkdir(parents=True)
    (folder / "data.mdb").write_bytes(b"this is not an lmdb file" * 1000)
    caplog.set_level(logging.ERROR, logger="appliance.cache")
    running = RunningServer(make_config(standard_repo, tmp_path / "state", cache=CACHE_ON)).start()
    try:
        for _ in range(2):
            response = infer(running.url, None, [1, 1, 1, 1])
            assert response.status_code == 200 and response.headers["x-cache"] == "miss"
            assert response.json()["outputs"][0]["data"] == [2, 2, 2, 2]
    finally:
        running.stop()
    assert any("response cache" in record.getMessage() for record in caplog.records)


# -- embeddings ----------------------------------------------------------------------------------------------------


def test_embeddings_hit_miss_and_bypass(minilm_repo, server_factory):
    running = server_factory(minilm_repo, cache=CACHE_ON)
    url = f"{running.url}/v1/embeddings"
    request = {"model": "minilm-l6", "input": ["a cached sentence", "and another"]}
    # minilm-l6's vectors change (in the last bits) with their batch neighbours: only reproducible runs are cached.
    assert requests.post(url, json=request, timeout=30).headers["x-cache"] == "bypass"
    headers = {"x-appliance-reproducible": "true"}
    miss = requests.post(url, json=request, headers=headers, timeout=30)
    hit = requests.post(url, json=request, headers=headers, timeout=30)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit")
    assert hit.json()["data"] == miss.json()["data"] and hit.json()["usage"] == miss.json()["usage"]
    encoded = requests.post(url, json={**request, "encoding_format": "base64"}, headers=headers, timeout=30)
    assert encoded.headers["x-cache"] == "hit"  # the format is not part of the key: the vectors are
    import base64

    vector = np.frombuffer(base64.b64decode(encoded.json()["data"][0]["embedding"]), "<f4")
    assert vector.tolist() == pytest.approx(miss.json()["data"][0]["embedding"])
    other = requests.post(url, json={**request, "input": ["a different sentence"]}, headers=headers, timeout=30)
    assert other.headers["x-cache"] == "miss"
    skipped = requests.post(url, json=request, headers={**headers, "Cache-Control": "no-store"}, timeout=30)
    assert skipped.headers["x-cache"] == "bypass" and skipped.json()["data"] == miss.json()["data"]
    # The ledger books the hits as served from the cache, with the tokens they would have read.
    usage = requests.get(f"{running.url}/v1/usage", params={"group_by": "place"}, timeout=10).json()
    places = {row["place"]: row for row in usage["data"]}
    assert places["cache"]["requests"] == 2 and places["local"]["requests"] == 4
    assert places["cache"]["input_tokens"] == 2 * miss.json()["usage"]["prompt_tokens"]


# -- chat ------------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture()
def cacheable(fast_tier_deterministic: bool) -> dict[str, str]:
    """Headers under which the fast tier's greedy and seeded chats are cached on this CPU: none where its build
    measured it batch-invariant, else the reproducible mode (each sequence runs as if alone)."""
    return {} if fast_tier_deterministic else {"x-appliance-reproducible": "true"}


def chat(url: str, headers: dict[str, str], **options) -> requests.Response:
    """A chat to the fast tier."""
    payload = {"model": "smollm2-135m-fast", "messages": MESSAGES, "max_tokens": 12, **options}
    return requests.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=120,
                         stream=payload.get("stream", False))


def streamed_text(response: requests.Response) -> tuple[str, list[dict]]:
    text, chunks = "", []
    for line in response.iter_lines():
        if not line or line == b"data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix(b"data: "))
        chunks.append(chunk)
        for choice in chunk["choices"]:
            text += choice.get("delta", {}).get("content") or ""
    return text, chunks


def test_chat_is_cached_streamed_or_not(smollm2_repo, server_factory, cacheable):
    running = server_factory(smollm2_repo, cache=CACHE_ON)
    miss = chat(running.url, cacheable, temperature=0)
    hit = chat(running.url, cacheable, temperature=0)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit")
    assert hit.json()["choices"][0]["message"] == miss.json()["choices"][0]["message"]
    assert hit.json()["usage"] == miss.json()["usage"] and hit.json()["id"] != miss.json()["id"]
    stream = chat(running.url, cacheable, temperature=0, stream=True, stream_options={"include_usage": True})
    assert stream.headers["x-cache"] == "hit"
    text, chunks = streamed_text(stream)
    assert text == miss.json()["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == miss.json()["usage"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    # A stream that ran on the model is stored too, and served whole.
    fresh = chat(running.url, cacheable, temperature=0, stream=True, max_tokens=6)
    assert fresh.headers["x-cache"] == "miss"
    fresh_text, _ = streamed_text(fresh)
    again = chat(running.url, cacheable, temperature=0, max_tokens=6)
    assert again.headers["x-cache"] == "hit" and again.json()["choices"][0]["message"]["content"] == fresh_text


def test_only_deterministic_generation_is_cached(smollm2_repo, server_factory, cacheable):
    running = server_factory(smollm2_repo, cache=CACHE_ON)
    seeded = [chat(running.url, cacheable, temperature=0.9, seed=7) for _ in range(2)]
    assert [r.headers["x-cache"] for r in seeded] == ["miss", "hit"]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]
    sampled = chat(running.url, cacheable, temperature=0.9)
    assert sampled.headers["x-cache"] == "bypass"
    other_seed = chat(running.url, cacheable, temperature=0.9, seed=8)
    assert other_seed.headers["x-cache"] == "miss"


@pytest.mark.parametrize("measured_on", ["this_cpu", "another_cpu"])
def test_a_deterministic_claim_is_trusted_only_on_a_cpu_like_the_one_that_measured_it(
        smollm2_repo, server_factory, tmp_path, caplog, measured_on):
    """A fast tier copied from a machine whose build measured it batch-invariant: served as deterministic (cached)
    where its measurement's CPU has this CPU's vector extensions, else as not deterministic, with a warning."""
    from appliance.cpu import cpu_description

    source = smollm2_repo / "smollm2-135m-fast" / "1"
    version = tmp_path / "repo" / "smollm2-135m-fast" / "1"
    version.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in ("model.toml", "provenance.json"):
            (version / item.name).symlink_to(item)
    claimed = re.sub(r"^deterministic = .*$", "deterministic = true", (source / "model.toml").read_text(), flags=re.M)
    (version / "model.toml").write_text(claimed)
    provenance = json.loads((source / "provenance.json").read_text())
    cpu = {"model": "Imaginary CPU", "vector_extensions": ["sse4_2"]}
    if measured_on == "this_cpu":
        cpu = cpu_description()
    provenance["parity"]["batch_invariance"].update(cpu=cpu, invariant=True)
    (version / "provenance.json").write_text(json.dumps(provenance))
    with caplog.at_level(logging.WARNING, logger="appliance.models.generative"):
        running = server_factory(tmp_path / "repo", cache=CACHE_ON)
    first = chat(running.url, {}, temperature=0).headers["x-cache"]
    warned = [r.getMessage() for r in caplog.records if "not on this CPU" in r.getMessage()]
    if measured_on == "this_cpu":
        assert first == "miss" and chat(running.url, {}, temperature=0).headers["x-cache"] == "hit" and not warned
    else:
        assert first == "bypass" and len(warned) == 1 and "Imaginary CPU [sse4_2]" in warned[0]


def test_a_tensor_requests_canonical_form_holds_all_that_changes_the_answer_and_nothing_else():
    from types import SimpleNamespace

    from appliance.operations.tensor import _canonical

    def canonical(inputs: dict, outputs=None) -> bytes:
        return _canonical(SimpleNamespace(inputs=inputs, outputs=outputs))

    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    base = canonical({"A": x, "B": x + 1})
    assert canonical({"B": x + 1, "A": x}) == base  # the order the inputs came in is not part of it
    assert canonical({"A": np.array(x), "B": x + 1}) == base
    different = [canonical({"A": x, "B": x + 2}), canonical({"A": x.reshape(2, 2), "B": x + 1}),
                 canonical({"A": x.astype(np.int32), "B": x + 1}), canonical({"A": x, "C": x + 1}),
                 canonical({"A": x, "B": x + 1}, ["OUT"]), canonical({"A": x, "B": x + 1}, []),
                 canonical({"A": np.array([["a", "b"]], dtype=object), "B": x + 1})]
    assert len({base, *different}) == 1 + len(different)
    assert canonical({"S": np.array([[b"x", "x"]], dtype=object)}) == canonical({"S": np.array([["x", b"x"]],
                                                                                              dtype=object)})

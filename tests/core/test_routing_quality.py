"""Routing quality: which routed requests are kept, replays only on an idle server (and giving way to a request that
arrives), agreement per score band, the metrics. Fakes stand in for the data plane here; the same module runs
through a real server in tests/api/test_routing_quality_http.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from appliance.config import RoutingConfig
from appliance.engines.generation import SamplingParams
from appliance.errors import BadRequest
from appliance.generation_stream import Chunk, GenerationStream, TokenCount
from appliance.routing_quality import QUALITY_CALLER, REPLAY_TRIES, RoutingQuality, band_of
from appliance.types import Caller, EmbedRequest, EmbedResponse, GenerateRequest, Principal, Route, Usage

KEY = Principal(tenant="acme", key_id="k1", key_name="app", models=(), cloud=False, cache_scope="tenant", admin=False)
SMALL = Route("local", "small", "score 0.12: small tier", "complexity", score=0.12)


def chat(text: str = "hi", **options) -> GenerateRequest:
    options.setdefault("caller", Caller(principal=KEY))
    return GenerateRequest(model="auto", chat=True, params=SamplingParams(temperature=0.7),
                           messages=[{"role": "user", "content": text}], **options)


class FakePlane:
    """Answers per model, word by word; embeds a text as a vector of its letter counts."""

    def __init__(self, answers: dict[str, str], in_flight: list[int]) -> None:
        self.answers, self.in_flight = answers, in_flight
        self.generated: list[GenerateRequest] = []
        self.embedded: list[EmbedRequest] = []
        self.arrive_after_words: int | None = None  # a request arrives while this many words were sent

    async def generate(self, request: GenerateRequest) -> GenerationStream:
        self.generated.append(request)
        words = self.answers[request.model].split(" ")

        async def chunks():
            for index, word in enumerate(words):
                if self.arrive_after_words is not None and index == self.arrive_after_words:
                    self.in_flight[0] = 1
                yield Chunk(text=word if index == 0 else " " + word)
                await asyncio.sleep(0)
            yield Chunk(finish_reason="length")

        return GenerationStream(request.model, chunks(), TokenCount(), on_close=lambda stream: None)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.embedded.append(request)
        vectors = np.array([[text.count(c) for c in "abcdefghijklmnopqrstuvwxyz "] for text in request.texts],
                           np.float32)
        return EmbedResponse("emb", 1, vectors, 0, Usage())


def quality(plane: FakePlane, in_flight: list[int], ratio: float = 1.0, chance=lambda: 0.0, **settings):
    config = RoutingConfig(quality_sample_ratio=ratio, quality_idle_ms=settings.pop("idle_ms", 0), **settings)
    registry = CollectorRegistry()
    return RoutingQuality(config, plane.generate, plane.embed, lambda: ("small", "mid"), lambda: in_flight[0],
                          registry, chance=chance, poll_s=0.001), registry


async def run_until(auditor: RoutingQuality, done, timeout_s: float = 5.0) -> None:
    task = asyncio.get_running_loop().create_task(auditor.run())
    try:
        for _ in range(int(timeout_s / 0.005)):
            if done():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"not done in time: {auditor.report()}")
    finally:
        task.cancel()


def test_score_bands_are_tenths():
    assert [band_of(s) for s in (0.0, 0.12, 0.25, 0.999, 1.0)] == ["0.0-0.1", "0.1-0.2", "0.2-0.3", "0.9-1.0",
                                                                  "0.9-1.0"]


async def test_only_single_choice_small_tier_routes_of_callers_that_allow_retention_are_kept():
    flight = [0]
    auditor, _ = quality(FakePlane({}, flight), flight, quality_max_pending=2)
    auditor.offer(chat(), replace(SMALL, model="mid"))  # the mid tier: nothing to compare with
    auditor.offer(chat(), replace(SMALL, score=None))  # named, not routed
    auditor.offer(chat(n=2), SMALL)
    auditor.offer(EmbedRequest(id="e", model="auto", texts=["x"]), SMALL)
    assert auditor.report()["pending"] == 0
    auditor.offer(chat(caller=Caller(principal=KEY, retention=False)), SMALL)
    assert auditor.report()["skipped"]["no_retention"] == 1 and auditor.report()["pending"] == 0
    for _ in range(3):
        auditor.offer(chat(), SMALL)
    assert auditor.report()["pending"] == 2 and auditor.report()["skipped"]["queue_full"] == 1


async def test_the_sample_ratio_is_the_share_kept():
    flight = [0]
    draws = iter([0.05, 0.5, 0.09, 0.95])
    auditor, _ = quality(FakePlane({}, flight), flight, ratio=0.1, chance=lambda: next(draws))
    for _ in range(4):
        auditor.offer(chat(), SMALL)
    assert auditor.report()["pending"] == 2
    off, _ = quality(FakePlane({}, flight), flight, ratio=0.0)
    off.offer(chat(), SMALL)
    assert not off.enabled and off.report()["pending"] == 0


async def test_a_replay_runs_both_tiers_greedily_in_the_batch_lane_and_records_its_band():
    flight = [0]
    plane = FakePlane({"small": "paris is the capital", "mid": "paris is the capital"}, flight)
    auditor, registry = quality(plane, flight, quality_max_tokens=16)
    auditor.offer(chat("capital of France?", max_tokens=200, stop=["."]), SMALL)
    auditor.offer(chat("and of Spain?", max_tokens=4), replace(SMALL, score=0.31))
    plane.answers = {"small": "paris is the capital", "mid": "paris is the capital"}
    await run_until(auditor, lambda: auditor.report()["pending"] == 0)
    assert [r.model for r in plane.generated] == ["small", "mid", "small", "mid"]
    for request in plane.generated:
        assert request.params.temperature == 0 and request.caller == QUALITY_CALLER
        assert request.caller.lane == "batch" and request.caller.principal.cache_scope is None
    assert [r.max_tokens for r in plane.generated] == [16, 16, 4, 4]  # the request's own, up to the replay limit
    assert plane.generated[0].stop == ["."] and plane.generated[0].messages[0]["content"] == "capital of France?"
    assert plane.embedded[0].texts == ["paris is the capital", "paris is the capital"]
    bands = {b["band"]: b for b in auditor.report()["bands"]}
    assert bands["0.1-0.2"]["replays"] == 1 and bands["0.1-0.2"]["exact_match_rate"] == 1.0
    assert bands["0.1-0.2"]["mean_cosine"] == pytest.approx(1.0) and bands["0.1-0.2"]["routed_to_small"]
    assert bands["0.3-0.4"]["replays"] == 1 and not bands["0.3-0.4"]["routed_to_small"]  # above 0.25: mid now
    text = generate_latest(registry).decode()
    assert 'appliance_routing_quality_replays_total{band="0.1-0.2"} 1.0' in text
    assert 'appliance_routing_quality_exact_matches_total{band="0.3-0.4"} 1.0' in text
    assert 'appliance_routing_quality_cosine_bucket{band="0.1-0.2",le="1.0"} 1.0' in text


async def test_different_answers_count_as_no_match_with_their_cosine():
    flight = [0]
    plane = FakePlane({"small": "the cat sat", "mid": "a dog ran off"}, flight)
    auditor, _ = quality(plane, flight)
    auditor.offer(chat(), SMALL)
    await run_until(auditor, lambda: auditor.report()["pending"] == 0)
    band = auditor.report()["bands"][0]
    a = np.array([("the cat sat").count(c) for c in "abcdefghijklmnopqrstuvwxyz "], float)
    b = np.array([("a dog ran off").count(c) for c in "abcdefghijklmnopqrstuvwxyz "], float)
    assert band["exact_matches"] == 0 and band["mean_cosine"] == pytest.approx(a @ b / np.linalg.norm(a) /
                                                                               np.linalg.norm(b))


async def test_a_replay_waits_for_an_idle_server():
    flight = [1]  # a request is in flight
    plane = FakePlane({"small": "x", "mid": "x"}, flight)
    auditor, _ = quality(plane, flight, idle_ms=30)
    auditor.offer(chat(), SMALL)
    task = asyncio.get_running_loop().create_task(auditor.run())
    await asyncio.sleep(0.1)
    assert plane.generated == []
    flight[0] = 0
    await asyncio.sleep(0.01)
    assert plane.generated == []  # idle, but not yet for 30 ms
    for _ in range(200):
        if auditor.report()["pending"] == 0:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    assert [r.model for r in plane.generated] == ["small", "mid"]


async def test_a_replay_gives_way_to_a_request_at_the_next_token_and_is_dropped_after_its_tries():
    flight = [0]
    plane = FakePlane({"small": "one two three four five", "mid": "one"}, flight)
    plane.arrive_after_words = 2
    auditor, _ = quality(plane, flight)
    auditor.offer(chat(), SMALL)
    task = asyncio.get_running_loop().create_task(auditor.run())
    for tries in range(1, REPLAY_TRIES + 1):
        for _ in range(400):
            if len(plane.generated) == tries and flight[0] == 1:
                break
            await asyncio.sleep(0.005)
        assert [r.model for r in plane.generated] == ["small"] * tries  # stopped before the mid tier ran
        flight[0] = 0  # the request is answered: the replay is tried again
    for _ in range(400):
        if auditor.report()["skipped"]["gave_up"]:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    assert auditor.report()["skipped"]["gave_up"] == 1 and auditor.report()["pending"] == 0
    assert auditor.report()["bands"] == []


async def test_without_an_embedding_model_agreement_is_exact_match_only():
    flight = [0]
    plane = FakePlane({"small": "x", "mid": "x"}, flight)

    async def no_embeddings(request):
        raise BadRequest("'auto' cannot pick an embedding model: name one (GET /v1/models)")

    plane.embed = no_embeddings
    auditor, _ = quality(plane, flight)
    auditor.offer(chat(), SMALL)
    await run_until(auditor, lambda: auditor.report()["pending"] == 0)
    band = auditor.report()["bands"][0]
    assert band["exact_matches"] == 1 and band["mean_cosine"] is None and band["cosines_measured"] == 0

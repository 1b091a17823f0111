"""Routing quality, measured on the device: would the mid tier have answered what the small tier did?

A fraction (``[routing] quality_sample_ratio``) of the chat and completions requests the router sends to the small
generation tier is kept, in memory only, for a replay. When the server has had no request in flight for
``quality_idle_ms``, the request runs again on both tiers, greedily, in the batch lane and for at most
``quality_max_tokens`` tokens, and the two answers are compared: exact match of the greedy text, and the cosine of
their embeddings by the local embedding model (``quality_embedding_model``). The results are kept per band of the
router's complexity score (tenths), exported as ``appliance_routing_quality_*`` metrics and at
``GET /admin/routing/quality``, so that an operator can see whether ``small_max_score`` sits where the tiers agree.

A replay never delays interactive work: it starts only on an idle server and gives way as soon as a request
arrives (it is stopped at the next token and tried again later, up to ``REPLAY_TRIES`` times). Requests of keys or
callers under the local-only-no-retention policy are never kept. Replays are accounted like any other work, to
tenant ``appliance`` (key ``routing-quality``), and never reach the response cache or the cloud.

With several worker processes each keeps and replays its own sample; the metrics add up across them, the admin
endpoint answers for the worker that serves it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance.config import RoutingConfig
from appliance.engines.generation import SamplingParams
from appliance.errors import ApplianceError
from appliance.generation_stream import GenerationStream
from appliance.types import Caller, EmbedRequest, EmbedResponse, GenerateRequest, Principal, Route, Trace

log = logging.getLogger("appliance.routing_quality")

REPLAY_TRIES = 3  # a replay that had to give way this many times is dropped
BANDS = 10  # score bands of width 1 / BANDS
COSINE_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)
# Whose work a replay is: batch lane, never cached, never sent to the cloud, never replayed itself.
QUALITY_PRINCIPAL = Principal(tenant="appliance", key_id="", key_name="routing-quality", models=(), cloud=False,
                              cache_scope=None, admin=False, lane="batch", retention=False)
QUALITY_CALLER = Caller(principal=QUALITY_PRINCIPAL, lane="batch", local_only=True, retention=False)

Generate = Callable[[GenerateRequest], Awaitable[GenerationStream]]
Embed = Callable[[EmbedRequest], Awaitable[EmbedResponse]]


def band_of(score: float) -> str:
    """The band of a complexity score: ``"0.2-0.3"`` (the last band holds 1.0)."""
    low = min(int(score * BANDS), BANDS - 1) / BANDS
    return f"{low:.1f}-{low + 1 / BANDS:.1f}"


@dataclass
class Sample:
    """A routed request kept for a replay: what the model reads, nothing about who sent it."""

    band: str
    score: float
    chat: bool
    messages: list[dict] | None
    prompt: str | list[int] | None
    max_tokens: int
    stop: list[str]
    tools: Any
    response_format: Any
    tries: int = 0


@dataclass
class BandAgreement:
    """The replays of one score band."""

    replays: int = 0
    exact: int = 0
    cosines: list[float] = field(default_factory=list)

    def report(self, band: str, small_max_score: float) -> dict[str, Any]:
        """The band as the admin endpoint shows it."""
        low = float(band.split("-")[0])
        cosines = self.cosines
        return {"band": band, "routed_to_small": low < small_max_score, "replays": self.replays,
                "exact_matches": self.exact, "exact_match_rate": self.exact / self.replays if self.replays else None,
                "mean_cosine": float(np.mean(cosines)) if cosines else None,
                "min_cosine": min(cosines) if cosines else None, "cosines_measured": len(cosines)}


class GaveWay(Exception):
    """A replay stopped because a request arrived."""


class RoutingQuality:
    """Samples small-tier routes (:meth:`offer`) and replays them on idle capacity (:meth:`run`, a background task).

    ``tiers`` names the serving small and mid generation models; ``in_flight`` counts the model requests the
    server is answering (with several workers, the whole group's: :mod:`appliance.worker_activity`). Generation and embedding go through the data plane (``generate``, ``embed``) like any request.
    """

    def __init__(self, config: RoutingConfig, generate: Generate, embed: Embed,
                 tiers: Callable[[], tuple[str | None, str | None]], in_flight: Callable[[], int],
                 registry: CollectorRegistry | None = None, *, chance: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 0.02) -> None:
        self.config = config
        self._generate, self._embed, self._tiers, self._in_flight = generate, embed, tiers, in_flight
        self._chance, self._clock, self._poll_s = chance, clock, poll_s
        self._pending: deque[Sample] = deque()
        self._wake = asyncio.Event()
        self._bands: dict[str, BandAgreement] = {}
        self.skipped: dict[str, int] = {"no_retention": 0, "queue_full": 0, "gave_up": 0, "failed": 0}
        registry = registry if registry is not None else CollectorRegistry()
        self._replays = Counter("appliance_routing_quality_replays", "Small-tier routes replayed on both tiers, by "
                                "complexity-score band", ["band"], registry=registry)
        self._exact = Counter("appliance_routing_quality_exact_matches", "Replays whose greedy answers were the same "
                              "text on both tiers, by complexity-score band", ["band"], registry=registry)
        self._cosine = Histogram("appliance_routing_quality_cosine", "Cosine of the embeddings of the two tiers' "
                                 "answers, by complexity-score band", ["band"], buckets=COSINE_BUCKETS,
                                 registry=registry)
        self._skipped = Counter("appliance_routing_quality_skipped", "Small-tier routes not replayed, by reason "
                                "(no_retention, queue_full, gave_up, failed)", ["reason"], registry=registry)

    @property
    def enabled(self) -> bool:
        """Whether any request is sampled."""
        return self.config.quality_sample_ratio > 0

    def offer(self, request: Any, route: Route) -> None:
        """A request the router placed: kept for a replay when it went to the small tier and the dice say so."""
        if not self.enabled or not isinstance(request, GenerateRequest) or route.score is None:
            return
        small, mid = self._tiers()
        if route.place != "local" or route.model != small or mid is None or request.choice_count > 1:
            return
        if self._chance() >= self.config.quality_sample_ratio:
            return
        if not request.caller.retention:
            self._skip("no_retention")
            return
        if len(self._pending) >= self.config.quality_max_pending:
            self._skip("queue_full")
            return
        limit = self.config.quality_max_tokens
        self._pending.append(Sample(band_of(route.score), route.score, request.chat, request.messages,
                                    request.prompt, min(request.max_tokens or limit, limit), list(request.stop),
                                    request.tools, request.response_format))
        self._wake.set()

    async def run(self) -> None:
        """Replay kept requests, one at a time, whenever the server is idle. Runs until cancelled."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._until_idle()
            sample = self._pending[0]
            try:
                small_text, mid_text, cosine = await self._replay(sample)
            except GaveWay:
                sample.tries += 1
                if sample.tries >= REPLAY_TRIES:
                    self._pending.popleft()
                    self._skip("gave_up")
                continue
            except (ApplianceError, ValueError) as exc:
                self._pending.popleft()
                self._skip("failed")
                log.info("routing-quality replay failed: %s", getattr(exc, "message", exc))
                continue
            except Exception:  # noqa: BLE001 - a bug in one replay must not end the replays (or the shutdown)
                self._pending.popleft()
                self._skip("failed")
                log.exception("routing-quality replay failed")
                continue
            self._pending.popleft()
            self._record(sample.band, small_text == mid_text, cosine)

    def report(self) -> dict[str, Any]:
        """Agreement per score band, for ``GET /admin/routing/quality``."""
        config = self.config
        small, mid = self._tiers()
        return {"sample_ratio": config.quality_sample_ratio, "small_max_score": config.small_max_score,
                "max_tokens": config.quality_max_tokens, "small_tier": small, "mid_tier": mid,
                "embedding_model": config.quality_embedding_model, "pending": len(self._pending),
                "skipped": dict(self.skipped),
                "bands": [self._bands[band].report(band, config.small_max_score) for band in sorted(self._bands)]}

    # -- the replay ------------------------------------------------------------------------------------------------

    async def _until_idle(self) -> None:
        """Return once no request has been in flight for ``quality_idle_ms``."""
        quiet_s = self.config.quality_idle_ms / 1000
        since = self._clock()
        while True:
            if self._in_flight() > 0:
                since = self._clock()
            elif self._clock() - since >= quiet_s:
                return
            await asyncio.sleep(self._poll_s)

    async def _replay(self, sample: Sample) -> tuple[str, str, float | None]:
        small, mid = self._tiers()
        if small is None or mid is None:
            raise ValueError("the small and mid generation tiers are not both serving")
        small_text = await self._answer(sample, small)
        mid_text = await self._answer(sample, mid)
        return small_text, mid_text, await self._similarity(small_text, mid_text)

    async def _answer(self, sample: Sample, model: str) -> str:
        self._give_way()
        params = SamplingParams(temperature=0.0, max_tokens=sample.max_tokens)
        request = GenerateRequest(model=model, chat=sample.chat, params=params, messages=sample.messages,
                                  prompt=sample.prompt, max_tokens=sample.max_tokens, stop=sample.stop,
                                  caller=QUALITY_CALLER, trace=Trace(), tools=sample.tools,
                                  response_format=sample.response_format)
        parts: list[str] = []
        stream = await self._generate(request)
        async with stream:
            async for chunk in stream:
                self._give_way()
                parts.append(chunk.text)
        return "".join(parts)

    async def _similarity(self, first: str, second: str) -> float | None:
        """The cosine of the two answers' embeddings; ``None`` where no embedding model serves."""
        self._give_way()
        request = EmbedRequest(id="routing-quality", model=self.config.quality_embedding_model,
                               texts=[first or " ", second or " "], truncate=True, caller=QUALITY_CALLER,
                               trace=Trace())
        try:
            vectors = np.asarray((await self._embed(request)).embeddings, dtype=np.float64)
        except ApplianceError as exc:
            log.info("routing quality: no cosine (%s)", exc.message)
            return None
        norms = np.linalg.norm(vectors, axis=1)
        if not norms.all():
            return None
        return float(np.clip(vectors[0] @ vectors[1] / (norms[0] * norms[1]), -1.0, 1.0))

    def _give_way(self) -> None:
        if self._in_flight() > 0:
            raise GaveWay

    def _record(self, band: str, exact: bool, cosine: float | None) -> None:
        agreement = self._bands.setdefault(band, BandAgreement())
        agreement.replays += 1
        self._replays.labels(band).inc()
        if exact:
            agreement.exact += 1
            self._exact.labels(band).inc()
        if cosine is not None:
            agreement.cosines.append(cosine)
            del agreement.cosines[:-1000]  # the latest thousand per band
            self._cosine.labels(band).observe(cosine)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self._skipped.labels(reason).inc()

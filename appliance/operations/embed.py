"""Embedding requests: texts or token sequences in, one vector each out, on the model's token-budget scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from appliance.cache.payloads import decode_embeddings, encode_embeddings
from appliance.cloud import Cloud
from appliance.errors import BadRequest
from appliance.model_version import ModelVersion
from appliance.models import EmbeddingModel
from appliance.operations.base import CloudDone, LocalDone
from appliance.placement import Placement
from appliance.types import EmbedRequest, EmbedResponse, Route, Tally, Usage

OFFLOAD_CHARS = 16_384  # tokenize larger requests in a worker thread


class EmbedOperation:
    """The ``embed`` operation."""

    task = "embed"

    def __init__(self, deadline: Callable[[float | None, ModelVersion], float | None]) -> None:
        self._deadline = deadline

    def route(self, placement: Placement, alias: str, request: EmbedRequest) -> Route:
        """A router alias for embeddings: the embedding model of its tier."""
        return placement.route_embedding(alias)

    def places(self, request: EmbedRequest) -> int:
        """One place per input: each is a row of the encoder's batches."""
        return len(request.texts if request.texts is not None else request.token_ids or ())

    def check(self, served: ModelVersion, request: EmbedRequest) -> None:
        """An embedding model, and ``dimensions`` it can give."""
        if not isinstance(served, EmbeddingModel):
            raise BadRequest(f"model {served.name!r} is not an embedding model (its task is {served.spec.task!r}); "
                             "GET /v1/models lists the models", param="model")
        embedding = served.spec.embedding
        if request.dimensions is not None:
            if not embedding.truncatable:
                raise BadRequest(f"model {served.name} does not support fewer dimensions than its "
                                 f"{embedding.dimensions}; leave out 'dimensions'", param="dimensions")
            if not 1 <= request.dimensions <= embedding.dimensions:
                raise BadRequest(f"dimensions must be from 1 to {embedding.dimensions}, not {request.dimensions}",
                                 param="dimensions")

    def cache_key(self, served: ModelVersion, request: EmbedRequest) -> tuple[Callable[[], Any], bool]:
        """Inputs, dimensions and truncation; deterministic when the model is proved batch-invariant or the request
        runs in the reproducible mode."""
        def canonical() -> object:
            return {"texts": request.texts, "ids": request.token_ids, "dimensions": request.dimensions,
                    "truncate": request.truncate}

        return canonical, served.deterministic(request.caller.reproducible)

    def cached(self, served: ModelVersion, request: EmbedRequest, payload: bytes) -> tuple[EmbedResponse, Tally]:
        """The stored vectors and the tokens they were made from."""
        vectors, prompt_tokens = decode_embeddings(payload)
        return EmbedResponse(served.name, served.version, vectors, prompt_tokens, Usage()), Tally(prompt_tokens)

    async def run(self, served: ModelVersion, request: EmbedRequest, done: LocalDone) -> EmbedResponse:
        """Tokenize, fit to the model's limit, queue on the token-budget scheduler."""
        assert isinstance(served, EmbeddingModel) and served.embedder is not None  # checked, started
        sequences = _fit(await _sequences(served, request), served.text.max_length, request.truncate,
                         keep_last=request.texts is not None)
        metrics = served.metrics
        metrics.started()
        try:
            outcome = await served.embedder.submit(sequences, self._deadline(request.deadline, served),
                                                   reproducible=served.reproducible(request.caller.reproducible))
        finally:
            metrics.finished()
        metrics.queue_duration.observe(outcome.queue_s)
        vectors = outcome.embeddings
        if request.dimensions is not None and request.dimensions < vectors.shape[1]:
            vectors = vectors[:, : request.dimensions]
            if served.spec.embedding.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        prompt_tokens = sum(len(s) for s in sequences)
        tally = Tally(input_tokens=prompt_tokens, compute_s=outcome.compute_s, service_s=outcome.compute_s,
                      queue_s=outcome.queue_s, batch_size=outcome.batches)
        done(tally, lambda: encode_embeddings(vectors, prompt_tokens))
        usage = Usage(outcome.queue_s, outcome.compute_s, outcome.batches)
        return EmbedResponse(served.name, served.version, vectors, prompt_tokens, usage)

    async def cloud(self, cloud: Cloud, route: Route, request: EmbedRequest, done: CloudDone) -> EmbedResponse:
        """The body, as it came, to an ``openai`` upstream."""
        response, cost = await cloud.embed(route, request)
        done(Tally(input_tokens=response.prompt_tokens, cost=cost))
        return response


async def _sequences(served: EmbeddingModel, request: EmbedRequest) -> list[list[int]]:
    text = served.text
    if request.texts is not None:
        if sum(len(t) for t in request.texts) > OFFLOAD_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, text.encode, request.texts)
        return text.encode(request.texts)
    sequences = request.token_ids or []
    for index, sequence in enumerate(sequences):
        bad = next((t for t in sequence if not 0 <= t < text.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"input[{index}] has token id {bad}, outside the vocabulary of model "
                             f"{served.name} (0 to {text.vocab_size - 1})", param="input")
        if not sequence:
            raise BadRequest(f"input[{index}] is an empty token array", param="input")
    return sequences


def _fit(sequences: list[list[int]], limit: int, truncate: bool, keep_last: bool) -> list[list[int]]:
    """Enforce the model's input limit: 400 naming the input, or cut when the request opted in."""
    fitted = []
    for index, sequence in enumerate(sequences):
        if len(sequence) > limit:
            if not truncate:
                raise BadRequest(
                    f"input[{index}] has {len(sequence)} tokens, over the model's limit of {limit}; shorten "
                    'it, split it, or send "truncate": true to cut it to the limit', param="input")
            # Text inputs end with the tokenizer's closing special token: keep it.
            sequence = sequence[: limit - 1] + sequence[-1:] if keep_last else sequence[:limit]
        fitted.append(sequence)
    return fitted

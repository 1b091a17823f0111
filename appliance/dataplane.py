"""The data plane: the one place that knows the order of the request path's steps.

Handlers parse a protocol into a :class:`~appliance.types.Request` and hand it here; what comes back is a
:class:`~appliance.types.Result`. Steps: resolve the model and check that the caller's key may use it, check the
inputs, look the request up in the response cache under the caller's scope, queue on the model's batcher or
scheduler (engine calls run in its worker threads), account and store the answer in the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np

from appliance.cache.payloads import StoredGeneration, decode_embeddings, decode_tensors, encode_embeddings, \
    encode_tensors
from appliance.cache.service import BYPASS, CacheDecision, ResponseCacheService
from appliance.engines.generation import SamplingParams, Sequence
from appliance.errors import BadRequest, EngineFailed, Forbidden, ModelNotFound, ModelNotReady
from appliance.model_version import ModelVersion
from appliance.placement import Placement, Ticket
from appliance.repository import ModelManager
from appliance.types import EmbedRequest, EmbedResponse, Request, Result, Trace, Usage

_Answer = TypeVar("_Answer")


@dataclass(eq=False)
class Generation:
    """A sequence being generated for a request, and what its metrics need."""

    served: ModelVersion
    sequence: Sequence
    prompt_tokens: int
    started: float
    token_times: list[float] = field(default_factory=list)
    cache: CacheDecision | None = None
    ticket: Ticket | None = None


@dataclass(eq=False)
class CachedGeneration:
    """A generation answered from the response cache."""

    served: ModelVersion
    stored: StoredGeneration


class DataPlane:
    """Runs requests through the steps of the request path."""

    def __init__(self, models: ModelManager, cache: ResponseCacheService | None = None,
                 placement: Placement | None = None, device_rate_per_hour: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.models = models
        self.cache = cache
        self.placement = placement
        self.device_rate_per_hour = device_rate_per_hour
        self._clock = clock

    @staticmethod
    def _allow_router(alias: str, trace: Trace) -> None:
        principal = trace.principal
        if principal is not None and principal.models and alias not in principal.models:
            raise Forbidden(f"key {principal.key_name!r} may not use the router {alias!r}; it may call "
                            f"{', '.join(principal.models)}", param="model")
        trace.routed_by = alias

    def _served(self, name: str, version: int | None, trace: Trace, task: str) -> ModelVersion:
        """:meth:`resolve`, failing over to the cloud (where allowed) when the model is not ready."""
        try:
            return self.resolve(name, version, trace)
        except ModelNotReady as exc:
            if self.placement is not None:
                self.placement.failover(name, task, trace, exc)
            raise

    async def _admit(self, served: ModelVersion, trace: Trace, task: str) -> Ticket | None:
        """Pass the model's gate; ``task`` is the request's protocol (it picks the kind of upstream to spill to)."""
        return await self.placement.admit(served, trace, task) if self.placement is not None else None

    async def _run_admitted(self, served: ModelVersion, trace: Trace, task: str, decision: CacheDecision,
                            recheck: Callable[[], ModelVersion],
                            run: Callable[[ModelVersion], Awaitable[_Answer]]) -> tuple[ModelVersion, _Answer]:
        """Pass the gate, then ``run`` on the model; its place is held until ``run`` ends.

        After an await (a cache lookup or a wait at the gate) a new version may have been swapped in, so the model
        is looked up again with ``recheck``. An engine failure fails over to the cloud where allowed.
        """
        ticket = await self._admit(served, trace, task)
        try:
            if decision.status != BYPASS or ticket is not None:
                served = recheck()
            try:
                return served, await run(served)
            except EngineFailed as exc:
                if self.placement is not None:
                    self.placement.failover(served.name, task, trace, exc)
                raise
        finally:
            if ticket is not None:
                ticket.release(trace.usage.compute_s if trace.usage else None)

    def _account(self, served: ModelVersion, trace: Trace, compute_s: float, input_tokens: int,
                 output_tokens: int) -> None:
        """Tokens and the local cost of a request the model ran."""
        trace.input_tokens, trace.output_tokens = input_tokens, output_tokens
        trace.compute_s = compute_s
        trace.cost = local_cost(served, compute_s, input_tokens, output_tokens, self.device_rate_per_hour)

    def _cached(self, served: ModelVersion, trace: Trace, input_tokens: int, output_tokens: int) -> None:
        trace.place = "cache"
        trace.input_tokens, trace.output_tokens = input_tokens, output_tokens
        trace.cost_avoided = local_cost(served, 0.0, input_tokens, output_tokens, self.device_rate_per_hour)

    def resolve(self, name: str, version: int | None, trace: Trace) -> ModelVersion:
        """The serving version of a model, name or alias, if the caller's key may use it.

        The key is checked before anything about the model is told or done: a model outside the key's list is 403
        whether it serves, loads or fails (and never fails over to the cloud). A model a router alias picked is
        allowed when the key allows that alias.
        """
        principal = trace.principal
        restricted = principal is not None and principal.models and not trace.routed_by
        if restricted and name not in principal.models:  # type: ignore[union-attr]
            try:
                served = self.models.resolve(name, version)
            except (ModelNotFound, ModelNotReady):
                served = None
            if served is None or not principal.may_use(served.name, *served.spec.aliases):  # type: ignore[union-attr]
                raise Forbidden(f"key {principal.key_name!r} may not call model {name!r}; it may call "  # type: ignore[union-attr]
                                f"{', '.join(principal.models)}", param="model")  # type: ignore[union-attr]
        else:
            served = self.models.resolve(name, version)
        trace.model, trace.version = served.name, str(served.version)
        if not trace.route:
            if self.placement is not None:
                self.placement.named(trace)
            else:
                trace.route = "named in the request"
        return served

    async def _lookup(self, served: ModelVersion, canonical: Callable[[], object], cache_control: str | None,
                      deterministic: bool, trace: Trace) -> CacheDecision:
        principal = trace.principal
        if self.cache is None or principal is None:
            return CacheDecision(BYPASS)
        decision = await self.cache.lookup(principal.cache_scope, served.name, served.version, served.build_hash,
                                           canonical, cache_control, deterministic)
        trace.cache = decision.status
        return decision

    def _remember(self, decision: CacheDecision, served: ModelVersion, payload: Callable[[], bytes]) -> None:
        if decision.store and self.cache is not None:
            self.cache.remember(decision, served.name, served.version, served.build_hash, payload())

    async def infer(self, request: Request, trace: Trace) -> tuple[Result, ModelVersion]:
        """Run a tensor request on its model; ``trace`` is filled in as the model becomes known."""
        served = self._checked(request, trace)
        decision = await self._lookup(served, partial(_tensor_canonical, request), request.cache_control,
                                      served.spec.deterministic, trace)
        if decision.payload is not None:
            self._cached(served, trace, 0, 0)
            return Result(request.id, served.name, served.version, decode_tensors(decision.payload), Usage()), served
        served, result = await self._run_admitted(served, trace, "tensor", decision,
                                                  lambda: self._checked(request, trace),
                                                  lambda model: self._run_tensors(request, model, trace))
        rows = next(iter(request.inputs.values())).shape[0] if served.max_batch_size > 0 and request.inputs else 1
        share = rows / max(rows, result.usage.batch_size or rows)  # the batch's time is shared by its rows
        self._account(served, trace, result.usage.compute_s * share, 0, 0)
        self._remember(decision, served, lambda: encode_tensors(result.outputs))
        return result, served

    def _checked(self, request: Request, trace: Trace) -> ModelVersion:
        served = self._served(request.model, request.version, trace, "tensor")
        if served.generator is not None:
            raise BadRequest(f"model {served.name!r} generates text: use POST /v1/chat/completions or "
                             "/v1/completions")
        served.check_inputs(request.inputs)
        if request.outputs is not None:
            known = {t.name for t in served.outputs}
            unknown = [name for name in request.outputs if name not in known]
            if unknown:
                raise BadRequest(
                    f"unknown output {unknown[0]!r} for model {served.name}; its outputs are {sorted(known)}"
                )
        return served

    async def _run_tensors(self, request: Request, served: ModelVersion, trace: Trace) -> Result:
        deadline = self._deadline(request.deadline, served)
        if served.embedder is not None:
            return await self._infer_embed_tensors(request, served, trace, deadline)
        assert served.batcher is not None
        metrics = served.metrics
        metrics.in_flight.inc()
        try:
            # Submitting is synchronous: no await between resolve() and here, so a swap cannot slip in between.
            outcome = await served.batcher.submit(request.inputs, deadline)
        finally:
            metrics.in_flight.dec()
        metrics.queue_duration.observe(outcome.queue_s)
        usage = Usage(queue_s=outcome.queue_s, compute_s=outcome.compute_s, batch_size=outcome.batch_size)
        trace.usage = usage
        outputs = outcome.outputs
        if request.outputs is not None:
            outputs = {name: outputs[name] for name in request.outputs}
        return Result(request.id, served.name, served.version, outputs, usage)

    def _deadline(self, deadline: float | None, served: ModelVersion) -> float | None:
        if deadline is None and served.default_timeout_s is not None:
            return self._clock() + served.default_timeout_s
        return deadline

    async def _infer_embed_tensors(self, request: Request, served: ModelVersion, trace: Trace,
                                   deadline: float | None) -> Result:
        """A v2 tensor request to an embedding model: its rows go through the token-budget scheduler."""
        ids, mask = request.inputs["input_ids"], request.inputs["attention_mask"]
        sequences = [row[row_mask.astype(bool)].tolist() for row, row_mask in zip(ids, mask)]
        if any(not sequence for sequence in sequences):
            raise BadRequest("every row of attention_mask needs at least one 1")
        outcome = await self._embed_sequences(served, sequences, deadline)
        trace.usage = Usage(outcome.queue_s, outcome.compute_s, outcome.batches)
        output = served.outputs[0].name
        return Result(request.id, served.name, served.version, {output: outcome.embeddings}, trace.usage)

    async def _embed_sequences(self, served: ModelVersion, sequences: list[list[int]], deadline: float | None):
        assert served.embedder is not None
        metrics = served.metrics
        metrics.in_flight.inc()
        try:
            outcome = await served.embedder.submit(sequences, deadline)
        finally:
            metrics.in_flight.dec()
        metrics.queue_duration.observe(outcome.queue_s)
        return outcome

    async def embed(self, request: EmbedRequest, trace: Trace) -> EmbedResponse:
        """Embed texts or token sequences with an embedding model, in input order."""
        if self.placement is not None and self.placement.router.is_router(request.model):
            self._allow_router(request.model, trace)
            route = self.placement.decided(self.placement.router.route_embedding(request.model), trace,
                                           request.model)
            request.model = route.model
        served = self._embedder(request.model, trace)

        def canonical() -> object:
            return {"texts": request.texts, "ids": request.token_ids, "dimensions": request.dimensions,
                    "truncate": request.truncate}

        decision = await self._lookup(served, canonical, request.cache_control, served.spec.deterministic, trace)
        if decision.payload is not None:
            vectors, prompt_tokens = decode_embeddings(decision.payload)
            self._cached(served, trace, prompt_tokens, 0)
            return EmbedResponse(served.name, served.version, vectors, prompt_tokens, Usage())
        served, response = await self._run_admitted(served, trace, "embed", decision,
                                                    lambda: self._embedder(request.model, trace),
                                                    lambda model: self._embed(request, model, trace))
        self._account(served, trace, response.usage.compute_s, response.prompt_tokens, 0)
        self._remember(decision, served, lambda: encode_embeddings(response.embeddings, response.prompt_tokens))
        return response

    async def _embed(self, request: EmbedRequest, served: ModelVersion, trace: Trace) -> EmbedResponse:
        assert served.text is not None
        text = served.text
        if request.texts is not None:
            if sum(len(t) for t in request.texts) > OFFLOAD_CHARS:
                sequences = await asyncio.get_running_loop().run_in_executor(None, text.encode, request.texts)
            else:
                sequences = text.encode(request.texts)
        else:
            sequences = request.token_ids or []
            for index, sequence in enumerate(sequences):
                bad = next((t for t in sequence if not 0 <= t < text.vocab_size), None)
                if bad is not None:
                    raise BadRequest(f"input[{index}] has token id {bad}, outside the vocabulary of model "
                                     f"{served.name} (0 to {text.vocab_size - 1})", param="input")
                if not sequence:
                    raise BadRequest(f"input[{index}] is an empty token array", param="input")
        sequences = self._fit(sequences, text.max_length, request.truncate, keep_last=request.texts is not None)
        embedding = served.spec.embedding
        if request.dimensions is not None:
            if not embedding.truncatable:
                raise BadRequest(f"model {served.name} does not support fewer dimensions than its "
                                 f"{embedding.dimensions}; leave out 'dimensions'", param="dimensions")
            if not 1 <= request.dimensions <= embedding.dimensions:
                raise BadRequest(f"dimensions must be from 1 to {embedding.dimensions}, not {request.dimensions}",
                                 param="dimensions")
        outcome = await self._embed_sequences(served, sequences, self._deadline(request.deadline, served))
        vectors = outcome.embeddings
        if request.dimensions is not None and request.dimensions < vectors.shape[1]:
            vectors = vectors[:, : request.dimensions]
            if embedding.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        usage = Usage(outcome.queue_s, outcome.compute_s, outcome.batches)
        trace.usage = usage
        return EmbedResponse(served.name, served.version, vectors, sum(len(s) for s in sequences), usage)

    async def generate(self, model: str, messages: list[dict] | None, prompt: str | list[int] | None,
                       params: SamplingParams, max_tokens: int | None, deadline: float | None,
                       trace: Trace, canonical: Callable[[], object] | None = None,
                       cache_control: str | None = None
                       ) -> Generation | CachedGeneration:
        """Render and tokenize the prompt, check it against the context, queue it on the model's scheduler.

        ``canonical`` holds every request field that changes the output; a greedy or seeded request may then be
        answered from the response cache (a :class:`CachedGeneration`).
        """
        started = self._clock()
        if self.placement is not None and self.placement.router.is_router(model):
            self._allow_router(model, trace)
            model = self.placement.route_generation(model, messages, prompt, max_tokens, trace).model
        served = self._generator(model, trace)
        deterministic = canonical is not None and (params.temperature == 0 or params.seed is not None)
        decision = await self._lookup(served, canonical or dict, cache_control, deterministic, trace)
        if decision.payload is not None:
            stored = StoredGeneration.decode(decision.payload)
            self._cached(served, trace, stored.prompt_tokens, stored.completion_tokens)
            return CachedGeneration(served, stored)
        ticket = await self._admit(served, trace, "generate")
        try:
            if decision.status != BYPASS or ticket is not None:
                served = self._generator(model, trace)  # it awaited: a swap may have happened
            generation = self._start_generation(served, messages, prompt, params, max_tokens, deadline, started)
        except BaseException:
            if ticket is not None:
                ticket.release(None)
            raise
        generation.cache, generation.ticket = decision, ticket
        return generation

    def remember_generation(self, generation: Generation, stored: StoredGeneration) -> None:
        """Store a generation that ran to its end, if its lookup asked for it."""
        if generation.cache is not None:
            self._remember(generation.cache, generation.served, stored.encode)

    def _embedder(self, model: str, trace: Trace) -> ModelVersion:
        served = self._served(model, None, trace, "embed")
        if served.embedder is None or served.text is None:
            raise BadRequest(f"model {served.name!r} is not an embedding model (its task is {served.spec.task!r}); "
                             "GET /v1/models lists the models", param="model")
        return served

    def _generator(self, model: str, trace: Trace) -> ModelVersion:
        served = self._served(model, None, trace, "generate")
        if served.generator is None or served.text is None:
            raise BadRequest(f"model {served.name!r} does not generate text (its task is {served.spec.task!r}); "
                             "GET /v1/models lists the models", param="model")
        return served

    def _start_generation(self, served: ModelVersion, messages: list[dict] | None, prompt: str | list[int] | None,
                          params: SamplingParams, max_tokens: int | None, deadline: float | None,
                          started: float) -> Generation:
        assert served.text is not None
        text = served.text
        if messages is not None:
            try:
                rendered = served.chat_template.render(messages=messages, add_generation_prompt=True)
            except Exception as exc:  # the template's own checks (e.g. role order) speak to the caller
                raise BadRequest(f"the model's chat template rejected the messages: {exc}", param="messages") from None
            ids = text.encode([rendered], add_special_tokens=False)[0]
        elif isinstance(prompt, str):
            ids = text.encode([prompt], add_special_tokens=False)[0]
        else:
            ids = list(prompt or [])
            bad = next((t for t in ids if not 0 <= t < text.vocab_size), None)
            if bad is not None:
                raise BadRequest(f"prompt token id {bad} is outside the vocabulary (0 to {text.vocab_size - 1})",
                                 param="prompt")
        limit = served.context_limit
        if len(ids) >= limit:
            raise BadRequest(f"the prompt has {len(ids)} tokens; model {served.name} holds at most {limit} tokens "
                             "per sequence (prompt and output); shorten the prompt", param="messages")
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is {len(ids) + max_tokens}"
                             f", over the {limit} tokens a sequence of model {served.name} may hold; ask for at most "
                             f"{limit - len(ids)} tokens", param="max_tokens")
        params.max_tokens = max_tokens or limit - len(ids)
        assert served.generator is not None
        sequence = served.generator.submit(ids, params, self._deadline(deadline, served))
        served.metrics.prompt_tokens.inc(len(ids))
        served.metrics.in_flight.inc()
        return Generation(served, sequence, len(ids), started)

    def observe_token(self, generation: Generation) -> None:
        """Record a token's arrival: time to first token, then inter-token latency."""
        now = self._clock()
        metrics = generation.served.metrics
        if not generation.token_times:
            metrics.time_to_first_token.observe(now - generation.started)
            if generation.sequence.admitted_at:
                metrics.generation_queue.observe(generation.sequence.admitted_at - generation.sequence.enqueued)
        else:
            metrics.inter_token.observe(now - generation.token_times[-1])
        generation.token_times.append(now)

    def finish_generation(self, generation: Generation, completion_tokens: int, trace: Trace) -> None:
        """The request is answered (or gone): stop its sequence if still running and record its totals."""
        served = generation.served
        assert served.generator is not None
        served.generator.cancel(generation.sequence)
        served.metrics.in_flight.dec()
        served.metrics.generated_tokens.inc(completion_tokens)
        now = self._clock()
        served.metrics.generation_duration.observe(now - generation.started)
        admitted = generation.sequence.admitted_at or now
        held_s = now - admitted  # the time the sequence held a KV-cache row
        if generation.ticket is not None:
            generation.ticket.release(held_s if completion_tokens else None)
        self._account(served, trace, held_s, generation.prompt_tokens, completion_tokens)

    @staticmethod
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


OFFLOAD_CHARS = 16_384  # tokenize larger requests in a worker thread


def _tensor_canonical(request: Request) -> object:
    """The inputs (name, dtype, shape, bytes) and the outputs asked for: all that changes a tensor answer."""
    inputs = []
    for name in sorted(request.inputs):
        array = request.inputs[name]
        if array.dtype == object:
            data: object = [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel()]
        else:
            data = np.ascontiguousarray(array).tobytes()
        inputs.append([name, array.dtype.str, list(array.shape), data])
    return {"inputs": inputs, "outputs": request.outputs}


def local_cost(served: ModelVersion, compute_s: float, input_tokens: int, output_tokens: int,
               device_rate_per_hour: float) -> float:
    """A local request's cost: the model's ``[cost]`` rates, else compute time at the device's hourly rate."""
    rates = served.spec.cost
    cost = rates.per_request + rates.per_compute_second * compute_s
    cost += (rates.per_million_input_tokens * input_tokens + rates.per_million_output_tokens * output_tokens) / 1e6
    if not (rates.per_compute_second or rates.per_million_input_tokens or rates.per_million_output_tokens):
        cost += compute_s * device_rate_per_hour / 3600.0
    return cost

"""Generate requests (chat and completions): the prompt rendered and tokenized, the sequence queued on the model's
generation scheduler, its tokens turned into text chunks (whole characters, stop strings never leaked, logprob
entries) as a :class:`GenerationStream`."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from appliance.cache.payloads import StoredGeneration
from appliance.cloud import Cloud, CloudCost
from appliance.tools import call_schema, template_messages
from appliance.engines.constraints import Constraint
from appliance.engines.generation import Sequence, TokenEvent
from appliance.engines.tokenizer import TextEncoder
from appliance.errors import BadRequest, DeadlineExceeded, EngineFailed
from appliance.generation_stream import Chunk, GenerationStream, TokenCount
from appliance.model_version import ModelVersion
from appliance.models import GenerativeModel
from appliance.operations.base import CloudDone, LocalDone
from appliance.placement import Placement
from appliance.text_stream import TextAssembler
from appliance.types import GenerateRequest, Route, Tally


class GenerateOperation:
    """The ``generate`` operation."""

    task = "generate"

    def __init__(self, deadline: Callable[[float | None, ModelVersion], float | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._deadline = deadline
        self._clock = clock

    def route(self, placement: Placement, alias: str, request: GenerateRequest) -> Route:
        """A router alias: the tier the request's complexity calls for (or the cloud)."""
        return placement.route_generation(alias, request)

    def places(self, request: GenerateRequest) -> int:
        """One place per sequence: ``n`` for each prompt, each holding a KV-cache row."""
        return request.choice_count

    def check(self, served: ModelVersion, request: GenerateRequest) -> None:
        """A model that generates text."""
        if not isinstance(served, GenerativeModel):
            raise BadRequest(f"model {served.name!r} does not generate text (its task is {served.spec.task!r}); "
                             "GET /v1/models lists the models", param="model")

    def cache_key(self, served: ModelVersion, request: GenerateRequest) -> tuple[Callable[[], Any], bool] | None:
        """Every field that changes the text; greedy and seeded requests are deterministic where the model is proved
        batch-invariant or the request runs in the reproducible mode (else their tokens depend on the neighbours).
        Answers of several choices are not cached."""
        canonical = request.canonical
        if canonical is None or request.choice_count > 1:
            return None
        params = request.params
        repeatable = params.temperature == 0 or params.seed is not None
        return (lambda: canonical), repeatable and served.deterministic(request.caller.reproducible)

    def cached(self, served: ModelVersion, request: GenerateRequest,
               payload: bytes) -> tuple[GenerationStream, Tally]:
        """The stored pieces, as they were first sent."""
        stored = StoredGeneration.decode(payload)
        tokens = TokenCount(stored.prompt_tokens, stored.completion_tokens)
        stream = GenerationStream(served.name, _stored_chunks(stored), tokens, on_close=_nothing)
        return stream, Tally(stored.prompt_tokens, stored.completion_tokens)

    async def run(self, served: ModelVersion, request: GenerateRequest, done: LocalDone) -> GenerationStream:
        """Render, tokenize and check each prompt, then queue its ``n`` samples (one prefill); the stream settles
        the request when it closes."""
        started = self._clock()
        assert isinstance(served, GenerativeModel) and served.generator is not None  # checked, started
        generator = served.generator
        if request.n > generator.limits.slots:
            raise BadRequest(f"n is {request.n}, more than the {generator.limits.slots} sequences model "
                             f"{served.name} runs at once; ask for at most {generator.limits.slots}", param="n")
        prompts = [self._prompt_ids(served, request, prompt) for prompt in request.prompt_list]
        constraints = await self._constraints(served, request)
        deadline = self._deadline(request.deadline, served)
        reproducible = served.reproducible(request.caller.reproducible)
        events: asyncio.Queue = asyncio.Queue()
        sequences: list[Sequence] = []
        try:
            for number, ids in enumerate(prompts):
                params = dataclasses.replace(request.params,
                                             max_tokens=request.max_tokens or served.context_limit - len(ids))
                first = number * request.n
                wanted = constraints[first: first + request.n] if constraints else None
                sequences += generator.submit_group(ids, params, request.n, deadline, reproducible=reproducible,
                                                    constraints=wanted, events=events, first_index=first)
        except BaseException:
            for sequence in sequences:  # a later prompt was turned away: the earlier ones must not run for nobody
                generator.cancel(sequence)
            raise
        served.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        served.metrics.started()
        live = _Live(served, sequences, prompts, request, started, self._clock)

        def close(stream: GenerationStream) -> None:
            tally = live.close()
            payload = live.stored(stream).encode if stream.finish_reason is not None else None
            done(tally, payload)

        return GenerationStream(served.name, live.chunks(), live.tokens, on_close=close, choices=len(sequences))

    @staticmethod
    async def _constraints(served: GenerativeModel, request: GenerateRequest) -> list[Constraint] | None:
        """One grammar state per choice, when the answer is constrained (compiled once and copied, off the event
        loop)."""
        form = request.response_format
        if request.tools is not None and request.tools.constrained:
            form = ("json_schema", call_schema(request.tools), True)  # the answer is a call, arguments and all
        if form is None or served.grammar is None:
            return None
        kind, schema, strict = form
        grammar, count = served.grammar, request.choice_count

        def states() -> list[Constraint]:
            # Compiling can take up to a second for a large schema (and the first, 0.3 s for the tokenizer); the
            # copies for more choices deep-copy the matcher, up to 127 of them.
            constraint = grammar.compile(kind, schema, strict)
            return [constraint, *(constraint.copy() for _ in range(count - 1))]

        return await asyncio.get_running_loop().run_in_executor(None, states)

    async def cloud(self, cloud: Cloud, route: Route, request: GenerateRequest, done: CloudDone) -> GenerationStream:
        """The body, as it came, to an ``openai`` upstream; streamed when the client streams."""
        tokens, cost = TokenCount(), CloudCost()
        chunks = await cloud.generate(route, request, tokens, cost)

        def close(stream: GenerationStream) -> None:
            done(Tally(tokens.prompt_tokens, tokens.completion_tokens, cost=cost.value))

        return GenerationStream(cloud.model_label(route), chunks, tokens, on_close=close, choices=request.choice_count)

    @staticmethod
    def _prompt_ids(served: GenerativeModel, request: GenerateRequest, prompt: str | list[int] | None) -> list[int]:
        """The token ids of the chat messages (``prompt`` is then ``None``) or of one completions prompt."""
        text = served.text
        assert text is not None  # loaded
        if request.messages is not None:
            try:
                tools = request.tools
                messages = template_messages(request.messages, tools, served.template_takes_tools)
                extra = {"tools": [t.as_openai() for t in tools.offered]} if (
                    served.template_takes_tools and tools is not None and tools.offered) else {}
                rendered = served.chat_template.render(messages=messages, add_generation_prompt=True, **extra)
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
        outside = next((t for t in request.params.logit_bias if t >= text.vocab_size), None)
        if outside is not None:
            raise BadRequest(f"logit_bias names token id {outside}, outside the vocabulary (0 to "
                             f"{text.vocab_size - 1})", param="logit_bias")
        limit, max_tokens = served.context_limit, request.max_tokens
        if not ids:  # nothing to condition on: the scheduler would have no position to sample from
            raise BadRequest("the prompt is empty once tokenized; send at least one token of text",
                             param="messages" if request.messages is not None else "prompt")
        if len(ids) >= limit:
            raise BadRequest(f"the prompt has {len(ids)} tokens; model {served.name} holds at most {limit} tokens "
                             "per sequence (prompt and output); shorten the prompt", param="messages")
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is {len(ids) + max_tokens}"
                             f", over the {limit} tokens a sequence of model {served.name} may hold; ask for at most "
                             f"{limit - len(ids)} tokens", param="max_tokens")
        return ids


class _Choice:
    """One choice of a request as it is read: its text assembler and what it sent."""

    def __init__(self, assembler: TextAssembler, echo: str) -> None:
        self.assembler = assembler
        self.echo = echo  # the prompt as given, sent before the generated text (completions' ``echo``)
        self.pieces: list[tuple[str, list[dict]]] = []  # what was sent, for the response cache
        self.last_token_at = 0.0
        self.begun = False  # its first token has come
        self.done = False


class _Live:
    """The sequences of a request on the scheduler, read as chunks of their choices: detokenized, stop strings
    applied, latencies observed."""

    def __init__(self, served: GenerativeModel, sequences: list[Sequence], prompts: list[list[int]],
                 request: GenerateRequest, started: float, clock: Callable[[], float]) -> None:
        assert served.text is not None  # loaded
        self.served, self.sequences, self.started = served, sequences, started
        self.tokens = TokenCount(prompt_tokens=sum(map(len, prompts)))
        self._text: TextEncoder = served.text
        self._clock = clock
        self._first_token = False
        echoes = [""] * len(prompts)
        if request.echo:  # each prompt as given (token ids decoded), before its choices' generated text
            echoes = [p if isinstance(p, str) else served.text.decode(list(p or [])) for p in request.prompt_list]
        self._choices = [_Choice(TextAssembler(served.text.stream(), request.stop), echoes[i // request.n])
                         for i in range(len(sequences))]

    async def chunks(self) -> AsyncIterator[Chunk]:
        events = self.sequences[0].events  # the request's sequences share one queue
        for index, choice in enumerate(self._choices):
            if choice.echo:
                choice.pieces.append((choice.echo, []))
                yield Chunk(text=choice.echo, index=index)
        running = len(self._choices)
        while running:
            event: TokenEvent = await events.get()
            choice = self._choices[event.index]
            if choice.done:  # what its sequence sent before a stop string's cancel reached it
                continue
            if event.token is not None:
                self._observe_token(choice)
                if not choice.begun:  # the scheduler set its prompt-cache share before its first token
                    choice.begun = True
                    self.tokens.cached_tokens += self.sequences[event.index].cached_tokens
            if event.finish_reason == "timeout":
                raise DeadlineExceeded("the request's timeout passed before generation finished")
            if event.finish_reason == "error":
                raise EngineFailed(f"generation failed: {event.error}")
            assembler = choice.assembler
            chunk = Chunk(index=event.index)
            if event.token is not None:
                self.tokens.completion_tokens += 1
                chunk.token_ids.append(event.token)
                chunk.text = assembler.add(event.token)
                if event.logprob is not None:
                    chunk.logprobs.append(self._logprob_entry(event))
                if assembler.stopped:
                    chunk.finish_reason = "stop"
            if chunk.finish_reason is None and event.finish_reason is not None:
                chunk.finish_reason = "length" if event.finish_reason == "length" else "stop"
                chunk.text += assembler.finish()
            if chunk.text or chunk.logprobs:
                choice.pieces.append((chunk.text, chunk.logprobs))
            if chunk.text or chunk.logprobs or chunk.finish_reason is not None:
                yield chunk
            if chunk.finish_reason is not None:
                running -= 1
                choice.done = True
                if assembler.stopped:  # a stop string ended it before the scheduler did
                    self.served.generator.cancel(self.sequences[event.index])  # type: ignore[union-attr]

    def _observe_token(self, choice: _Choice) -> None:
        now = self._clock()
        metrics = self.served.metrics
        if not self._first_token:
            self._first_token = True
            metrics.time_to_first_token.observe(now - self.started)
            first = self.sequences[0]
            if first.admitted_at:
                metrics.generation_queue.observe(first.admitted_at - first.enqueued)
        elif choice.last_token_at:
            metrics.inter_token.observe(now - choice.last_token_at)
        choice.last_token_at = now

    def _logprob_entry(self, event: TokenEvent) -> dict:
        assert event.token is not None
        decode = self._text.decode
        token = decode([event.token], skip_special_tokens=False)
        entry = {"token": token, "logprob": event.logprob, "bytes": list(token.encode())}
        entry["top_logprobs"] = [
            {"token": (t := decode([tid], skip_special_tokens=False)), "logprob": lp, "bytes": list(t.encode())}
            for tid, lp in (event.top_logprobs or [])]
        return entry

    def close(self) -> Tally:
        """Stop the sequences that still run; the totals, and the time they held KV-cache rows."""
        served = self.served
        assert served.generator is not None
        for sequence in self.sequences:
            served.generator.cancel(sequence)
        completion = self.tokens.completion_tokens
        metrics = served.metrics
        metrics.finished()
        metrics.generated_tokens.inc(completion)
        if self.tokens.cached_tokens:
            metrics.cached_prompt_tokens.inc(self.tokens.cached_tokens)
        now = self._clock()
        metrics.generation_duration.observe(now - self.started)
        held = [now - (s.admitted_at or now) for s in self.sequences]
        # Compute: the KV-cache rows' time, all of them; service: how long the request held its place.
        return Tally(self.tokens.prompt_tokens, completion, compute_s=sum(held),
                     service_s=max(held) if completion else None)

    def stored(self, stream: GenerationStream) -> StoredGeneration:
        """The finished generation (of one choice: answers of several are not cached), as the cache keeps it."""
        return StoredGeneration(self._choices[0].pieces, stream.finish_reason or "stop", self.tokens.prompt_tokens,
                                self.tokens.completion_tokens)


async def _stored_chunks(stored: StoredGeneration) -> AsyncIterator[Chunk]:
    for text, logprobs in stored.pieces:
        yield Chunk(text=text, logprobs=logprobs)
    yield Chunk(finish_reason=stored.finish_reason)


def _nothing(stream: GenerationStream) -> None:
    """A cached answer was settled when it was read."""

"""Continuous (iteration-level) batching for decoder models over a shared KV cache.

Each sequence owns a slot (a row of the decoder's KV cache) while it runs; its tokens sit at positions
``[0, length)`` of that row.

One thread runs the steps. At each step boundary it admits waiting sequences into free slots, prefills them in
chunks under a per-step token budget (``prefill_chunk``) so that a long prompt never stalls the running streams
for long, then runs one decode call for every decoding row together. Prompts begun at an earlier step go on first;
new prompts in adjacent rows go in whole, several in one call, where the decoder takes ragged chunks
(:meth:`Decoder.prefill_rows`) and the padded call fits the budget (on 2 CPU cores that gives the float32 twin
about 1.3 times the prompt tokens per second of one prompt per call). A prompt's first token goes to the event loop
as soon as its prefill ends, not after the step's other calls. Tokens are sampled per row (greedy, temperature,
top-p, top-k) with each request's own seeded generator, and handed to the event loop as they come. A cancelled or
expired sequence frees its slot at the next step boundary.

Several samples of one prompt (OpenAI's ``n``) are a *group*: admitted together into as many free slots, the prompt
prefilled once in the first one, its KV row copied to the others on the decoder (:meth:`Decoder.copy_row`), and
each sample drawn from the same last-position logits with its own generator.

A new prompt starts from the longest prefix of it that some row already holds (``prompt_cache``): a running row,
or a free one that still holds what its last sequence left (a prompt and the tokens generated after it). That prefix
is copied into the new sequence's row (:meth:`Decoder.copy_row`: a few microseconds a token on the CPU, against
milliseconds to compute it) and only the rest is prefilled, so the requests of an agent, which repeat one system
prompt and tool list, and prompts submitted together that share a beginning, compute it once. The prompt's last
two tokens are always computed (``COMPUTED_TAIL``). Reproducible sequences never take a prefix: a row computed
beside other rows may differ from one computed alone in the last bits.

A *reproducible* sequence gets the tokens it would get alone, whatever runs beside it: its prompt is prefilled in
fixed chunks of ``prefill_chunk`` (a chunk the step's remaining budget cannot hold waits for the next step rather
than being cut), and each of its decode steps is a call of its own (one row, the kernels a lone sequence runs on),
made after the shared call so that nothing that call writes can reach its KV row. Batch-invariance of the
decoder's kernels is not needed for that; what it costs is measured by ``bench/invariance.py``.

The scheduler drives any :class:`~appliance.engines.base.Decoder`; the ONNX Runtime one is in
``appliance.engines.onnxruntime_decoder``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from appliance.engines.base import Decoder
from appliance.engines.constraints import Constraint
from appliance.engines.logits_processing import min_p_mask, penalize
from appliance.errors import ModelNotReady, QueueFull

log = logging.getLogger("appliance.engines.generation")


@dataclass
class SamplingParams:
    """How to pick each token. ``temperature`` 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 0  # 0: up to the end of the context
    ignore_eos: bool = False
    logprobs: int = -1  # -1: none; 0: the chosen token's; n: also the n most likely
    # appliance.engines.logits_processing says what each does
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty or bias changes the logits."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass
class TokenEvent:
    """One generated token (or the end of the sequence) for the event loop."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (end token), "length" (max_tokens or context), "error"
    error: BaseException | None = None
    index: int = 0  # the sequence's index in its request (a group's samples share one event queue)


@dataclass(eq=False)
class Sequence:
    """A request being generated: its prompt, progress and the queue its tokens go to."""

    prompt: list[int]
    params: SamplingParams
    events: asyncio.Queue
    deadline: float | None
    enqueued: float
    rng: np.random.Generator = field(init=False)
    slot: int = -1
    prefilled: int = 0
    generated: int = 0
    length: int = 0  # tokens in the KV cache
    next_token: int | None = None
    cancelled: bool = False
    admitted_at: float = 0.0
    reproducible: bool = False  # run as if alone (see the module docstring)
    output_counts: dict[int, int] = field(default_factory=dict)  # generated token -> times, for the penalties
    prompt_ids: np.ndarray | None = None  # the prompt's distinct ids, for the repetition penalty
    constraint: Constraint | None = None  # structured output: the grammar the tokens follow
    index: int = 0  # its place among the request's sequences (the choice index)
    followers: list[Sequence] = field(default_factory=list)  # the other samples of a group, on the first one
    leader: Sequence | None = None  # on a follower: the sequence whose prefill it copies
    fed: list[int] = field(default_factory=list)  # generated tokens written to its row, after the prompt
    cached_tokens: int = 0  # prompt tokens copied from another row instead of computed (the prompt cache)

    def row_tokens(self, limit: int | None = None) -> list[int]:
        """The tokens its KV row holds, in position order (the first ``limit``)."""
        if limit is None:
            return self.prompt[: self.prefilled] + self.fed
        held = self.prompt[: min(self.prefilled, limit)]
        return held + self.fed[: limit - len(held)] if len(held) < limit else held

    def __post_init__(self) -> None:
        # Index 0 (the first choice of the first prompt) draws what a lone request with the same seed draws; every
        # other index, its own stream.
        seed = self.params.seed
        self.rng = np.random.default_rng(seed if seed is None or self.index == 0 else [seed, self.index])
        if self.params.repetition_penalty != 1.0:
            self.prompt_ids = np.unique(np.asarray(self.prompt, np.int64))


@dataclass
class GenerationLimits:
    """Sizes of the scheduler, from the model's ``[generation]`` table."""

    slots: int = 8
    capacity: int = 2048
    prefill_chunk: int = 256
    max_waiting: int = 64
    prompt_cache: bool = True  # new prompts start from the longest prefix a row holds (see the module docstring)


def check_decoder_fits(decoder: Decoder, limits: GenerationLimits, name: str) -> None:
    """Raise :class:`ValueError` unless ``decoder`` holds the rows and positions ``limits`` schedule."""
    if decoder.rows < limits.slots or decoder.max_capacity < limits.capacity:
        raise ValueError(f"model {name}: the decoder holds {decoder.rows} rows x {decoder.max_capacity} tokens, "
                         f"fewer than the {limits.slots} x {limits.capacity} the limits ask for")


class GenerationScheduler:
    """Admits, prefills, decodes and samples sequences for one decoder model version."""

    def __init__(self, decoder: Decoder, limits: GenerationLimits, eos_ids: list[int], *,
                 on_step: Callable[[dict[str, float]], None] | None = None, name: str = "model",
                 clock: Callable[[], float] = time.monotonic) -> None:
        check_decoder_fits(decoder, limits, name)
        self._decoder = decoder
        self.limits = limits
        self._eos = set(eos_ids)
        self._on_step = on_step
        self._name = name
        self._clock = clock
        self._waiting: deque[Sequence] = deque()
        self._slots: list[Sequence | None] = [None] * limits.slots
        # What each free row still holds (the tokens at its positions 0, 1, ...), for the prompt cache.
        self._kept: list[np.ndarray] = [_NOTHING] * limits.slots
        self._lock = threading.Lock()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._idle = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warmed: asyncio.Future[None] | None = None  # done once the step thread has warmed the decoder
        self._step_s = 0.05  # moving average of one step's wall time
        self._outbox: list[tuple[Sequence, TokenEvent]] = []  # events of the current step (step thread only)

    # -- the event-loop side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step thread; call on the event loop that will submit."""
        self._loop = asyncio.get_running_loop()
        self._warmed = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=f"{self._name}-generate", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, float]:
        """Running and waiting sequences and the share of KV cache in use."""
        running = [s for s in self._slots if s is not None]
        used = sum(s.length for s in running)
        return {"running": len(running), "waiting": len(self._waiting),
                "kv_used": used / (self.limits.slots * self.limits.capacity)}

    def estimated_wait_s(self) -> float:
        """A rough wait for a new sequence: queue depth times recent step time per slot freed."""
        return max(1.0, len(self._waiting) * self._step_s * 16 / self.limits.slots)

    def submit(self, prompt: list[int], params: SamplingParams, deadline: float | None = None, *,
               reproducible: bool = False, constraint: Constraint | None = None) -> Sequence:
        """Queue a sequence; its tokens arrive as :class:`TokenEvent` on ``sequence.events``.

        ``reproducible``: its tokens are those it gets alone, whatever else runs (at the cost of its own calls).
        ``constraint``: the grammar its tokens must follow (structured output); it ends when the grammar does.
        An empty prompt is a ``ValueError``: with no position to sample from, it would wait forever.
        """
        return self.submit_group(prompt, params, 1, deadline, reproducible=reproducible,
                                 constraints=[constraint])[0]

    def submit_group(self, prompt: list[int], params: SamplingParams, count: int, deadline: float | None = None, *,
                     reproducible: bool = False, constraints: list[Constraint | None] | None = None,
                     events: asyncio.Queue | None = None, first_index: int = 0) -> list[Sequence]:
        """Queue ``count`` samples of one prompt, prefilled once (see the module docstring).

        Their events go to one queue (``events``, a new one by default), each marked with its sequence's
        ``index``: ``first_index`` onwards. ``constraints``: one per sample (or none). More samples than the
        scheduler has slots is a ``ValueError``: the group could never be admitted.
        """
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        if not 1 <= count <= self.limits.slots:
            raise ValueError(f"a group of {count} samples does not fit {self.limits.slots} slots")
        if self._closing or self._loop is None:
            raise ModelNotReady(f"model {self._name} is unloading; retry to reach the version now serving")
        if len(self._waiting) >= self.limits.max_waiting:
            wait = self.estimated_wait_s()
            raise QueueFull(f"model {self._name} has {len(self._waiting)} sequences waiting (the limit); retry "
                            f"after about {wait:.0f} s", retry_after_s=wait)
        queue_ = events if events is not None else asyncio.Queue()
        wanted = constraints or [None] * count
        now = self._clock()
        group = [Sequence(list(prompt), params, queue_, deadline, now, reproducible=reproducible,
                          constraint=wanted[i], index=first_index + i) for i in range(count)]
        leader = group[0]
        leader.followers = group[1:]
        for follower in leader.followers:
            follower.leader = leader
        with self._lock:
            self._waiting.append(leader)
            idle = self._idle
        if idle:
            self._wake.put(None)
        return group

    def cancel(self, sequence: Sequence) -> None:
        """Stop generating ``sequence``; its slot is freed at the next step boundary."""
        sequence.cancelled = True
        self._wake.put(None)

    async def prepared(self) -> None:
        """Wait until the step thread has warmed the decoder (captured its CUDA graphs, on a GPU)."""
        if self._warmed is not None:
            await asyncio.shield(self._warmed)

    async def close(self, timeout_s: float | None = None) -> None:
        """Finish the running and waiting sequences (up to ``timeout_s``), then stop the thread."""
        self._closing = True
        self._wake.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout_s)

    def _emit(self, sequence: Sequence, event: TokenEvent) -> None:
        event.index = sequence.index
        self._outbox.append((sequence, event))

    def _deliver(self) -> None:
        """Hand the step's events to the event loop in one wake-up."""
        if self._outbox and self._loop is not None:
            batch, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(_put_all, batch)

    # -- the step thread -----------------------------------------------------------------------------------------

    def _warm(self) -> None:
        try:
            self._decoder.warm()
        except Exception:  # the decoder still runs its steps; a GPU decoder falls back to eager steps itself
            log.exception("model %s: decoder warm-up failed", self._name)
        finally:
            assert self._loop is not None and self._warmed is not None
            warmed = self._warmed
            with contextlib.suppress(RuntimeError):  # the loop closed while this thread was warming
                self._loop.call_soon_threadsafe(lambda: warmed.done() or warmed.set_result(None))

    def _run(self) -> None:
        self._warm()
        while True:
            with self._lock:
                busy = any(s is not None for s in self._slots) or bool(self._waiting)
                self._idle = not busy
            if not busy:
                if self._closing:
                    return
                self._decoder.shrink()
                self._kept = [kept[: self._decoder.capacity] for kept in self._kept]  # shrinking keeps these
                self._wake.get()
                continue
            started = self._clock()
            try:
                self._step()
            except Exception as exc:  # a broken step ends the sequences in it, not the server
                log.exception("model %s: generation step failed", self._name)
                for slot, sequence in enumerate(self._slots):
                    if sequence is not None:
                        self._finish(slot, TokenEvent(None, finish_reason="error", error=exc))
                self._kept = [_NOTHING] * len(self._slots)  # a call that failed may have written any row
            self._deliver()
            self._step_s = 0.9 * self._step_s + 0.1 * (self._clock() - started)
            if self._on_step is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_step, self.stats())

    def _step(self) -> None:
        now = self._clock()
        for slot, sequence in enumerate(self._slots):  # cancelled or expired sequences free their slots first
            if sequence is not None and (sequence.cancelled or (sequence.deadline is not None and now > sequence.deadline)):
                self._finish(slot, TokenEvent(None, finish_reason="cancelled" if sequence.cancelled else "timeout"))
        self._admit(now)
        budget = self.limits.prefill_chunk
        prefilling = [slot for slot, s in enumerate(self._slots)
                      if s is not None and s.leader is None and s.prefilled < len(s.prompt)]
        if self.limits.prompt_cache:
            for slot in prefilling:
                self._take_cached_prefix(slot)
        # Reproducible rows first: the first prefill of a step always has the whole budget, so they never starve.
        for slot in [slot for slot in prefilling if self._reproducible(slot)]:
            if budget <= 0:
                break
            sequence = self._slots[slot]
            assert sequence is not None
            chunk = min(self.limits.prefill_chunk, len(sequence.prompt) - sequence.prefilled)
            if chunk <= budget:  # else it waits: a cut chunk would move its chunk boundaries
                budget -= self._prefill(slot, sequence, chunk)
        shared = [s for s in (self._slots[slot] for slot in prefilling) if s is not None and not s.reproducible]
        begun, new = [s for s in shared if s.prefilled], [s for s in shared if not s.prefilled]
        # Prompts begun at an earlier step go on first; then new ones, several in one call where the decoder can,
        # and the next on its own with what is left of the budget.
        for sequence in begun:
            if budget <= 0:
                break
            budget -= self._prefill(sequence.slot, sequence, budget)
        if budget > 0:
            budget -= self._prefill_together(new, budget)
        for sequence in new:
            if budget <= 0:
                break
            if self._slots[sequence.slot] is sequence and sequence.prefilled < len(sequence.prompt):
                budget -= self._prefill(sequence.slot, sequence, budget)
        decoding = [slot for slot, s in enumerate(self._slots)
                    if s is not None and s.prefilled == len(s.prompt) and s.next_token is not None]
        alone = [slot for slot in decoding if self._reproducible(slot)]
        shared = [slot for slot in decoding if slot not in alone]
        if shared:
            start, stop = self._decoder.decode_range(min(shared), max(shared) + 1)
            self._decode(shared, start, min(stop, len(self._slots)))  # a decoder may hold more rows than slots
        for slot in alone:  # after the shared call, which writes a placeholder into every row of its range
            self._decode([slot], slot, slot + 1)  # exactly its own row: a wider range could change its numerics

    def _reproducible(self, slot: int) -> bool:
        sequence = self._slots[slot]
        return sequence is not None and sequence.reproducible

    def _admit(self, now: float) -> None:
        """Waiting sequences (a group as a whole, when its slots are free) into free slots, in arrival order."""
        with self._lock:
            free = [slot for slot, sequence in enumerate(self._slots) if sequence is None]
            while self._waiting and free:
                sequence = self._waiting[0]
                group = [sequence, *sequence.followers]
                if sequence.cancelled:
                    self._waiting.popleft()
                    continue
                if sequence.deadline is not None and now > sequence.deadline:
                    self._waiting.popleft()
                    for member in group:
                        self._emit(member, TokenEvent(None, finish_reason="timeout"))
                    continue
                if len(group) > len(free):
                    break  # first come, first served: a group waits for its slots rather than being overtaken
                self._waiting.popleft()
                for member in group:
                    member.slot, member.admitted_at = free.pop(0), now
                    self._slots[member.slot] = member
                    if self.limits.prompt_cache and member.leader is None and not member.reproducible:
                        # What its row kept from the last sequence there, as far as it is this prompt's beginning.
                        kept = _common_prefix(self._kept[member.slot], np.asarray(member.prompt[:-COMPUTED_TAIL], np.int64))
                        member.prefilled = member.length = member.cached_tokens = kept
                    self._kept[member.slot] = _NOTHING

    def _take_cached_prefix(self, slot: int) -> None:
        """Start the prompt in ``slot`` from the longest prefix of it some row holds, beyond what it has."""
        sequence = self._slots[slot]
        assert sequence is not None
        if sequence.reproducible:
            return
        prompt = np.asarray(sequence.prompt[:-COMPUTED_TAIL], np.int64)
        if len(prompt) <= sequence.prefilled:
            return
        best, source = sequence.prefilled, -1
        for other, held in enumerate(self._slots):
            if other == slot:
                continue
            if held is None:
                tokens = self._kept[other]
            elif held.length and held.prompt[0] == prompt[0]:
                tokens = np.asarray(held.row_tokens(len(prompt)), np.int64)
            else:
                continue
            common = _common_prefix(tokens, prompt)
            if common > best:
                best, source = common, other
        if source < 0:
            return
        self._decoder.copy_row(source, [slot], best)
        sequence.cached_tokens += best - sequence.prefilled
        sequence.prefilled = sequence.length = best

    def _prefill(self, slot: int, sequence: Sequence, budget: int) -> int:
        chunk = sequence.prompt[sequence.prefilled: sequence.prefilled + budget]
        end = sequence.prefilled + len(chunk)
        self._decoder.ensure(end)
        logits = self._decoder.run(slot, np.array([chunk], np.int64), np.array([end - 1], np.int32))
        self._prefilled_to(sequence, end, logits[0])
        return len(chunk)

    def _prefill_together(self, new: list[Sequence], budget: int) -> int:
        """New prompts of adjacent rows (``new``, in slot order), whole, in one call where the decoder takes ragged
        chunks, while the padded call (rows x longest prompt) fits ``budget``. Returns the budget it took (the padded
        size: it bounds the step's compute); 0 when fewer than two prompts fit (each row is then prefilled on its
        own) or the decoder has no such call."""
        batch: list[Sequence] = []
        width = 0
        for sequence in new:
            wider = max(width, len(sequence.prompt))
            # No row between them: an idle row in the call's range would compute padding too.
            if (batch and sequence.slot != batch[-1].slot + 1) or (len(batch) + 1) * wider > budget:
                break
            batch.append(sequence)
            width = wider
        if len(batch) < 2:
            return 0
        ids = np.zeros((len(batch), width), np.int64)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence.prompt)] = sequence.prompt
        lengths = np.array([len(sequence.prompt) for sequence in batch], np.int32)
        self._decoder.ensure(width)
        logits = self._decoder.prefill_rows(batch[0].slot, ids, lengths - 1, lengths)
        if logits is None:
            return 0
        for row, sequence in enumerate(batch):
            self._prefilled_to(sequence, len(sequence.prompt), logits[row])
        return len(batch) * width

    def _prefilled_to(self, sequence: Sequence, end: int, logits: np.ndarray) -> None:
        """``sequence``'s prompt is in its row up to ``end``; at the prompt's end its group's other samples get a
        copy of the row, each sample its first token from ``logits`` (sent at once, before the step's other calls)."""
        sequence.prefilled = sequence.length = end
        if end == len(sequence.prompt):
            followers = [f for f in sequence.followers if self._slots[f.slot] is f]
            if followers:
                self._decoder.copy_row(sequence.slot, [f.slot for f in followers], end)
            for follower in followers:
                follower.prefilled = follower.length = end
                self._sample(follower.slot, follower, logits.copy())  # sampling may edit its row in place
            self._sample(sequence.slot, sequence, logits)
            self._deliver()

    def _decode(self, rows: list[int], start: int, stop: int) -> None:
        """One decode step of ``rows`` in a call over rows ``[start, stop)``."""
        ids = np.zeros((stop - start, 1), np.int64)
        seqlens = np.zeros(stop - start, np.int32)
        for slot in range(start, stop):
            sequence = self._slots[slot]
            if slot in rows:
                assert sequence is not None and sequence.next_token is not None
                ids[slot - start, 0] = sequence.next_token
                seqlens[slot - start] = sequence.length  # the new token goes to position ``length``
            elif sequence is not None:
                # A row still prefilling: its next chunk overwrites whatever this call writes at ``length``.
                seqlens[slot - start] = sequence.length
            else:  # a free row: written past what it keeps for the prompt cache
                kept = self._kept[slot] = self._kept[slot][: self._decoder.capacity - 1]
                seqlens[slot - start] = len(kept)
        self._decoder.ensure(int(seqlens.max()) + 1)
        running = [(slot, self._slots[slot]) for slot in rows]
        tokens = None
        if all(_plain_greedy(sequence) for _, sequence in running):
            tokens = self._decoder.greedy_tokens(start, ids, seqlens)  # None: the decoder has no such path
        logits = self._decoder.run(start, ids, seqlens) if tokens is None else None
        for slot, sequence in running:
            assert sequence is not None
            sequence.fed.append(int(ids[slot - start, 0]))
            sequence.length += 1
            if tokens is not None:
                self._accept(slot, sequence, int(tokens[slot - start]))
            else:
                assert logits is not None
                self._sample(slot, sequence, logits[slot - start])

    def _sample(self, slot: int, sequence: Sequence, logits: np.ndarray) -> None:
        params = sequence.params
        scores = logits  # a row of this step's own output array: safe to edit in place
        if params.temperature > 0 or params.logprobs >= 0 or params.penalized:
            scores = scores.astype(np.float64)  # softmax and log-probabilities in double precision
        if params.penalized:
            penalize(scores, output_counts=sequence.output_counts, prompt_ids=sequence.prompt_ids,
                     repetition_penalty=params.repetition_penalty, frequency_penalty=params.frequency_penalty,
                     presence_penalty=params.presence_penalty, logit_bias=params.logit_bias)
        if params.ignore_eos:
            scores[list(self._eos)] = -np.inf
        constraint = sequence.constraint
        if constraint is not None:
            constraint.apply(scores)  # on this thread, after the shared call: rows without one are unaffected
            if not np.isfinite(scores).any():  # only the end token was allowed, and ignore_eos banned it
                self._finish(slot, TokenEvent(None, finish_reason="stop"))
                return
        self._accept(slot, sequence, self._choose(scores, params, sequence.rng), scores)

    def _accept(self, slot: int, sequence: Sequence, token: int, scores: np.ndarray | None = None) -> None:
        """Take ``token`` as the sequence's next: counts, grammar, log-probabilities (from ``scores``), and whether
        it ends the sequence."""
        params, constraint = sequence.params, sequence.constraint
        sequence.output_counts[token] = sequence.output_counts.get(token, 0) + 1
        if constraint is not None and token not in self._eos:
            constraint.advance(token)
        event = TokenEvent(token)
        if params.logprobs >= 0 and scores is not None:
            logp = scores - np.logaddexp.reduce(scores[np.isfinite(scores)])
            event.logprob = float(logp[token])
            if params.logprobs > 0:
                top = np.argpartition(-logp, params.logprobs)[: params.logprobs]
                top = top[np.argsort(-logp[top])]
                event.top_logprobs = [(int(t), float(logp[t])) for t in top]
        sequence.generated += 1
        if token in self._eos or (constraint is not None and constraint.finished):
            event.finish_reason = "stop"  # the end token, or the grammar's answer is complete
        elif params.max_tokens and sequence.generated >= params.max_tokens:
            event.finish_reason = "length"
        elif sequence.length + 1 >= self.limits.capacity:  # the next token would not fit in the row
            event.finish_reason = "length"
        if event.finish_reason is not None:
            self._finish(slot, event)
        else:
            sequence.next_token = token
            self._emit(sequence, event)

    @staticmethod
    def _choose(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
        if params.temperature <= 0:
            return int(np.argmax(scores))
        # Shifted before scaling: a tiny temperature then sends the others to -inf, never inf - inf (NaN).
        with np.errstate(over="ignore"):
            scaled = (scores - scores.max()) / params.temperature
        if params.top_k > 0 and params.top_k < scaled.size:
            cutoff = np.partition(scaled, -params.top_k)[-params.top_k]
            scaled = np.where(scaled >= cutoff, scaled, -np.inf)
        scaled = min_p_mask(scaled, params.min_p)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if params.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(rng.choice(probs.size, p=probs))

    def _finish(self, slot: int, event: TokenEvent) -> None:
        sequence = self._slots[slot]
        self._slots[slot] = None
        if sequence is not None:
            self._kept[slot] = np.asarray(sequence.row_tokens(), np.int64)
            self._emit(sequence, event)
            if sequence.prefilled < len(sequence.prompt):  # its group's other samples would wait for it forever
                for follower in sequence.followers:
                    if self._slots[follower.slot] is follower:
                        self._slots[follower.slot] = None
                        self._kept[follower.slot] = _NOTHING  # its row never got the prompt
                        self._emit(follower, TokenEvent(None, event.logprob, event.top_logprobs,
                                                        event.finish_reason, event.error))


_NOTHING = np.zeros(0, np.int64)
# A prompt's last tokens that are always computed, never taken from the prompt cache: the last one's logits give the
# first token, and a chunk of one token runs the one-token kernels, whose last bits differ from the multi-token
# ones on some CPUs (ONNX Runtime's int8 kernels on AVX2), so a seeded request would not repeat its answer.
COMPUTED_TAIL = 2


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _plain_greedy(sequence: Sequence | None) -> bool:
    """Whether the sequence's next token is the argmax of the raw logits: greedy, nothing that edits or reads the
    scores (penalties, bias, a banned end token, a grammar, log-probabilities)."""
    if sequence is None:
        return False
    params = sequence.params
    return (params.temperature <= 0 and params.logprobs < 0 and not params.penalized and not params.ignore_eos
            and sequence.constraint is None)


def _put_all(batch: list[tuple[Sequence, TokenEvent]]) -> None:
    for sequence, event in batch:
        sequence.events.put_nowait(event)

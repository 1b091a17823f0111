"""The continuous-batching scheduler against a small fake Decoder: admission into rows, chunked prefill under the
token budget, cancellation, deadlines, the waiting bound and per-row seeded sampling."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from appliance.engines.base import Decoder
from appliance.engines.generation import GenerationLimits, GenerationScheduler, SamplingParams, Sequence, TokenEvent
from appliance.errors import QueueFull
from waiting import ManualClock

VOCAB = 50
EOS = 0
GREEDY = SamplingParams(temperature=0, ignore_eos=True)


@dataclass
class Call:
    """One ``run`` as the decoder saw it."""

    start_row: int
    input_ids: list[list[int]]
    seqlens_k: list[int]
    greedy: bool = field(default=False, compare=False)  # made by greedy_tokens (only the ids went back)
    query_seqlens: list[int] | None = None  # made by prefill_rows: each row's chunk length


class FakeDecoder:
    """A :class:`Decoder` whose logits are a fixed random function of everything in the row's cache.

    It keeps the tokens written to each row, so a wrong position or a missing ``ensure`` shows up in the tokens the
    scheduler picks (or fails the call). ``pause`` holds a ``run`` until ``resume``: the step thread then sits at
    a known point while the test submits, cancels or moves the clock.
    """

    def __init__(self, rows: int, max_capacity: int, initial_capacity: int = 16) -> None:
        self.rows, self.max_capacity = rows, max_capacity
        self.capacity = self.initial_capacity = initial_capacity
        self.description = "fake decoder"
        self.cache = [[-1] * max_capacity for _ in range(rows)]
        self.calls: list[Call] = []
        self.copies: list[tuple[int, list[int], int]] = []
        self._table = np.random.default_rng(0).standard_normal((101, VOCAB)) * 2
        self._hold_at: int | None = None
        self._resume = threading.Event()
        self.paused = threading.Event()  # set while a run is held
        self.warmed_on: str | None = None  # the thread that called warm()
        self.computes_greedy = False  # greedy_tokens answers (like a GPU decoder) instead of None
        self.greedy_calls = 0
        self.ragged = False  # prefill_rows answers (like a graph built with query_seqlens) instead of None

    def logits_after(self, tokens: list[int]) -> np.ndarray:
        """The logits for a row holding ``tokens``."""
        return self._table[(sum(tokens) * 7 + len(tokens)) % len(self._table)].copy()

    def ensure(self, positions: int) -> None:
        assert positions <= self.max_capacity
        self.capacity = max(self.capacity, positions)

    def warm(self) -> None:
        self.warmed_on = threading.current_thread().name

    def decode_range(self, start: int, stop: int) -> tuple[int, int]:
        return start, stop

    def greedy_tokens(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray | None:
        if not self.computes_greedy:
            return None
        self.greedy_calls += 1
        tokens = self.run(start_row, input_ids, seqlens_k).argmax(axis=-1)
        self.calls[-1].greedy = True
        return tokens

    def shrink(self) -> None:
        """Back to the initial capacity, each row's first positions kept and the rest gone."""
        self.capacity = self.initial_capacity
        for row in self.cache:
            row[self.capacity:] = [-1] * (len(row) - self.capacity)

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        assert positions <= self.capacity
        self.copies.append((source, list(targets), positions))
        for target in targets:
            self.cache[target][:positions] = self.cache[source][:positions]

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        self._hold()
        self.calls.append(Call(start_row, input_ids.tolist(), seqlens_k.tolist()))
        return self._write(start_row, input_ids, seqlens_k, [input_ids.shape[1]] * len(input_ids))

    def prefill_rows(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray,
                     query_seqlens: np.ndarray) -> np.ndarray | None:
        if not self.ragged:
            return None
        self._hold()
        self.calls.append(Call(start_row, input_ids.tolist(), seqlens_k.tolist(),
                               query_seqlens=query_seqlens.tolist()))
        return self._write(start_row, input_ids, seqlens_k, query_seqlens.tolist())

    def _hold(self) -> None:
        if self._hold_at is not None and len(self.calls) >= self._hold_at:
            self.paused.set()
            self._resume.wait(10)
            self.paused.clear()

    def _write(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray, counts: list[int]) -> np.ndarray:
        """The first ``counts[r]`` ids of each row into its cache, ending at ``seqlens_k[r]``; the logits after."""
        out = np.zeros((len(input_ids), VOCAB))
        for offset, (ids, last, count) in enumerate(zip(input_ids.tolist(), seqlens_k.tolist(), counts)):
            if not count:
                continue
            row, end = self.cache[start_row + offset], last + 1
            if end > self.capacity:
                raise AssertionError(f"position {end - 1} written with capacity {self.capacity}")
            row[end - count:end] = ids[:count]
            out[offset] = self.logits_after(row[:end])
        return out

    def close(self) -> None:
        pass

    def pause(self, after_calls: int = 0) -> None:
        """Hold the call that follows the first ``after_calls`` calls."""
        self._resume.clear()
        self._hold_at = after_calls

    def resume(self) -> None:
        self._hold_at = None
        self._resume.set()

    async def wait_paused(self) -> None:
        assert await asyncio.to_thread(self.paused.wait, 10), "the scheduler never called the decoder"


def greedy_reference(decoder: FakeDecoder, prompt: list[int], count: int) -> list[int]:
    """What greedy decoding of ``prompt`` gives with this decoder, computed without the scheduler."""
    tokens, out = list(prompt), []
    for _ in range(count):
        logits = decoder.logits_after(tokens)
        logits[EOS] = -np.inf  # the requests here ignore the end token
        out.append(int(np.argmax(logits)))
        tokens.append(out[-1])
    return out


async def collect(sequence: Sequence) -> list[TokenEvent]:
    events = []
    while not events or events[-1].finish_reason is None:
        events.append(await asyncio.wait_for(sequence.events.get(), 10))
    return events


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


def scheduler(decoder: FakeDecoder, clock=None, **limits) -> GenerationScheduler:
    settings = {"slots": decoder.rows, "capacity": decoder.max_capacity, "prefill_chunk": 64, "max_waiting": 8}
    options = {"clock": clock} if clock is not None else {}
    return GenerationScheduler(decoder, GenerationLimits(**{**settings, **limits}), [EOS], name="fake", **options)


def params(max_tokens: int, **options) -> SamplingParams:
    return SamplingParams(**{**GREEDY.__dict__, "max_tokens": max_tokens, **options})


async def submitted_at_one_step(decoder: FakeDecoder, generator: GenerationScheduler,
                                requests: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
    """``requests`` submitted while the step thread is held inside a first one-token request (call 0), so that
    they are all admitted at the next step; returns them once that first request has ended."""
    decoder.pause()
    hold = generator.submit([9], params(1))
    await decoder.wait_paused()
    sequences = [generator.submit(prompt, sampling) for prompt, sampling in requests]
    decoder.resume()
    await collect(hold)
    return sequences


@pytest.fixture()
async def running():
    started: list[GenerationScheduler] = []

    def start(decoder: FakeDecoder, **options) -> GenerationScheduler:
        generator = scheduler(decoder, **options)
        generator.start()
        started.append(generator)
        return generator

    yield start
    for generator in started:
        await generator.close(5)


def test_the_fake_is_a_decoder():
    assert isinstance(FakeDecoder(1, 8), Decoder)


def test_a_decoder_smaller_than_the_limits_is_refused():
    with pytest.raises(ValueError, match="2 rows x 64 tokens"):
        scheduler(FakeDecoder(2, 64), slots=4)


async def test_an_empty_prompt_is_refused_rather_than_left_waiting(running):
    generator = running(FakeDecoder(rows=2, max_capacity=64))
    with pytest.raises(ValueError, match="at least one prompt token"):
        generator.submit([], params(1))
    assert generator.stats()["waiting"] == 0


async def test_the_step_thread_warms_the_decoder_before_the_scheduler_is_prepared(running):
    decoder = FakeDecoder(rows=1, max_capacity=8)
    generator = running(decoder)
    await generator.prepared()
    assert decoder.warmed_on == "fake-generate"  # the thread that will replay what warm() captured


async def test_sequences_take_free_rows_and_wait_for_one_when_all_are_busy(running):
    decoder = FakeDecoder(rows=2, max_capacity=64)
    decoder.pause()
    generator = running(decoder)
    hold = generator.submit([5], params(1))
    await decoder.wait_paused()  # the step thread is inside hold's prefill: the next three wait together
    prompts = {"short": [3, 4], "long": [7, 8, 9], "third": [11]}
    lengths = {"short": 2, "long": 5, "third": 3}
    sequences = {name: generator.submit(prompt, params(lengths[name])) for name, prompt in prompts.items()}
    decoder.resume()
    await collect(hold)
    results = {name: await collect(sequence) for name, sequence in sequences.items()}
    for name, events in results.items():
        assert tokens_of(events) == greedy_reference(decoder, prompts[name], lengths[name]), name
        assert events[-1].finish_reason == "length"
    assert (sequences["short"].slot, sequences["long"].slot) == (0, 1)
    assert sequences["third"].slot == 0  # the row "short" gave back, while "long" still held row 1
    third_prefill = decoder.calls.index(Call(0, [prompts["third"]], [0]))
    short_done = next(i for i, c in enumerate(decoder.calls) if len(c.input_ids) == 2)  # its second token
    assert third_prefill == short_done + 1  # admitted at the step after "short" finished
    assert generator.stats() == {"running": 0, "waiting": 0, "kv_used": 0.0}


async def test_long_prompts_are_prefilled_in_chunks_under_the_step_budget(running):
    decoder = FakeDecoder(rows=2, max_capacity=64)
    short, long = [2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    first, second = await submitted_at_one_step(decoder, running(decoder, prefill_chunk=4),
                                                [(short, params(6)), (long, params(3))])
    first_events, second_events = await collect(first), await collect(second)
    assert tokens_of(first_events) == greedy_reference(decoder, short, 6)
    assert tokens_of(second_events) == greedy_reference(decoder, long, 3)
    a1, a2, a3 = tokens_of(first_events)[:3]
    b1 = tokens_of(second_events)[0]
    # Each step spends at most 4 prompt tokens, then decodes every row that has its first token: the running
    # sequence keeps a token per step while the long prompt goes in.
    assert decoder.calls[1:8] == [
        Call(0, [short], [1]), Call(1, [long[0:2]], [1]), Call(0, [[a1]], [2]),
        Call(1, [long[2:6]], [5]), Call(0, [[a2]], [3]),
        Call(1, [long[6:10]], [9]), Call(0, [[a3], [b1]], [4, 10]),
    ]
    assert all(sum(len(ids) for ids in call.input_ids) <= 4 for call in decoder.calls)


async def test_new_prompts_of_adjacent_rows_are_prefilled_together_within_the_budget(running):
    decoder = FakeDecoder(rows=4, max_capacity=64)
    decoder.ragged = True
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], list(range(20, 32))]
    sequences = await submitted_at_one_step(decoder, running(decoder, prefill_chunk=16),
                                            [(prompt, params(4)) for prompt in prompts])
    results = [tokens_of(await collect(sequence)) for sequence in sequences]
    assert results == [greedy_reference(decoder, prompt, 4) for prompt in prompts]
    assert [sequence.slot for sequence in sequences] == [0, 1, 2, 3]
    # Rows 0-2 fit the budget together, right-padded to the longest (3 x 5 <= 16); row 3 would not (4 x 12 > 16):
    # it takes the one token the padded call left of the budget on its own, and the rest first at the next step.
    assert decoder.calls[1:3] == [
        Call(0, [[3, 1, 4, 0, 0], [1, 5, 9, 2, 6], [5, 3, 0, 0, 0]], [2, 4, 1], query_seqlens=[3, 5, 2]),
        Call(3, [prompts[3][:1]], [0]),
    ]
    assert decoder.calls[4] == Call(3, [prompts[3][1:]], [11])  # after the decode step of rows 0-2
    assert all(len(c.input_ids) * len(c.input_ids[0]) <= 16 for c in decoder.calls)


async def test_a_decoder_without_ragged_calls_prefills_each_row_alone(running):
    decoder = FakeDecoder(rows=3, max_capacity=64)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    sequences = await submitted_at_one_step(decoder, running(decoder, prefill_chunk=16),
                                            [(prompt, params(3)) for prompt in prompts])
    assert [tokens_of(await collect(s)) for s in sequences] == [greedy_reference(decoder, p, 3) for p in prompts]
    assert decoder.calls[1:3] == [Call(0, [prompts[0]], [2]), Call(1, [prompts[1]], [4])]


async def test_a_cancelled_sequence_frees_its_row_at_the_next_step(running):
    decoder = FakeDecoder(rows=1, max_capacity=64)
    decoder.pause(after_calls=5)  # the prefill and four decode steps
    generator = running(decoder)
    endless = generator.submit([1, 2], params(0))
    await decoder.wait_paused()
    waiting = generator.submit([9], params(2))
    generator.cancel(endless)
    decoder.resume()
    events = await collect(endless)
    assert events[-1] == TokenEvent(None, finish_reason="cancelled")
    assert tokens_of(events) == greedy_reference(decoder, [1, 2], 6)  # the held step still gave its token
    assert tokens_of(await collect(waiting)) == greedy_reference(decoder, [9], 2)
    assert decoder.calls[6] == Call(0, [[9]], [0])  # the next step: the row is free and the waiting one gets it


async def test_deadlines_end_waiting_and_running_sequences_with_a_timeout(running):
    clock = ManualClock(100.0)
    decoder = FakeDecoder(rows=1, max_capacity=64)
    decoder.pause(after_calls=3)
    generator = running(decoder, clock=clock)
    first = generator.submit([1], params(0), deadline=clock.now + 5)
    await decoder.wait_paused()
    queued = generator.submit([2, 3], params(4), deadline=clock.now + 1)
    clock.advance(10)  # past both deadlines
    decoder.resume()
    first_events, queued_events = await collect(first), await collect(queued)
    assert first_events[-1] == TokenEvent(None, finish_reason="timeout")
    assert len(tokens_of(first_events)) == 4 and len(decoder.calls) == 4  # nothing ran after the held step
    assert queued_events == [TokenEvent(None, finish_reason="timeout")]
    assert not any(call.input_ids == [[2, 3]] for call in decoder.calls)  # never prefilled


async def test_the_waiting_bound_turns_new_sequences_away_with_a_retry_time(running):
    decoder = FakeDecoder(rows=1, max_capacity=64)
    decoder.pause()
    generator = running(decoder, max_waiting=2)
    hold = generator.submit([1], params(1))
    await decoder.wait_paused()
    waiting = [generator.submit([2], params(1)), generator.submit([3], params(1))]
    with pytest.raises(QueueFull, match="2 sequences waiting") as refused:
        generator.submit([4], params(1))
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
    assert generator.stats()["waiting"] == 2
    decoder.resume()
    for sequence in [hold, *waiting]:
        assert (await collect(sequence))[-1].finish_reason == "length"


async def test_seeded_sampling_gives_a_row_the_same_tokens_whatever_runs_beside_it(running):
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 20}
    prompt = [5, 6, 7]

    async def run_alone(seed: int) -> list[int]:
        generator = running(FakeDecoder(rows=4, max_capacity=64))
        return tokens_of(await collect(generator.submit(prompt, params(12, seed=seed, **sampled))))

    alone = await run_alone(1234)
    assert alone == await run_alone(1234)
    assert alone != await run_alone(99)
    generator = running(FakeDecoder(rows=4, max_capacity=64))
    crowd = [generator.submit([8 + i], params(12, seed=i, **sampled)) for i in range(3)]
    ours = generator.submit(prompt, params(12, seed=1234, **sampled))
    assert tokens_of(await collect(ours)) == alone
    for sequence in crowd:
        await collect(sequence)


async def test_the_cache_grows_before_each_write_and_shrinks_once_idle(running):
    decoder = FakeDecoder(rows=1, max_capacity=64, initial_capacity=4)
    decoder.pause(after_calls=19)  # the last decode step of 20 tokens
    generator = running(decoder)
    sequence = generator.submit(list(range(1, 11)), params(20))
    await decoder.wait_paused()
    assert decoder.capacity == 29  # asked for before the call: the fake fails a write past its capacity
    decoder.resume()
    assert tokens_of(await collect(sequence)) == greedy_reference(decoder, list(range(1, 11)), 20)
    for _ in range(200):  # the step thread shrinks the cache once it has nothing to run
        if decoder.capacity == decoder.initial_capacity:
            break
        await asyncio.sleep(0.01)
    assert decoder.capacity == decoder.initial_capacity


class ShapeSensitiveDecoder(FakeDecoder):
    """A :class:`FakeDecoder` that is not batch-invariant, like the real kernels: each call's logits also depend on
    its shape (rows and new tokens), so a row's tokens change with its neighbours and its prefill chunks."""

    def __init__(self, rows: int, max_capacity: int) -> None:
        super().__init__(rows, max_capacity)
        self._noise = np.random.default_rng(1).standard_normal((64, VOCAB)) * 3

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        rows, width = input_ids.shape
        return super().run(start_row, input_ids, seqlens_k) + self._noise[(rows * 13 + width * 7) % 64]


async def beside_others(generator: GenerationScheduler, prompt: list[int], sampling: SamplingParams,
                        reproducible: bool) -> list[int]:
    """``prompt``'s tokens when it joins three neighbours, one with a long prompt that shares the prefill budget."""
    neighbours = [generator.submit(list(range(1, 31)), params(20)), generator.submit([4, 5], params(20))]
    target = generator.submit(prompt, sampling, reproducible=reproducible)
    neighbours.append(generator.submit([9, 9, 9], params(20)))
    events = await collect(target)
    for sequence in neighbours:
        await collect(sequence)
    return tokens_of(events)


@pytest.mark.parametrize("sampling", [params(12), params(12, temperature=0.9, seed=3)], ids=["greedy", "seeded"])
async def test_a_reproducible_sequence_gets_its_lone_tokens_whatever_runs_beside_it(running, sampling):
    decoder = ShapeSensitiveDecoder(rows=4, max_capacity=64)
    generator = running(decoder, prefill_chunk=8)
    prompt = list(range(40, 60))  # 20 tokens: chunks of 8, 8 and 4 alone
    alone = tokens_of(await collect(generator.submit(prompt, sampling)))
    calls_before = len(decoder.calls)
    assert tokens_of(await collect(generator.submit(prompt, sampling, reproducible=True))) == alone
    assert await beside_others(generator, prompt, sampling, reproducible=True) == alone
    # Its prompt was prefilled in the chunks it gets alone, though a long neighbour shared the budget.
    chunks = [c.input_ids[0] for c in decoder.calls[calls_before:]
              if len(c.input_ids[0]) > 1 and c.input_ids[0][0] in prompt]
    assert chunks == [prompt[:8], prompt[8:16], prompt[16:]] * 2
    # The fake really is batch-variant: the same request in the normal mode gets other tokens beside others.
    assert await beside_others(generator, prompt, sampling, reproducible=False) != alone


async def test_reproducible_rows_decode_after_the_shared_call_and_keep_their_cache(running):
    """The shared call writes a placeholder into every row of its range; a reproducible row in that range must
    still read its own token at that position, so its own call comes after."""
    decoder = FakeDecoder(rows=3, max_capacity=64)
    decoder.pause()
    generator = running(decoder)
    hold = generator.submit([9], params(1))
    await decoder.wait_paused()  # the three below are admitted together, at the step after hold's prefill
    sequences = [generator.submit([3, 1], params(6)), generator.submit([5, 2], params(6), reproducible=True),
                 generator.submit([7, 3], params(6))]
    decoder.resume()
    await collect(hold)
    results = [tokens_of(await collect(s)) for s in sequences]
    assert [s.slot for s in sequences] == [0, 1, 2]
    assert results == [greedy_reference(decoder, p, 6) for p in ([3, 1], [5, 2], [7, 3])]
    decodes = [c for c in decoder.calls if len(c.input_ids[0]) == 1]
    assert any(c.start_row == 0 and len(c.input_ids) == 3 for c in decodes)  # rows 0 and 2 share a call
    assert any(c.start_row == 1 and len(c.input_ids) == 1 for c in decodes)  # row 1 runs alone, after it


class BucketDecoder(FakeDecoder):
    """A :class:`FakeDecoder` that, like a decoder replaying CUDA graphs, runs shared decode steps over rows
    ``[0, bucket)``; the fake still fails a write past capacity and keeps each row's tokens, so a row the scheduler
    adds with a wrong placeholder shows up in that row's tokens."""

    def decode_range(self, start: int, stop: int) -> tuple[int, int]:
        return 0, next(size for size in (1, 2, 4) if size >= stop)


async def test_shared_steps_run_in_the_decoders_bucket_and_the_rows_it_adds_keep_their_tokens(running):
    decoder = BucketDecoder(rows=4, max_capacity=64)
    decoder.pause()
    generator = running(decoder, prefill_chunk=4)
    hold = generator.submit([9], params(1))
    await decoder.wait_paused()
    prompts = [[3, 1], list(range(10, 22)), [7, 3], [5, 2]]  # row 1 still prefills while rows 0 and 2 decode
    sequences = [generator.submit(prompts[0], params(8)), generator.submit(prompts[1], params(3)),
                 generator.submit(prompts[2], params(8)), generator.submit(prompts[3], params(4), reproducible=True)]
    decoder.resume()
    await collect(hold)
    results = [tokens_of(await collect(s)) for s in sequences]
    assert results == [greedy_reference(decoder, p, n) for p, n in zip(prompts, (8, 3, 8, 4))]
    assert [s.slot for s in sequences] == [0, 1, 2, 3]
    decodes = [c for c in decoder.calls if len(c.input_ids[0]) == 1 and c.input_ids != [[9]]]
    shared = [c for c in decodes if c.start_row == 0]
    assert shared and all(len(c.input_ids) in (1, 2, 4) for c in shared)
    # Row 1, free once its 3 tokens are out, is written past the 14 tokens it keeps (12 + the 2 fed back).
    kept = len(prompts[1]) + 2
    assert any(len(c.input_ids) == 4 and c.seqlens_k[1] == kept for c in shared)
    assert decoder.cache[1][:kept] == prompts[1] + results[1][:2]
    assert [c for c in decodes if c.start_row == 3 and len(c.input_ids) == 1]  # the reproducible row alone


def greedy_until_eos(decoder: FakeDecoder, prompt: list[int], count: int) -> list[int]:
    """Plain greedy decoding (the end token allowed, and ending the sequence)."""
    tokens, out = list(prompt), []
    while len(out) < count and (not out or out[-1] != EOS):
        out.append(int(np.argmax(decoder.logits_after(tokens))))
        tokens.append(out[-1])
    return out


async def test_plain_greedy_steps_take_the_decoders_own_choices_and_the_others_its_logits(running):
    decoder = FakeDecoder(rows=3, max_capacity=64)
    decoder.computes_greedy = True
    generator = running(decoder)
    plain = SamplingParams(temperature=0, max_tokens=6)
    prompts = [[3, 1], [1, 11]]  # the second ends with the end token, at its sixth
    sequences = [generator.submit(p, plain) for p in prompts]
    events = [await collect(s) for s in sequences]
    assert [tokens_of(e) for e in events] == [greedy_until_eos(decoder, p, 6) for p in prompts]
    assert tokens_of(events[1])[-1] == EOS and events[1][-1].finish_reason == "stop"
    assert events[0][-1].finish_reason == "length"
    decodes = [c for c in decoder.calls if len(c.input_ids[0]) == 1]
    assert decodes and all(c.greedy for c in decodes)  # no step of plain greedy rows took the logits
    # A step with a row that bans the end token (or samples, or wants log-probabilities) needs the logits.
    calls, first = decoder.greedy_calls, len(decoder.calls)
    decoder.pause(after_calls=first)
    hold = generator.submit([9], params(1))
    await decoder.wait_paused()  # the two below share every decode step
    mixed = [generator.submit([3, 1], plain), generator.submit([5, 2], params(8))]
    decoder.resume()
    await collect(hold)
    assert tokens_of(await collect(mixed[0])) == greedy_until_eos(decoder, [3, 1], 6)
    assert tokens_of(await collect(mixed[1])) == greedy_reference(decoder, [5, 2], 8)
    assert decoder.greedy_calls == calls  # never while the ignore_eos row ran beside it
    assert not any(c.greedy for c in decoder.calls[first:])


def penalized_reference(decoder: FakeDecoder, prompt: list[int], count: int, frequency: float,
                        presence: float, repetition: float) -> list[int]:
    """Greedy decoding with the penalties applied by their definitions, without the scheduler."""
    tokens, out, counts = list(prompt), [], {}
    for _ in range(count):
        logits = decoder.logits_after(tokens).astype(np.float64)
        for token in set(prompt) | set(counts):
            if repetition != 1.0:
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token, seen in counts.items():
            logits[token] -= frequency * seen + presence
        logits[EOS] = -np.inf
        chosen = int(np.argmax(logits))
        counts[chosen] = counts.get(chosen, 0) + 1
        out.append(chosen)
        tokens.append(chosen)
    return out


async def test_the_scheduler_applies_the_penalties_as_defined(running):
    decoder = FakeDecoder(rows=2, max_capacity=64)
    generator = running(decoder)
    prompt = [3, 7, 11]
    plain = tokens_of(await collect(generator.submit(prompt, SamplingParams(temperature=0, ignore_eos=True,
                                                                              max_tokens=12))))
    for frequency, presence, repetition in ((1.5, 0.0, 1.0), (0.0, 2.0, 1.0), (0.0, 0.0, 3.0)):
        options = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, frequency_penalty=frequency,
                                 presence_penalty=presence, repetition_penalty=repetition)
        got = tokens_of(await collect(generator.submit(prompt, options)))
        assert got == penalized_reference(decoder, prompt, 12, frequency, presence, repetition)
        assert got != plain  # the fake's greedy output repeats tokens: every penalty changes it
    biased = SamplingParams(temperature=0, ignore_eos=True, max_tokens=5, logit_bias={42: 100.0})
    assert tokens_of(await collect(generator.submit(prompt, biased))) == [42] * 5
    sampled = SamplingParams(temperature=1.0, seed=3, ignore_eos=True, max_tokens=30, min_p=0.5)
    for token, logits in zip(tokens_of(await collect(generator.submit(prompt, sampled))), _row_logits(
            decoder, prompt, sampled)):
        probs = np.exp(logits - logits.max())
        assert probs[token] >= 0.5 * probs.max()  # nothing below min_p times the most likely was chosen


def _row_logits(decoder: FakeDecoder, prompt: list[int], params: SamplingParams):
    """The logits each step of ``params``' request saw (replayed from the fake's cache of that row)."""
    row = next(r for r in decoder.cache if r[: len(prompt)] == prompt and r[len(prompt)] != -1)
    length = len(prompt)
    while length < len(row) and row[length] != -1 and length < len(prompt) + params.max_tokens:
        logits = decoder.logits_after(row[:length])
        logits[EOS] = -np.inf
        yield logits / params.temperature
        length += 1


async def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing(running):
    decoder = FakeDecoder(rows=1, max_capacity=64)
    generator = running(decoder)
    prompt = [3, 7, 11]
    tiny = SamplingParams(temperature=5e-324, seed=1, ignore_eos=True, max_tokens=6)
    events = await collect(generator.submit(prompt, tiny))
    assert all(e.error is None for e in events) and events[-1].finish_reason == "length"
    assert tokens_of(events) == greedy_reference(decoder, prompt, 6)  # all mass on the top token


# -- groups: several samples of one prompt (OpenAI's n) --------------------------------------------------------


async def collect_group(group: list[Sequence]) -> dict[int, list[TokenEvent]]:
    """The events of a group's shared queue, by sequence index, until every sample has finished."""
    events: dict[int, list[TokenEvent]] = {s.index: [] for s in group}
    queue = group[0].events
    while any(not e or e[-1].finish_reason is None for e in events.values()):
        event = await asyncio.wait_for(queue.get(), 10)
        events[event.index].append(event)
    return events


async def test_a_group_is_prefilled_once_and_its_row_copied_to_every_sample(running):
    decoder = FakeDecoder(rows=4, max_capacity=64)
    generator = running(decoder, prefill_chunk=4)
    prompt = [3, 4, 5, 6, 7, 8]
    group = generator.submit_group(prompt, params(5), 3, first_index=10)
    events = await collect_group(group)
    assert sorted(events) == [10, 11, 12]
    for index, sample in events.items():  # greedy on the copied rows: each is what the prompt alone gives
        assert tokens_of(sample) == greedy_reference(decoder, prompt, 5), index
        assert sample[-1].finish_reason == "length"
    prefills = [c for c in decoder.calls if len(c.input_ids[0]) > 1 or c.input_ids[0][0] in prompt]
    assert [c.start_row for c in prefills] == [0, 0]  # two chunks of 4 and 2 tokens, in the first row only
    assert decoder.copies == [(0, [1, 2], 6)]


async def test_each_sample_of_a_seeded_group_draws_its_own_tokens_the_first_as_a_lone_request(running):
    sampled = {"temperature": 1.0, "seed": 7}
    prompt = [5, 6, 7]
    alone = tokens_of(await collect(running(FakeDecoder(rows=4, max_capacity=64)).submit(prompt, params(12, **sampled))))
    runs = []
    for _ in range(2):
        generator = running(FakeDecoder(rows=4, max_capacity=64))
        events = await collect_group(generator.submit_group(prompt, params(12, **sampled), 4))
        runs.append({index: tokens_of(sample) for index, sample in events.items()})
    assert runs[0] == runs[1]  # seeded: the same group again draws the same samples
    assert runs[0][0] == alone
    assert len({tuple(tokens) for tokens in runs[0].values()}) == 4  # and each sample its own


async def test_a_group_waits_until_all_its_slots_are_free_and_is_not_overtaken(running):
    decoder = FakeDecoder(rows=3, max_capacity=64)
    decoder.pause()
    generator = running(decoder)
    busy = generator.submit([1], params(4))
    await decoder.wait_paused()
    group = generator.submit_group([2, 3], params(2), 3)
    later = generator.submit([9], params(1))  # one row is free now, but the group came first
    decoder.resume()
    events = await collect_group(group)
    assert tokens_of(await collect(busy)) == greedy_reference(decoder, [1], 4)
    assert all(tokens_of(sample) == greedy_reference(decoder, [2, 3], 2) for sample in events.values())
    await collect(later)
    group_prefill = decoder.calls.index(Call(0, [[2, 3]], [1]))  # row 0 again: admitted once "busy" gave it back
    assert group_prefill == 4  # after busy's prefill and its three decode steps
    assert decoder.calls.index(next(c for c in decoder.calls if c.input_ids == [[9]])) > group_prefill


async def test_a_group_larger_than_the_slots_is_refused(running):
    generator = running(FakeDecoder(rows=2, max_capacity=64))
    with pytest.raises(ValueError, match="3 samples does not fit 2 slots"):
        generator.submit_group([1], params(1), 3)


async def test_when_a_groups_prefill_ends_early_its_other_samples_end_with_it(running):
    decoder = FakeDecoder(rows=3, max_capacity=64)
    decoder.pause(after_calls=1)  # inside the second prefill chunk
    generator = running(decoder, prefill_chunk=2)
    group = generator.submit_group([1, 2, 3, 4, 5], params(3), 3)
    await decoder.wait_paused()
    generator.cancel(group[0])
    decoder.resume()
    events = await collect_group(group)
    assert {index: [e.finish_reason for e in sample] for index, sample in events.items()} == {
        0: ["cancelled"], 1: ["cancelled"], 2: ["cancelled"]}
    assert decoder.copies == []
    assert generator.stats()["running"] == 0


async def test_a_waiting_group_past_its_deadline_times_out_as_a_whole(running):
    clock = ManualClock(100.0)
    decoder = FakeDecoder(rows=2, max_capacity=64)
    decoder.pause()
    generator = running(decoder, clock=clock)
    hold = generator.submit([1], params(1))
    await decoder.wait_paused()
    group = generator.submit_group([2], params(1), 2, deadline=clock.now + 1)
    clock.advance(5)
    decoder.resume()
    await collect(hold)
    events = await collect_group(group)
    assert events == {0: [TokenEvent(None, finish_reason="timeout")], 1: [TokenEvent(None, finish_reason="timeout",
                                                                                     index=1)]}


async def test_a_new_prompt_starts_from_what_its_free_row_kept_of_the_last_sequence(running):
    decoder = FakeDecoder(rows=2, max_capacity=64, initial_capacity=64)  # no shrinking while idle
    generator = running(decoder)
    first_prompt = list(range(1, 21))
    first = tokens_of(await collect(generator.submit(first_prompt, params(5))))
    # A next turn: the first prompt, 4 of its answer's tokens (the 5th was never fed back), then new ones.
    prompt = first_prompt + first[:4] + [30, 31]
    calls = len(decoder.calls)
    second = generator.submit(prompt, params(6))
    assert tokens_of(await collect(second)) == greedy_reference(decoder, prompt, 6)
    assert second.slot == 0 and second.cached_tokens == 24
    assert decoder.calls[calls].input_ids == [[30, 31]]  # only what the row did not hold was prefilled


async def test_prompts_submitted_together_compute_their_shared_beginning_once(running):
    decoder = FakeDecoder(rows=4, max_capacity=64)
    prompt = list(range(1, 25))
    other = prompt[:16] + [40, 41, 42]
    sequences = await submitted_at_one_step(decoder, running(decoder, prefill_chunk=8),
                                            [(prompt, params(4)), (prompt, params(4)), (other, params(4))])
    results = [tokens_of(await collect(s)) for s in sequences]
    assert results == [greedy_reference(decoder, p, 4) for p in (prompt, prompt, other)]
    assert [s.cached_tokens for s in sequences] == [0, 22, 16]
    assert decoder.copies and all(source == 0 for source, _, _ in decoder.copies)
    prefilled = sum(len(ids[0]) for c in decoder.calls if c.start_row in (1, 2) for ids in [c.input_ids]
                    if len(c.input_ids) == 1 and len(ids[0]) > 1)
    assert prefilled <= 2 + 3  # row 1 computed its last two prompt tokens, row 2 the 3 after the shared 16


async def test_a_reproducible_sequence_never_takes_a_prefix(running):
    decoder = FakeDecoder(rows=2, max_capacity=64)
    generator = running(decoder)
    prompt = list(range(1, 21))
    await collect(generator.submit(prompt, params(3)))
    again = generator.submit(prompt, params(3), reproducible=True)
    assert tokens_of(await collect(again)) == greedy_reference(decoder, prompt, 3)
    assert again.cached_tokens == 0 and not decoder.copies


async def test_after_shrinking_a_free_row_offers_only_the_positions_it_kept(running):
    decoder = FakeDecoder(rows=1, max_capacity=64, initial_capacity=16)
    generator = running(decoder)
    prompt = list(range(1, 31))
    await collect(generator.submit(prompt, params(3)))
    for _ in range(200):  # the step thread shrinks the cache once it has nothing to run
        if decoder.capacity == decoder.initial_capacity:
            break
        await asyncio.sleep(0.01)
    assert decoder.capacity == 16
    again = generator.submit(prompt, params(3))
    assert tokens_of(await collect(again)) == greedy_reference(decoder, prompt, 3)  # wrong if it trusted position 16+
    assert again.cached_tokens == 16


async def test_with_the_prompt_cache_off_every_prompt_is_computed_whole(running):
    decoder = FakeDecoder(rows=2, max_capacity=64)
    generator = running(decoder, prompt_cache=False)
    prompt = list(range(1, 21))
    await collect(generator.submit(prompt, params(3)))
    again = generator.submit(prompt, params(3))
    assert tokens_of(await collect(again)) == greedy_reference(decoder, prompt, 3)
    assert again.cached_tokens == 0 and not decoder.copies

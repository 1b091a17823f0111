"""The response cache's batching: lookups gathered into shared reads, answers gathered into shared commits.

Real LMDB files throughout; the reads and commits are counted by wrapping the store's methods.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from appliance.cache.batched_reads import BatchedReads
from appliance.cache.service import HIT, MISS, ResponseCacheService
from appliance.cache.store import CacheEntry, ResponseCache
from appliance.config import CacheConfig
from appliance.telemetry import Metrics
from waiting import ManualClock

MiB = 1024 * 1024


class GatedReads:
    """A ``read_many`` that records each call's keys and, while ``gate`` is clear, blocks its thread."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.fail = False

    def __call__(self, keys: list[bytes]) -> list[str]:
        self.calls.append(list(keys))
        self.started.release()
        self.gate.wait(10)
        if self.fail:
            raise OSError("the disk went away")
        return [key.decode().upper() for key in keys]


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


async def until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_lookups_made_together_share_one_read_each_key_once(executor):
    reads = GatedReads()
    batched = BatchedReads(executor, reads)
    found = await asyncio.gather(*(batched.get(key) for key in (b"a", b"b", b"a", b"c", b"b")))
    assert found == ["A", "B", "A", "C", "B"]
    assert reads.calls == [[b"a", b"b", b"c"]]
    assert await batched.get(b"d") == "D" and reads.calls[-1] == [b"d"]  # a lone lookup: a read of its own


async def test_lookups_made_while_the_reads_run_go_together_in_the_next(executor):
    reads = GatedReads()
    reads.gate.clear()
    batched = BatchedReads(executor, reads, max_in_flight=1)
    first = asyncio.ensure_future(batched.get(b"x"))
    await until(lambda: reads.calls, "the first read")
    later = [asyncio.ensure_future(batched.get(key)) for key in (b"p", b"q", b"r")]
    await asyncio.sleep(0.05)
    assert reads.calls == [[b"x"]]  # the slot is taken: they wait
    reads.gate.set()
    assert await first == "X" and await asyncio.gather(*later) == ["P", "Q", "R"]
    assert reads.calls == [[b"x"], [b"p", b"q", b"r"]]


async def test_a_failed_read_fails_its_lookups_only_and_a_cancelled_caller_leaves_the_others(executor):
    reads = GatedReads()
    reads.fail = True
    batched = BatchedReads(executor, reads)
    with pytest.raises(OSError, match="the disk went away"):
        await batched.get(b"a")
    reads.fail = False
    assert await batched.get(b"a") == "A"

    reads.gate.clear()
    impatient, patient = asyncio.ensure_future(batched.get(b"k")), asyncio.ensure_future(batched.get(b"k"))
    await until(lambda: len(reads.calls) == 3, "the shared read")
    impatient.cancel()
    reads.gate.set()
    assert await patient == "K"
    with pytest.raises(asyncio.CancelledError):
        await impatient


def test_get_many_reads_in_order_in_one_transaction(tmp_path):
    clock = ManualClock(1_000_000.0)
    store = ResponseCache(tmp_path / "c", MiB, 60.0, clock=clock)
    assert store.open()
    store.put(b"old", CacheEntry("m", "s", b"expires first"), ttl_s=10)
    store.put(b"new", CacheEntry("m", "s", b"lives"))
    clock.advance(10)
    found = store.get_many([b"new", b"none", b"old", b"new"])
    assert [entry.payload if entry else None for entry in found] == [b"lives", None, None, b"lives"]
    store.close()
    assert store.get_many([b"new"]) == [None]


def test_put_many_is_one_commit_and_a_later_answer_under_a_key_replaces_an_earlier(tmp_path):
    store = ResponseCache(tmp_path / "c", 1000, 60.0, clock=ManualClock(1_000_000.0))
    assert store.open()
    before = store._opened.env.info()["last_txnid"]
    results = store.put_many([(b"a", CacheEntry("m", "s", b"1" * 100)), (b"b", CacheEntry("m", "s", b"2" * 100)),
                              (b"a", CacheEntry("m", "s", b"3" * 50)), (b"big", CacheEntry("m", "s", b"x" * 300))])
    assert store._opened.env.info()["last_txnid"] == before + 1
    assert [r.stored for r in results] == [True, True, True, False]  # over a quarter of the budget: never stored
    assert store.get(b"a").payload == b"3" * 50 and store.get(b"b").payload == b"2" * 100
    assert store.stats()["entries"] == 2 and store.stats()["bytes"] == 150
    results = store.put_many([(bytes([k]), CacheEntry("m", "s", b"f" * 200)) for k in range(5)])
    evicted = [size for result in results for _, _, size in result.evicted]
    assert all(r.stored for r in results) and store.stats()["bytes"] <= 1000 and sum(evicted) >= 150
    store.close()


class CountingStore:
    """Wraps a service's store to count commits and, while ``gate`` is clear, hold the writer thread."""

    def __init__(self, service: ResponseCacheService) -> None:
        self.commits: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        store = service.store
        put_many = store.put_many

        def counted(items, ttl_s=None):
            self.gate.wait(10)
            self.commits.append(len(items))
            return put_many(items, ttl_s)

        store.put_many = counted  # type: ignore[method-assign]


async def miss(service: ResponseCacheService, canonical: list[int], scope: str = "tenant:t"):
    decision = await service.lookup(scope, "add_one", 1, "build", lambda: canonical, None, True)
    assert decision.status == MISS
    return decision


async def test_answers_queued_behind_a_commit_go_in_the_next_and_hit_meanwhile(tmp_path):
    metrics = Metrics()
    service = ResponseCacheService(CacheConfig(enabled=True), tmp_path / "cache", metrics)
    await service.open()
    counting = CountingStore(service)
    counting.gate.clear()
    first = await miss(service, [0])
    service.remember(first, "add_one", 1, "build", b"answer 0")
    decisions = [await miss(service, [i]) for i in range(1, 6)]
    for i, decision in enumerate(decisions, 1):
        service.remember(decision, "add_one", 1, "build", f"answer {i}".encode())
    again = await service.lookup("tenant:t", "add_one", 1, "build", lambda: [3], None, True)
    assert again.status == HIT and again.payload == b"answer 3"  # queued, not yet written: still a hit
    counting.gate.set()
    await service.close()
    assert counting.commits == [1, 5]
    stored = metrics.registry.get_sample_value("appliance_cache_stored_bytes_total",
                                               {"model": "add_one", "scope": first.scope_label})
    assert stored == sum(len(f"answer {i}") for i in range(6))

    reopened = ResponseCacheService(CacheConfig(enabled=True), tmp_path / "cache", Metrics())
    await reopened.open()
    for i in range(6):
        decision = await reopened.lookup("tenant:t", "add_one", 1, "build", lambda i=i: [i], None, True)
        assert decision.status == HIT and decision.payload == f"answer {i}".encode()
    await reopened.close()


async def test_a_purge_drops_the_queued_answers_it_covers_and_keeps_the_others(tmp_path):
    service = ResponseCacheService(CacheConfig(enabled=True), tmp_path / "cache", Metrics())
    await service.open()
    counting = CountingStore(service)
    counting.gate.clear()
    in_flight = await miss(service, [0], "tenant:a")
    service.remember(in_flight, "add_one", 1, "build", b"a, handed over")
    queued_a, queued_b = await miss(service, [1], "tenant:a"), await miss(service, [1], "tenant:b")
    service.remember(queued_a, "add_one", 1, "build", b"a, queued")
    service.remember(queued_b, "add_one", 1, "build", b"b, queued")
    purge = asyncio.ensure_future(service.purge("tenant:a", None))
    await asyncio.sleep(0.05)
    counting.gate.set()
    assert await purge == 1  # the answer handed over landed first and went with the purge
    await service.close()
    reopened = ResponseCacheService(CacheConfig(enabled=True), tmp_path / "cache", Metrics())
    await reopened.open()
    statuses = [(await reopened.lookup(scope, "add_one", 1, "build", lambda c=c: c, None, True)).status
                for scope, c in (("tenant:a", [0]), ("tenant:a", [1]), ("tenant:b", [1]))]
    assert statuses == [MISS, MISS, HIT]
    await reopened.close()

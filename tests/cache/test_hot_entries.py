"""The response cache's answers held in each worker's memory: hits without a read, and purges that reach every worker.

Real LMDB files and real processes for the purge counter; reads are counted by wrapping the service's batched
reader.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

from appliance.cache.hot_entries import HotEntries
from appliance.cache.purge_epoch import PurgeEpoch
from appliance.cache.service import BYPASS, HIT, MISS, PURGE_EPOCH, ResponseCacheService
from appliance.config import CacheConfig
from appliance.telemetry import Metrics
from waiting import ManualClock

MODEL = ("add_one", 1, "build")


def test_entries_go_least_recently_used_first_and_expire_with_their_entry():
    clock = ManualClock(1000.0)
    hot = HotEntries(100, clock)
    for index in range(8):  # 8 x 12 bytes: within the budget
        hot.put(bytes([index]), bytes([index]) * 12, expires=1100.0)
    assert hot.get(bytes([0])) == bytes([0]) * 12 and hot.bytes == 96  # 0 is now the most recently used
    hot.put(b"new", b"n" * 12, expires=1100.0)
    assert hot.get(bytes([1])) is None and hot.get(bytes([0])) is not None and hot.bytes == 96  # 1 went, not 0
    hot.put(bytes([0]), b"x" * 2, expires=1100.0)  # a new answer under a key replaces the old one
    assert hot.get(bytes([0])) == b"xx" and hot.bytes == 86 and len(hot) == 8
    hot.put(b"big", b"b" * 13, expires=1100.0)  # over an eighth of the budget: not held
    assert hot.get(b"big") is None and len(hot) == 8
    hot.put(b"soon", b"s" * 4, expires=1005.0)
    clock.advance(4.9)
    assert hot.get(b"soon") == b"s" * 4
    clock.advance(0.1)
    assert hot.get(b"soon") is None and hot.bytes == 86  # expired: gone
    hot.clear()
    assert len(hot) == 0 and hot.bytes == 0
    nothing = HotEntries(0, clock)
    nothing.put(b"a", b"", expires=1100.0)
    assert nothing.get(b"a") is None and len(nothing) == 0  # a budget of 0 holds nothing, even an empty answer


def _advance_in_another_process(path, times: int) -> None:
    epoch = PurgeEpoch(path)
    epoch.open()
    for _ in range(times):
        epoch.advance()
    epoch.close()


def test_the_purge_counter_is_shared_by_processes_and_advances_under_its_lock(tmp_path):
    path = tmp_path / "cache" / PURGE_EPOCH
    epoch = PurgeEpoch(path)
    assert epoch.current() == 0  # not yet open
    epoch.open()
    assert epoch.current() == 0 and path.stat().st_size == 8 and oct(path.stat().st_mode & 0o777) == "0o600"
    context = multiprocessing.get_context("spawn")
    racers = [context.Process(target=_advance_in_another_process, args=(path, 50)) for _ in range(3)]
    for racer in racers:
        racer.start()
    for _ in range(50):
        epoch.advance()
    for racer in racers:
        racer.join(60)
        assert racer.exitcode == 0
    assert epoch.current() == 200  # every increment of every process counted: none lost to a race
    epoch.close()
    again = PurgeEpoch(path)
    again.open()
    assert again.current() == 200  # kept in the file
    again.close()


class CountedReads:
    """Wraps a service's batched reader: counts the keys read from LMDB and, while ``gate`` is clear, holds each
    read after it has read (its answer is what LMDB held when the read ran)."""

    def __init__(self, service: ResponseCacheService) -> None:
        self.keys: list[bytes] = []
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Semaphore(0)
        read_many = service._reads._read_many

        def counted(keys):
            found = read_many(keys)
            self.keys += keys
            self.waiting.release()
            self.gate.wait(10)
            return found

        service._reads._read_many = counted


async def opened(path, clock=None, **settings) -> ResponseCacheService:
    extra = {"clock": clock} if clock is not None else {}
    service = ResponseCacheService(CacheConfig(enabled=True, **settings), path, Metrics(), **extra)
    await service.open()
    return service


async def look(service: ResponseCacheService, canonical: object, scope: str = "tenant:t"):
    return await service.lookup(scope, *MODEL, lambda: canonical, None, True)


async def stored(service: ResponseCacheService, canonical: object, payload: bytes, scope: str = "tenant:t") -> None:
    decision = await look(service, canonical, scope)
    assert decision.status == MISS
    service.remember(decision, *MODEL, payload)
    while service._writing is not None:
        await service._writing


def _worker(path, connection, start_time: float | None) -> None:
    """Another worker process on the same cache folder (LMDB opens a folder once per process), doing what the test
    asks over ``connection``."""
    async def main() -> None:
        clock = ManualClock(start_time) if start_time is not None else None
        service = await opened(path, clock)
        reads = CountedReads(service)
        while (command := await asyncio.to_thread(connection.recv))[0] != "close":
            name, *args = command
            if name == "look":
                decision = await look(service, *args)
                connection.send((decision.status, decision.payload))
            elif name == "store":
                connection.send(await stored(service, *args))
            elif name == "purge":
                connection.send(await service.purge(*args))
            elif name == "reads":
                connection.send(len(reads.keys))
            elif name == "advance":
                connection.send(clock.advance(*args))
        await service.close()
        connection.send("closed")

    asyncio.run(main())


class OtherWorker:
    """A worker process running :func:`_worker`; :meth:`ask` sends it a command and waits for its answer."""

    def __init__(self, path, start_time: float | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_worker, args=(path, theirs, start_time))
        self._process.start()

    async def ask(self, *command):
        def exchange():
            self._connection.send(command)
            if not self._connection.poll(60):
                raise AssertionError(f"the other worker did not answer {command}")
            return self._connection.recv()

        return await asyncio.to_thread(exchange)

    async def close(self) -> None:
        assert await self.ask("close") == "closed"
        await asyncio.to_thread(self._process.join, 60)
        assert self._process.exitcode == 0


async def test_a_repeat_is_answered_from_memory_without_a_read_and_each_scope_keeps_its_own(tmp_path):
    writer = await opened(tmp_path / "cache")
    await stored(writer, [1], b"answer for t")
    reads = CountedReads(writer)
    held = await look(writer, [1])
    assert held.payload == b"answer for t" and not reads.keys  # what it stored, it holds
    counted = {"model": "add_one", "scope": held.scope_label}
    registry = writer._metrics.registry
    assert registry.get_sample_value("appliance_cache_memory_hits_total", counted) == 1
    assert registry.get_sample_value("appliance_cache_lookups_total", {**counted, "result": HIT}) == 1
    assert registry.get_sample_value("appliance_cache_served_bytes_total", counted) == len(b"answer for t")
    reader = OtherWorker(tmp_path / "cache")
    for _ in range(5):
        assert await reader.ask("look", [1]) == (HIT, b"answer for t")
    assert await reader.ask("reads") == 1  # the first from LMDB, the other four from memory
    assert await reader.ask("look", [1], "tenant:other") == (MISS, None)  # another scope: another key
    assert await reader.ask("reads") == 2
    await reader.close()
    await writer.close()


async def test_without_memory_every_hit_is_read(tmp_path):
    service = await opened(tmp_path / "cache", memory_bytes=0)
    await stored(service, [1], b"answer")
    reads = CountedReads(service)
    assert [(await look(service, [1])).status for _ in range(3)] == [HIT] * 3
    assert len(reads.keys) == 3
    assert service._metrics.registry.get_sample_value("appliance_cache_memory_hits_total",
                                                      {"model": "add_one", "scope": service._label("tenant:t")}) is None
    assert not (tmp_path / "cache" / PURGE_EPOCH).exists()
    await service.close()


async def test_an_answer_held_in_memory_expires_when_its_entry_does(tmp_path):
    clock = ManualClock(1_000_000.0)
    service = await opened(tmp_path / "cache", clock, ttl_s=60)
    await stored(service, [1], b"answer")
    other = OtherWorker(tmp_path / "cache", clock.now)  # the time to live is the entry's, written by the first
    assert (await other.ask("look", [1]))[0] == HIT  # now held by both
    clock.advance(59)
    await other.ask("advance", 59)
    assert (await look(service, [1])).status == HIT and (await other.ask("look", [1]))[0] == HIT
    clock.advance(1)
    await other.ask("advance", 1)
    assert (await look(service, [1])).status == MISS and (await other.ask("look", [1]))[0] == MISS
    assert await other.ask("reads") == 2  # the first look, and the one after the memory's own expiry
    await other.close()
    await service.close()


async def test_a_purge_in_one_worker_empties_what_every_worker_holds(tmp_path):
    first = await opened(tmp_path / "cache")
    await stored(first, [1], b"t's answer")
    await stored(first, [2], b"u's answer", "tenant:u")
    second = OtherWorker(tmp_path / "cache")
    assert await second.ask("look", [1]) == (HIT, b"t's answer")
    assert await second.ask("look", [2], "tenant:u") == (HIT, b"u's answer")
    assert (await look(first, [1])).status == HIT and (await look(first, [2], "tenant:u")).status == HIT
    assert first.memory_stats()["entries"] == 2
    assert await second.ask("purge", "tenant:t", None) == 1
    assert first.memory_stats() == {"entries": 0, "bytes": 0, "max_bytes": 64 * 2**20}  # emptied when asked
    assert (await look(first, [1])).status == MISS  # gone from LMDB and from the memory of the worker that stored it
    assert await second.ask("look", [1]) == (MISS, None)  # and from the purging worker's
    assert (await look(first, [2], "tenant:u")).payload == b"u's answer"  # another scope: read again, still there
    await second.close()
    await first.close()


async def test_an_answer_read_while_a_purge_ran_is_served_but_not_held(tmp_path):
    service = await opened(tmp_path / "cache")
    other = OtherWorker(tmp_path / "cache")
    await other.ask("store", [1], b"answer")
    reads = CountedReads(service)
    reads.gate.clear()
    in_flight = asyncio.ensure_future(look(service, [1]))
    assert await asyncio.to_thread(reads.waiting.acquire, True, 10)  # read from LMDB before the purge, held back
    assert await other.ask("purge", None, None) == 1
    meanwhile = asyncio.ensure_future(look(service, [2]))  # a lookup that sees the purge while that read is out
    await asyncio.sleep(0.05)
    reads.gate.set()
    assert (await in_flight).status == HIT and (await meanwhile).status == MISS
    assert (await look(service, [1])).status == MISS  # what the purge removed was not kept in memory
    await other.close()
    await service.close()


async def test_a_purge_counter_that_cannot_be_opened_leaves_the_cache_on_without_memory(tmp_path, caplog):
    (tmp_path / "cache").mkdir(mode=0o700)
    (tmp_path / "cache" / PURGE_EPOCH).mkdir()  # no file can be mapped there
    metrics = Metrics()
    service = ResponseCacheService(CacheConfig(enabled=True), tmp_path / "cache", metrics)
    await service.open()
    assert service.enabled and "keeps no answers in memory" in caplog.text
    assert metrics.registry.get_sample_value("appliance_cache_errors_total", {"operation": "open"}) == 1
    await stored(service, [1], b"answer")
    reads = CountedReads(service)
    assert [(await look(service, [1])).status for _ in range(2)] == [HIT, HIT] and len(reads.keys) == 2
    assert await service.purge(None, None) == 1 and (await look(service, [1])).status == MISS
    await service.close()


async def test_no_cache_refreshes_and_no_store_bypasses_the_memory_too(tmp_path):
    service = await opened(tmp_path / "cache")
    await stored(service, [1], b"old answer")
    refresh = await service.lookup("tenant:t", *MODEL, lambda: [1], "no-cache", True)
    assert refresh.status == BYPASS and refresh.store
    service.remember(refresh, *MODEL, b"new answer")
    assert (await look(service, [1])).payload == b"new answer"
    skip = await service.lookup("tenant:t", *MODEL, lambda: [1], "no-store", True)
    assert skip.status == BYPASS and not skip.store
    await service.close()

"""The response cache as the request path sees it: scoped keys, Cache-Control, metrics, LMDB off the event loop.

A lookup names the caller's cache scope (from its principal), the model version that would serve, and the
canonical request: every parameter that changes the output and none that does not. Only deterministic requests
take part; the others, and requests that say ``Cache-Control: no-store``, are a ``bypass``. ``no-cache`` skips
the lookup but stores the fresh answer. Failures of the store are logged and counted, and answered as misses.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from appliance.cache.batched_reads import BatchedReads
from appliance.cache.hot_entries import HotEntries
from appliance.cache.keys import cache_key, load_label_key, scope_hash
from appliance.cache.purge_epoch import PurgeEpoch
from appliance.cache.store import CacheEntry, PutResult, ResponseCache
from appliance.config import CacheConfig
from appliance.telemetry import Metrics

log = logging.getLogger("appliance.cache")

HIT, MISS, BYPASS = "hit", "miss", "bypass"
MAX_PENDING_WRITES = 256  # answers waiting for the writer; beyond this, new ones are not stored
MAX_REMEMBERED_LABELS = 4096  # scopes whose labels are kept (one a key or tenant); past it, the memo starts over


@dataclass(slots=True)
class CacheDecision:
    """The outcome of a lookup, and what is needed to store the answer afterwards."""

    status: str  # hit, miss or bypass
    scope: str | None = None
    canonical: object = None
    payload: bytes | None = None  # the stored answer on a hit
    store: bool = False  # whether the fresh answer should be written
    scope_label: str = ""
    key: bytes = b""  # the entry's key, made for ``keyed_for`` (model, version, build hash)
    keyed_for: tuple[str, int, str] | None = None


def cache_control(header: str | None) -> tuple[bool, bool]:
    """``(read, write)`` permitted by a request's Cache-Control header."""
    if not header:
        return True, True
    directives = {part.strip().lower().replace(" ", "") for part in header.split(",")}
    if "no-store" in directives:
        return False, False
    if "no-cache" in directives or "max-age=0" in directives:
        return False, True
    return True, True


LABEL_KEY = "scope-label.key"  # in the store's folder, beside the LMDB files
PURGE_EPOCH = "purge.epoch"  # beside them too: the counter every purge advances (appliance.cache.purge_epoch)


class ResponseCacheService:
    """Async front of :class:`ResponseCache` for the data plane; one per server process."""

    def __init__(self, config: CacheConfig, path: Path, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock`` is the store's: unix time, by which entries expire after ``config.ttl_s``."""
        self.config = config
        self.store = ResponseCache(path, config.max_bytes, config.ttl_s, sync=config.sync, clock=clock)
        self._clock = clock
        # Recent answers in this process's memory: a repeat of one is a hit without a hand-off to a thread. Empty
        # until open() has mapped the purge counter that keeps it coherent with the other workers' purges.
        self._hot = HotEntries(0, clock)
        self._epoch = PurgeEpoch(Path(path) / PURGE_EPOCH)
        self._seen_epoch = 0
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cache")
        self._reads: BatchedReads[CacheEntry | None] = BatchedReads(self._executor, self.store.get_many)
        # Writes take LMDB's one write lock (and an fsync) each: one thread for them, so lookups never queue behind.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._queued: dict[bytes, CacheEntry] = {}  # answers waiting for the write in flight to end, by key
        self._writing: asyncio.Future | None = None  # the one write in flight: each is a commit (and an fsync)
        # Answers handed to the writer but not yet committed: a repeat that arrives meanwhile is still a hit.
        self._pending: dict[bytes, bytes] = {}
        self._lookup_children: dict[tuple[str, str, str], object] = {}
        self._children: dict[tuple[Any, str, str], Any] = {}  # metric children by (counter, model, scope label)
        # Scope labels are keyed by the install's secret (read at open); until then, or with the cache off, a
        # per-process key: nothing is stored under those labels.
        self._label_key = secrets.token_bytes(32)
        self._labels: dict[str, str] = {}  # scope -> its label under _label_key, made once (an HMAC)

    @property
    def enabled(self) -> bool:
        """Whether lookups can hit: the cache is on and its store opened."""
        return self.config.enabled and self.store.healthy

    async def open(self) -> None:
        """Open (or create) the LMDB store in a worker thread; a store that cannot open leaves the cache off."""
        if not self.config.enabled:
            return
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(self._executor, self.store.open):
            self._metrics.cache_errors.labels("open").inc()
            log.error("the response cache at %s is off until it can be opened; requests are served uncached",
                      self.store.path)
            return
        try:
            self._label_key = await loop.run_in_executor(self._executor, load_label_key, self.store.path / LABEL_KEY)
        except (OSError, ValueError) as exc:
            self._metrics.cache_errors.labels("open").inc()
            log.error("the response cache at %s is off: its scope-label key cannot be read or made (%s); requests "
                      "are served uncached", self.store.path, exc)
            await loop.run_in_executor(self._executor, self.store.close)
            return
        self._labels.clear()
        if self.config.memory_bytes:
            try:
                await loop.run_in_executor(self._executor, self._epoch.open)
            except (OSError, ValueError) as exc:
                self._metrics.cache_errors.labels("open").inc()
                log.error("the response cache at %s keeps no answers in memory: its purge counter %s cannot be "
                          "opened (%s); every hit is read from LMDB", self.store.path, self._epoch.path, exc)
            else:
                self._seen_epoch = self._epoch.current()
                self._hot.max_bytes = self.config.memory_bytes
        await self._refresh_gauges()

    async def lookup(self, scope: str | None, model: str, version: int, build_hash: str,
                     canonical: Callable[[], object], header: str | None, deterministic: bool) -> CacheDecision:
        """Look the request up under ``scope``; a non-deterministic request or a ``None`` scope bypasses.

        ``canonical`` makes the canonical request only when it is needed.
        """
        read, write = cache_control(header)
        if not (deterministic and scope is not None and self.config.enabled and (read or write)):
            self._count(model, "", BYPASS)
            return CacheDecision(BYPASS)
        label = self._label(scope)
        if not self.store.healthy:  # a store that could not open degrades to misses (the error is logged)
            self._count(model, label, MISS)
            return CacheDecision(MISS)
        decision = CacheDecision(MISS, scope, canonical(), store=write, scope_label=label)
        decision.key = cache_key(scope, model, version, build_hash, decision.canonical)
        decision.keyed_for = (model, version, build_hash)
        if not read:
            decision.status = BYPASS
        else:
            payload = self._held(decision.key)
            if payload is not None:
                self._add(self._metrics.cache_memory_hits, model, label)
            else:
                epoch = self._seen_epoch
                entry = await self._reads.get(decision.key)
                if entry is not None:
                    payload = entry.payload
                    if self._epoch.current() == epoch:  # no purge began while it was read: it may be held
                        self._hot.put(decision.key, payload, entry.expires)
            if payload is not None:
                decision.status, decision.payload, decision.store = HIT, payload, False
                self._add(self._metrics.cache_served_bytes, model, label, len(payload))
        self._count(model, label, decision.status)
        return decision

    def _held(self, key: bytes) -> bytes | None:
        """The answer under ``key`` in this process's memory (once any purge seen since is applied), or waiting
        for the writer."""
        epoch = self._epoch.current()
        if epoch != self._seen_epoch:  # a worker purged: what is held here may be gone from LMDB
            self._hot.clear()
            self._seen_epoch = epoch
        payload = self._hot.get(key)
        return payload if payload is not None else self._pending.get(key)

    def _add(self, counter: Any, model: str, label: str, amount: float = 1.0) -> None:
        """Add to ``counter``'s child for ``model`` and ``label`` (children made once, increments batched)."""
        key = (counter, model, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(model, label)
        self._metrics.pending.add(child, amount)

    def _label(self, scope: str) -> str:
        label = self._labels.get(scope)
        if label is None:
            if len(self._labels) >= MAX_REMEMBERED_LABELS:
                self._labels.clear()
            label = self._labels[scope] = scope_hash(scope, self._label_key)
        return label

    def _count(self, model: str, label: str, status: str) -> None:
        key = (model, label, status)
        child = self._lookup_children.get(key)
        if child is None:
            child = self._lookup_children[key] = self._metrics.cache_lookups.labels(model, label, status)
        self._metrics.pending.add(child)

    def remember(self, decision: CacheDecision, model: str, version: int, build_hash: str, payload: bytes) -> None:
        """Store a fresh answer in the background (the response does not wait for the write)."""
        if not decision.store or decision.scope is None or not self.enabled:
            return
        key = decision.key
        if decision.keyed_for != (model, version, build_hash):  # another version answered: a swap happened
            key = cache_key(decision.scope, model, version, build_hash, decision.canonical)
        if len(self._pending) >= MAX_PENDING_WRITES:
            self._metrics.cache_errors.labels("put_dropped").inc()  # the writer is behind: keep memory bounded
            return
        self._pending[key] = payload
        self._queued[key] = CacheEntry(model=model, scope_hash=decision.scope_label, payload=payload)
        self._hot.put(key, payload, self._clock() + self.config.ttl_s)
        if self._writing is None:
            self._write_queued()

    def _write_queued(self) -> None:
        """Hand every queued answer to the writer as one commit; the answers queued meanwhile form the next."""
        batch, self._queued = list(self._queued.items()), {}
        self._writing = asyncio.get_running_loop().run_in_executor(self._writer, self._put, batch)
        self._writing.add_done_callback(partial(self._written, batch))

    def _put(self, batch: list[tuple[bytes, CacheEntry]]) -> tuple[list[PutResult], dict]:
        return self.store.put_many(batch), self.store.stats()

    def _written(self, batch: list[tuple[bytes, CacheEntry]], future: asyncio.Future) -> None:
        self._writing = None
        for key, entry in batch:
            if self._pending.get(key) is entry.payload:
                del self._pending[key]
        if self._queued:
            self._write_queued()
        if future.cancelled():
            return
        if future.exception() is not None:
            self._metrics.cache_errors.labels("put").inc(len(batch))
            log.error("response cache write failed: %s", future.exception())
            return
        results, stats = future.result()
        for (_, entry), result in zip(batch, results):
            if not result.stored:
                continue
            self._metrics.cache_stored_bytes.labels(entry.model, entry.scope_hash).inc(len(entry.payload))
            for model, label, _size in result.evicted:
                self._metrics.cache_evictions.labels(model, label).inc()
        self._metrics.cache_size.set(stats["bytes"])
        self._metrics.cache_entries.set(stats["entries"])

    async def purge(self, scope: str | None, model: str | None) -> int:
        """Delete the entries of a scope and/or a model; returns how many went."""
        if not self.store.healthy:
            return 0
        label = self._label(scope) if scope is not None else None
        self._pending.clear()
        # Answers not yet handed to the writer and under the filters are dropped (they would land after the purge);
        # those handed over land first, on the writer thread, and are purged with the rest.
        self._queued = {key: entry for key, entry in self._queued.items()
                        if not ((label is None or entry.scope_hash == label) and (model is None or entry.model == model))}
        count = await asyncio.get_running_loop().run_in_executor(self._writer, self._purge, label, model)
        self._hot.clear()  # this worker's memory goes now; the others' at their next lookup
        self._seen_epoch = self._epoch.current()
        await self._refresh_gauges()
        return count

    def _purge(self, label: str | None, model: str | None) -> int:
        count = self.store.purge(label, model)
        try:
            self._epoch.advance()  # after the commit: a worker that sees the new count finds the entries gone
        except OSError as exc:
            self._metrics.cache_errors.labels("purge").inc()
            log.error("response cache purge: the purge counter %s could not be advanced (%s); other workers may "
                      "answer purged entries from memory until they expire", self._epoch.path, exc)
        return count

    async def stats(self) -> dict:
        """Entries, payload bytes, the cap and whether the store is healthy."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.store.stats)

    def memory_stats(self) -> dict:
        """What this worker holds in memory: entries, payload bytes and its budget (0: it holds nothing)."""
        self._held(b"")  # a purge seen since empties it first
        return {"entries": len(self._hot), "bytes": self._hot.bytes, "max_bytes": self._hot.max_bytes}

    async def _refresh_gauges(self) -> None:
        stats = await self.stats()
        self._metrics.cache_size.set(stats["bytes"])
        self._metrics.cache_entries.set(stats["entries"])

    async def close(self) -> None:
        """Wait for pending writes, then close the store."""
        while self._writing is not None:  # each write's end hands the next queued batch over
            await asyncio.gather(self._writing, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._hot.clear()
        self._epoch.close()
        self._executor.shutdown(wait=False)
        self._writer.shutdown(wait=False)

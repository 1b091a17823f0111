"""The blocking LMDB store of the response cache.

One LMDB environment holds four named databases, all changed together in one write
transaction so the store is consistent after any crash:

- ``entries``: cache key -> msgpack ``[FORMAT_VERSION, created, expires, model,
  scope_hash, payload, checksum]``; the checksum (blake2b-128) covers the key and the
  other fields, so a damaged or misplaced value reads as a miss.
- ``order``: big-endian created-time ns + key -> msgpack ``[expires_ns, size, model,
  scope_hash]``; oldest first, for FIFO eviction, purges and eviction metrics.
- ``expiry``: big-endian expires-time ns + key -> the ``order`` key; for dropping
  expired entries before live ones.
- ``meta``: the format version and the running total of payload bytes.

Every method blocks; callers run them off the event loop, from several threads at once
(one shared ``lmdb.Environment``, one transaction per call) and from several processes
(LMDB's own lock file). No method other than ``__init__`` raises: failures are logged to
``appliance.cache`` and turn into misses.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import lmdb
import msgpack

from appliance.cache.private_lmdb import open_private

__all__ = ["FORMAT_VERSION", "CacheEntry", "PutResult", "ResponseCache"]

FORMAT_VERSION = 1

DB_ENTRIES, DB_ORDER, DB_EXPIRY, DB_META = b"entries", b"order", b"expiry", b"meta"
_META_FORMAT, _META_BYTES = b"format", b"bytes"

_MAP_OVERHEAD = 32 * 1024 * 1024
_MAX_READERS = 1024  # reader slots shared by all threads of all processes
_SWEEP_LIMIT = 16  # expired entries dropped per put when no room is needed
_U64 = struct.Struct(">Q")
_U64_MAX = 2**64 - 1

_log = logging.getLogger("appliance.cache")
_T = TypeVar("_T")
_Evicted = list[tuple[str, str, int]]


@dataclass(frozen=True)
class CacheEntry:
    """One cached response. ``created`` and ``expires`` are set by ``ResponseCache.put``."""

    model: str
    scope_hash: str
    payload: bytes
    created: float = 0.0
    expires: float = 0.0


@dataclass
class PutResult:
    """Whether ``put`` stored the entry, and ``(model, scope_hash, payload bytes)`` of each
    entry it removed to make room or because it had expired."""

    stored: bool
    evicted: list[tuple[str, str, int]] = field(default_factory=list)


class _Dbs(NamedTuple):
    entries: object
    order: object
    expiry: object
    meta: object


class _Open(NamedTuple):
    """An open environment and its databases, swapped in and out as one reference."""

    env: lmdb.Environment
    dbs: _Dbs


class _Removed(NamedTuple):
    model: str
    scope_hash: str
    size: int


class _IndexDamaged(Exception):
    """An ``order`` record could not be decoded; the store is cleared."""


class ResponseCache:
    """A size-bounded, TTL-bounded LMDB store of responses, shared by threads and processes.

    Args:
        path: the folder holding ``data.mdb`` and ``lock.mdb`` (created with mode 0700).
        max_bytes: bound on the sum of stored payload sizes; entries larger than a
            quarter of it are not stored.
        ttl_s: default time to live of an entry, in seconds.
        sync: fsync each commit (a power cut may lose the last commit, never integrity);
            False skips the fsync (a process crash still loses nothing committed).
        clock: unix time in seconds; injected by tests.
        map_size: LMDB map size in bytes; defaults to ``2 * max_bytes + 32 MiB``.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        ttl_s: float,
        *,
        sync: bool = True,
        clock: Callable[[], float] = time.time,
        map_size: int | None = None,
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._ttl_s = float(ttl_s)
        self._sync = sync
        self._clock = clock
        self._map_size = map_size if map_size is not None else 2 * max_bytes + _MAP_OVERHEAD
        self._opened: _Open | None = None
        # Serialises this process's writers and close(); LMDB serialises across processes.
        self._write_lock = threading.RLock()

    @property
    def path(self) -> Path:
        """The folder of the store."""
        return self._path

    @property
    def healthy(self) -> bool:
        """True while the store is open and usable."""
        return self._opened is not None

    def open(self) -> bool:
        """Open (creating if needed) the store; False, with an ERROR logged, if it cannot be."""
        with self._write_lock:
            if self._opened is not None:
                return True
            try:
                self._opened = self._open_env()
            except Exception as exc:
                _log.error("response cache at %s cannot be opened, caching is off: %r", self._path, exc)
                return False
            return True

    def close(self) -> None:
        """Close the store; later calls are misses and no-ops until ``open`` succeeds again."""
        with self._write_lock:
            opened, self._opened = self._opened, None
            if opened is not None:
                opened.env.close()

    def get(self, key: bytes) -> CacheEntry | None:
        """The live entry under ``key``, or None on a miss, an expired or a damaged entry."""
        return self.get_many((key,))[0]

    def get_many(self, keys: Sequence[bytes]) -> list[CacheEntry | None]:
        """:meth:`get` of each key, in order, all read in one transaction."""
        opened = self._opened
        if opened is None:
            return [None] * len(keys)
        try:
            with opened.env.begin(write=False) as txn:
                raws = [txn.get(key, db=opened.dbs.entries) for key in keys]
        except Exception as exc:
            self._failed("get", opened, exc)
            return [None] * len(keys)
        now = self._clock()
        entries: list[CacheEntry | None] = []
        for key, raw in zip(keys, raws):
            entry = _decode(key, raw) if raw is not None else None
            if raw is not None and entry is None:
                _log.error("response cache entry %s is damaged; dropping it", key.hex()[:16])
                self._drop_damaged(opened, key)
            entries.append(entry if entry is not None and now < entry.expires else None)
        return entries

    def put(self, key: bytes, entry: CacheEntry, ttl_s: float | None = None) -> PutResult:
        """Store ``entry`` under ``key`` for ``ttl_s`` (default: the store's), replacing any
        entry there, and evicting expired then oldest-written entries to stay in budget."""
        return self.put_many(((key, entry),), ttl_s)[0]

    def put_many(self, items: Sequence[tuple[bytes, CacheEntry]], ttl_s: float | None = None) -> list[PutResult]:
        """:meth:`put` of each ``(key, entry)`` in order, committed together: one write
        transaction (and one fsync) for all of them; a later item under a key replaces an
        earlier one."""
        results = [PutResult(stored=False) for _ in items]
        opened = self._opened
        if opened is None:
            return results
        ttl = self._ttl_s if ttl_s is None else float(ttl_s)
        records: list[tuple[int, bytes, CacheEntry, bytes]] = []
        for index, (key, entry) in enumerate(items):
            try:
                payload = bytes(entry.payload)
                if not ttl > 0 or len(payload) * 4 > self._max_bytes:
                    continue
                created = float(self._clock())
                record = CacheEntry(str(entry.model), str(entry.scope_hash), payload, created, created + ttl)
                records.append((index, key, record, _encode(key, record)))
            except Exception as exc:
                _log.error("response cache entry %r cannot be stored: %r", key, exc)
        if not records:
            return results
        with self._write_lock:
            if self._opened is not opened:
                return results
            dbs = opened.dbs

            def insert_all(txn: lmdb.Transaction) -> list[_Evicted]:
                return [self._insert(txn, dbs, key, record, value) for _, key, record, value in records]

            try:
                try:
                    evicted = self._write(opened, insert_all)
                except lmdb.MapFullError:
                    # Fragmentation or a long-lived reader can fill the map below max_bytes.
                    _log.warning("response cache map is full; evicting the oldest half and retrying")
                    halved = self._write(opened, lambda txn: _evict_half(txn, dbs))
                    # LMDB reuses pages freed by a commit only from the commit after next.
                    self._write(opened, lambda txn: _set_total(txn, dbs, _get_total(txn, dbs)))
                    evicted = self._write(opened, insert_all)
                    evicted[0] = halved + evicted[0]
                for (index, *_), removed in zip(records, evicted):
                    results[index].evicted += removed
                    results[index].stored = True
            except Exception as exc:
                self._failed("put", opened, exc)
        return results

    def purge(self, scope_hash: str | None = None, model: str | None = None) -> int:
        """Delete every entry whose scope hash and model match the filters given (None =
        any); return how many went."""
        opened = self._opened
        if opened is None:
            return 0
        with self._write_lock:
            if self._opened is not opened:
                return 0
            try:
                return self._write(opened, lambda txn: _purge(txn, opened.dbs, scope_hash, model))
            except Exception as exc:
                self._failed("purge", opened, exc)
                return 0

    def stats(self) -> dict:
        """``{"entries", "bytes" (sum of payload sizes), "max_bytes", "healthy"}``; cheap."""
        opened = self._opened
        entries = total = 0
        if opened is not None:
            try:
                with opened.env.begin(write=False) as txn:
                    entries = txn.stat(opened.dbs.entries)["entries"]
                    total = _get_total(txn, opened.dbs)
            except Exception as exc:
                self._failed("stats", opened, exc)
        return {"entries": entries, "bytes": total, "max_bytes": self._max_bytes, "healthy": self.healthy}

    # -- opening ------------------------------------------------------------------------

    def _open_env(self) -> _Open:
        env = open_private(self._path, map_size=self._map_size, max_dbs=4, sync=self._sync, metasync=False,
                           max_readers=_MAX_READERS)
        try:
            dbs = _Dbs(*(env.open_db(name) for name in (DB_ENTRIES, DB_ORDER, DB_EXPIRY, DB_META)))
            with env.begin(write=True) as txn:
                _check_format(txn, dbs)
        except BaseException:
            env.close()
            raise
        return _Open(env, dbs)

    # -- writing ------------------------------------------------------------------------

    @staticmethod
    def _write(opened: _Open, body: Callable[[lmdb.Transaction], _T]) -> _T:
        """Run ``body`` in one write transaction; on a damaged index, clear and rerun once."""
        try:
            with opened.env.begin(write=True) as txn:
                return body(txn)
        except _IndexDamaged as exc:
            _log.error("response cache index is damaged (%s); clearing the cache", exc)
            with opened.env.begin(write=True) as txn:
                _clear(txn, opened.dbs)
            with opened.env.begin(write=True) as txn:
                return body(txn)

    def _insert(self, txn: lmdb.Transaction, dbs: _Dbs, key: bytes, record: CacheEntry, value: bytes) -> _Evicted:
        size = len(record.payload)
        total = _get_total(txn, dbs)
        evicted: _Evicted = []
        total -= _remove_key(txn, dbs, key)  # a replaced entry is not an eviction
        now_ns = _ns(record.created)
        swept = 0
        while swept < _SWEEP_LIMIT or total + size > self._max_bytes:
            gone = _pop(txn, dbs, now_ns)
            if gone is None:
                break
            evicted.append(tuple(gone))
            total -= gone.size
            swept += 1
        while total + size > self._max_bytes:
            gone = _pop(txn, dbs, None)
            if gone is None:
                total = 0  # nothing left: whatever the total said was stale
                break
            evicted.append(tuple(gone))
            total -= gone.size
        okey = _order_key(record.created, key)
        expires_ns = _ns(record.expires)
        txn.put(key, value, db=dbs.entries)
        txn.put(okey, _pack([expires_ns, size, record.model, record.scope_hash]), db=dbs.order)
        txn.put(_U64.pack(expires_ns) + key, okey, db=dbs.expiry)
        _set_total(txn, dbs, total + size)
        return evicted

    def _drop_damaged(self, opened: _Open, key: bytes) -> None:
        def body(txn: lmdb.Transaction) -> None:
            raw = txn.get(key, db=opened.dbs.entries)
            if raw is not None and _decode(key, raw) is None:  # not replaced meanwhile
                _set_total(txn, opened.dbs, _get_total(txn, opened.dbs) - _remove_key(txn, opened.dbs, key))

        with self._write_lock:
            if self._opened is not opened:
                return
            try:
                self._write(opened, body)
            except Exception as exc:
                self._failed("drop of a damaged entry", opened, exc)

    def _failed(self, operation: str, opened: _Open, exc: Exception) -> None:
        if self._opened is not opened:
            return  # closed meanwhile: not worth an error
        _log.error("response cache %s failed: %r", operation, exc)
        if isinstance(exc, (lmdb.CorruptedError, lmdb.PanicError, lmdb.PageNotFoundError, lmdb.InvalidError)):
            _log.error("response cache at %s is damaged; caching is off until it is repaired", self._path)
            with self._write_lock:
                if self._opened is opened:
                    self.close()


# -- records -------------------------------------------------------------------------------


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _checksum(key: bytes, entry: CacheEntry) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    # The header is one self-delimiting msgpack item, so header + payload is unambiguous.
    header = [key, FORMAT_VERSION, entry.created, entry.expires, entry.model, entry.scope_hash, len(entry.payload)]
    digest.update(_pack(header))
    digest.update(entry.payload)
    return digest.digest()


def _encode(key: bytes, entry: CacheEntry) -> bytes:
    fields = [FORMAT_VERSION, entry.created, entry.expires, entry.model, entry.scope_hash, entry.payload]
    return _pack([*fields, _checksum(key, entry)])


def _decode(key: bytes, raw: bytes) -> CacheEntry | None:
    """The entry in ``raw``, or None if it is damaged (undecodable, wrong shape or checksum)."""
    try:
        version, created, expires, model, scope, payload, checksum = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    if not (
        version == FORMAT_VERSION
        and type(created) is float
        and type(expires) is float
        and type(model) is str
        and type(scope) is str
        and type(payload) is bytes
        and type(checksum) is bytes
    ):
        return None
    entry = CacheEntry(model, scope, payload, created, expires)
    return entry if _checksum(key, entry) == checksum else None


def _ns(seconds: float) -> int:
    if not seconds > 0:
        return 0
    return _U64_MAX if seconds >= _U64_MAX / 1e9 else int(seconds * 1e9)


def _order_key(created: float, key: bytes) -> bytes:
    return _U64.pack(_ns(created)) + key


def _unpack_order(oval: bytes) -> tuple[int, int, str, str]:
    try:
        expires_ns, size, model, scope = msgpack.unpackb(oval, raw=False)
    except Exception as exc:
        raise _IndexDamaged(f"undecodable order record: {exc!r}") from exc
    if not (type(expires_ns) is int and type(size) is int and type(model) is str and type(scope) is str):
        raise _IndexDamaged("malformed order record")
    return expires_ns, size, model, scope


# -- index maintenance (inside a write transaction; the caller updates the total) ----------


def _get_total(txn: lmdb.Transaction, dbs: _Dbs) -> int:
    raw = txn.get(_META_BYTES, db=dbs.meta)
    return _U64.unpack(raw)[0] if raw is not None and len(raw) == 8 else 0


def _set_total(txn: lmdb.Transaction, dbs: _Dbs, total: int) -> None:
    txn.put(_META_BYTES, _U64.pack(max(total, 0)), db=dbs.meta)


def _clear(txn: lmdb.Transaction, dbs: _Dbs) -> None:
    for db in dbs:
        txn.drop(db, delete=False)
    txn.put(_META_FORMAT, _U64.pack(FORMAT_VERSION), db=dbs.meta)
    _set_total(txn, dbs, 0)


def _check_format(txn: lmdb.Transaction, dbs: _Dbs) -> None:
    """Clear a store of another format version, or whose databases disagree."""
    counts = {txn.stat(db)["entries"] for db in (dbs.entries, dbs.order, dbs.expiry)}
    fmt = txn.get(_META_FORMAT, db=dbs.meta)
    if fmt == _U64.pack(FORMAT_VERSION) and len(counts) == 1 and txn.get(_META_BYTES, db=dbs.meta):
        return
    if fmt is not None or counts != {0}:
        _log.warning("response cache is of another format or inconsistent; clearing it")
    _clear(txn, dbs)


def _remove_order_record(txn: lmdb.Transaction, dbs: _Dbs, okey: bytes, oval: bytes) -> _Removed:
    """Delete the entry of one ``order`` record and its index records."""
    expires_ns, size, model, scope = _unpack_order(oval)
    key = okey[8:]
    txn.delete(okey, db=dbs.order)
    txn.delete(_U64.pack(expires_ns) + key, db=dbs.expiry)
    txn.delete(key, db=dbs.entries)
    return _Removed(model, scope, size)


def _remove_key(txn: lmdb.Transaction, dbs: _Dbs, key: bytes) -> int:
    """Delete the entry under ``key`` (if any) and its index records; return its size."""
    raw = txn.get(key, db=dbs.entries)
    if raw is None:
        return 0
    entry = _decode(key, raw)
    if entry is not None:
        okey = _order_key(entry.created, key)
        oval = txn.get(okey, db=dbs.order)
        if oval is not None:
            return _remove_order_record(txn, dbs, okey, oval).size
    # A damaged value does not say when it was written: find its order record(s) by key.
    with txn.cursor(db=dbs.order) as cursor:
        found = [(okey, oval) for okey, oval in cursor if okey[8:] == key]
    txn.delete(key, db=dbs.entries)
    return sum(_remove_order_record(txn, dbs, okey, oval).size for okey, oval in found)


def _pop(txn: lmdb.Transaction, dbs: _Dbs, expired_by_ns: int | None) -> _Removed | None:
    """Remove the entry expiring first if it expired by ``expired_by_ns``, or with None the
    oldest-written entry; None when there is no such entry."""
    if expired_by_ns is None:
        with txn.cursor(db=dbs.order) as cursor:
            if not cursor.first():
                return None
            okey, oval = cursor.key(), cursor.value()
        return _remove_order_record(txn, dbs, okey, oval)
    with txn.cursor(db=dbs.expiry) as cursor:
        if not cursor.first():
            return None
        ekey, okey = cursor.key(), cursor.value()
    if _U64.unpack(ekey[:8])[0] > expired_by_ns:
        return None
    oval = txn.get(okey, db=dbs.order)
    if oval is None:
        raise _IndexDamaged("expiry record without an order record")
    return _remove_order_record(txn, dbs, okey, oval)


def _evict_half(txn: lmdb.Transaction, dbs: _Dbs) -> _Evicted:
    """Remove the oldest entries holding half of the payload bytes."""
    total = _get_total(txn, dbs)
    target = total // 2
    evicted: _Evicted = []
    while total > target:
        gone = _pop(txn, dbs, None)
        if gone is None:
            total = 0
            break
        evicted.append(tuple(gone))
        total -= gone.size
    _set_total(txn, dbs, total)
    return evicted


def _purge(txn: lmdb.Transaction, dbs: _Dbs, scope_hash: str | None, model: str | None) -> int:
    if scope_hash is None and model is None:
        count = txn.stat(dbs.entries)["entries"]
        _clear(txn, dbs)
        return count
    doomed = []
    with txn.cursor(db=dbs.order) as cursor:
        for okey, oval in cursor:
            _, _, entry_model, entry_scope = _unpack_order(oval)
            if scope_hash in (None, entry_scope) and model in (None, entry_model):
                doomed.append((okey, oval))
    total = _get_total(txn, dbs)
    for okey, oval in doomed:
        total -= _remove_order_record(txn, dbs, okey, oval).size
    _set_total(txn, dbs, total)
    return len(doomed)

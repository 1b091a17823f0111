"""The persistent cost ledger: running totals of what each tenant, key and model used, per UTC day.

Every answered request becomes one :class:`UsageRecord`. :meth:`CostLedger.record` adds it, on the event
loop and without I/O, to an in-memory aggregate and to the ``appliance_cost_*`` / ``appliance_usage_*``
Prometheus counters; :meth:`CostLedger.flush` (every ``flush_interval_s`` and before each query) adds the
aggregate to LMDB in one write transaction in a worker thread.

One LMDB environment (folder 0700, files 0600) holds two named databases:

- ``totals``: ``b"YYYY-MM-DD"`` + blake2b-128 of msgpack ``[tenant, key, model, place, workflow]`` ->
  msgpack ``[FORMAT_VERSION, tenant, key, model, place, workflow, requests, input_tokens, output_tokens,
  compute_s, cost, cost_avoided]``. The day prefix lets a query range-scan ``since..until``; the hash keeps
  keys under LMDB's 511-byte limit whatever the labels are.
- ``meta``: the format version and the admitted workflow tags (msgpack list, in admission order).

Several server processes share one file: each flush reads, adds and writes every row inside one write
transaction, and LMDB's writer lock serialises those transactions, so the totals are exact sums.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import msgpack
from prometheus_client import CollectorRegistry, Counter

from appliance.cache.private_lmdb import open_private
from appliance.telemetry import PendingIncrements

__all__ = ["FORMAT_VERSION", "GROUP_FIELDS", "OTHER_WORKFLOW", "PLACES", "TOTAL_FIELDS", "CostLedger", "UsageRecord"]

PLACES = ("local", "cloud", "cache")
GROUP_FIELDS = ("day", "tenant", "key", "model", "place", "workflow")
TOTAL_FIELDS = ("requests", "input_tokens", "output_tokens", "compute_s", "cost", "cost_avoided")
OTHER_WORKFLOW = "other"  # workflow tags beyond the first ``max_workflows`` are recorded as this
FORMAT_VERSION = 1

DB_TOTALS, DB_META = b"totals", b"meta"
_META_FORMAT, _META_WORKFLOWS = b"format", b"workflows"
_MAP_SIZE = 1 << 30  # sparse; a row takes about 150 bytes
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_UNCOUNTED_TAGS = ("", OTHER_WORKFLOW)

log = logging.getLogger("appliance.ledger")

_Row = tuple[str, str, str, str, str, str]  # day, tenant, key id, model, place, workflow
_Totals = list  # [requests, input_tokens, output_tokens, compute_s, cost, cost_avoided]


@dataclass(slots=True)
class UsageRecord:
    """What one answered request used, and who it is charged to. Checked when made; treat it as read-only (it is
    not frozen: a frozen dataclass pays a call per field when made, and one is made for every request)."""

    tenant: str
    key_id: str  # "" for the local operator
    model: str
    place: str  # one of PLACES
    workflow: str = ""  # "" = none
    input_tokens: int = 0
    output_tokens: int = 0
    compute_s: float = 0.0
    cost: float = 0.0  # currency units as configured; the ledger does not care
    cost_avoided: float = 0.0  # for cache hits: what running it would have cost

    def __post_init__(self) -> None:
        # One quick test for the usual record (exact built-in types); anything else gets the full checks.
        tokens_in, tokens_out = self.input_tokens, self.output_tokens
        compute_s, cost, avoided = self.compute_s, self.cost, self.cost_avoided
        if not (type(self.tenant) is str and type(self.key_id) is str and type(self.model) is str
                and type(self.workflow) is str and self.place in PLACES
                and type(tokens_in) is int and tokens_in >= 0 and type(tokens_out) is int and tokens_out >= 0
                and type(compute_s) is float and 0.0 <= compute_s < math.inf
                and type(cost) is float and 0.0 <= cost < math.inf
                and type(avoided) is float and 0.0 <= avoided < math.inf):
            self._check()

    def _check(self) -> None:
        for name in ("tenant", "key_id", "model", "workflow"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"UsageRecord.{name} must be a string, got {getattr(self, name)!r}")
        if self.place not in PLACES:
            raise ValueError(f"UsageRecord.place must be one of {', '.join(PLACES)}; got {self.place!r}")
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"UsageRecord.{name} must be a non-negative integer, got {value!r}")
        for name in ("compute_s", "cost", "cost_avoided"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"UsageRecord.{name} must be a finite non-negative number, got {value!r}")


class _Dbs(NamedTuple):
    totals: object
    meta: object


class _Children(NamedTuple):
    """The counters of one (tenant, model, place), bound once so the hot path skips the label lookups."""

    cost: Counter
    avoided: Counter
    input_tokens: Counter
    output_tokens: Counter
    requests: Counter


class CostLedger:
    """Usage and cost totals per (day, tenant, key, model, place, workflow), kept in LMDB at ``path``.

    Args:
        path: the folder holding ``data.mdb`` and ``lock.mdb`` (created with mode 0700 by :meth:`start`).
        registry: where the ``appliance_cost_*`` and ``appliance_usage_*`` counters are registered.
        max_workflows: how many distinct workflow tags are kept (the first seen, by any process sharing
            the file); later new tags are recorded as ``"other"``.
        flush_interval_s: how often the in-memory aggregate is written.
        clock: unix time in seconds, whose UTC date is a record's day; injected by tests.
        pending: the batch the counters' increments go through (the server's, flushed with its other metrics);
            by default one of the ledger's own, registered in ``registry``.
    """

    def __init__(
        self,
        path: Path,
        registry: CollectorRegistry,
        *,
        max_workflows: int = 64,
        flush_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        pending: PendingIncrements | None = None,
    ) -> None:
        if isinstance(max_workflows, bool) or not isinstance(max_workflows, int) or max_workflows < 0:
            raise ValueError(f"max_workflows must be a non-negative integer, got {max_workflows!r}")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be positive, got {flush_interval_s!r}")
        self._path = Path(path)
        self._max_workflows = max_workflows
        self._flush_interval_s = float(flush_interval_s)
        self._clock = clock
        self._pending: dict[_Row, _Totals] = {}
        self._known: frozenset[str] = frozenset()  # admitted tags, as of the last open or flush
        self._candidates: set[str] = set()  # unknown tags pending; admitted or turned "other" at flush
        self._day = (0.0, 0.0, "")  # start, end, "YYYY-MM-DD" of the last record's day
        self._env: lmdb.Environment | None = None
        self._dbs: _Dbs | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._flush_task: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()
        self._children: dict[tuple[str, str, str], _Children] = {}
        labels = ("tenant", "model", "place")
        # Counter increments are batched; the batch is registered before the counters, so a collection applies it.
        self._pending_counts = pending or PendingIncrements(registry)
        self._unreported: dict[tuple[str, str, str, str], list] = {}  # (tenant, model, place, workflow) -> counts
        self._pending_counts.add_source(self._report)
        self._cost = Counter("appliance_cost", "Cost of answered requests", labels, registry=registry)
        self._avoided = Counter("appliance_cost_avoided", "Cost avoided by answering from the response cache",
                                ("tenant", "model"), registry=registry)
        self._tokens = Counter("appliance_usage_tokens", "Tokens of answered requests", (*labels, "direction"),
                               registry=registry)
        self._requests = Counter("appliance_usage_requests", "Answered requests", labels, registry=registry)
        # By workflow tag, bounded like the ledger's rows: tags past max_workflows count as "other"; "" is untagged.
        self._workflow_cost = Counter("appliance_workflow_cost", "Cost of answered requests by workflow tag",
                                      ("workflow",), registry=registry)
        self._workflow_tokens = Counter("appliance_workflow_tokens", "Tokens of answered requests by workflow tag",
                                        ("workflow", "direction"), registry=registry)
        self._workflow_children: dict[str, tuple[Counter, Counter, Counter]] = {}

    @property
    def path(self) -> Path:
        """The folder of the ledger."""
        return self._path

    async def start(self) -> None:
        """Open (creating if needed) the LMDB environment in a worker thread and start the periodic flush.

        Raises what opening raised (an unusable folder, a ledger of another format).
        """
        if self._env is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        loop = asyncio.get_running_loop()
        self._env, self._dbs, known = await loop.run_in_executor(self._executor, _open, self._path)
        self._set_known(known)
        log.info("cost ledger at %s: flushing every %gs, keeping up to %d workflow tags (%d known)",
                 self._path, self._flush_interval_s, self._max_workflows, len(self._known))
        self._flush_task = asyncio.create_task(self._flush_periodically(), name="ledger-flush")

    def record(self, record: UsageRecord) -> None:
        """Add one request's usage to the pending aggregate and the counters; O(1), no I/O."""
        now = self._clock()
        start, end, day = self._day
        if not start <= now < end:
            day, start, end = _day_of(now)
            self._day = (start, end, day)
        workflow = self._workflow(record.workflow)
        row = (day, record.tenant, record.key_id, record.model, record.place, workflow)
        compute_s, cost, avoided = float(record.compute_s), float(record.cost), float(record.cost_avoided)
        totals = self._pending.get(row)
        if totals is None:
            self._pending[row] = [1, record.input_tokens, record.output_tokens, compute_s, cost, avoided]
        else:
            totals[0] += 1
            totals[1] += record.input_tokens
            totals[2] += record.output_tokens
            totals[3] += compute_s
            totals[4] += cost
            totals[5] += avoided
        # The counters learn it at the next flush of the increments (_report): one tally here, not eight adds.
        counted = (record.tenant, record.model, record.place, workflow)
        counts = self._unreported.get(counted)
        if counts is None:
            self._unreported[counted] = [1, cost, avoided, record.input_tokens, record.output_tokens]
        else:
            counts[0] += 1
            counts[1] += cost
            counts[2] += avoided
            counts[3] += record.input_tokens
            counts[4] += record.output_tokens

    def _report(self, add: Callable[[Any, float], None]) -> None:
        """Hand the counters' share of the records since the last call to the pending increments (``add``)."""
        if not self._unreported:
            return
        # Every counter child first: should making one fail, the tallies stay here for the next flush.
        bound = {counted: self._counters_of(*counted) for counted in self._unreported}
        unreported, self._unreported = self._unreported, {}
        for counted, (requests, cost, avoided, input_tokens, output_tokens) in unreported.items():
            children, by_workflow = bound[counted]
            add(children.requests, requests)
            add(children.cost, cost)
            add(children.avoided, avoided)
            add(children.input_tokens, input_tokens)
            add(children.output_tokens, output_tokens)
            add(by_workflow[0], cost)
            add(by_workflow[1], input_tokens)
            add(by_workflow[2], output_tokens)

    def _counters_of(self, tenant: str, model: str, place: str,
                     workflow: str) -> tuple[_Children, tuple[Counter, Counter, Counter]]:
        labels = (tenant, model, place)
        children = self._children.get(labels)
        if children is None:
            children = self._children[labels] = _Children(
                self._cost.labels(*labels), self._avoided.labels(tenant, model),
                self._tokens.labels(*labels, "input"), self._tokens.labels(*labels, "output"),
                self._requests.labels(*labels),
            )
        by_workflow = self._workflow_children.get(workflow)
        if by_workflow is None:
            by_workflow = self._workflow_children[workflow] = (
                self._workflow_cost.labels(workflow), self._workflow_tokens.labels(workflow, "input"),
                self._workflow_tokens.labels(workflow, "output"))
        return children, by_workflow

    def _workflow(self, tag: str) -> str:
        if tag in self._known or tag in _UNCOUNTED_TAGS or tag in self._candidates:
            return tag
        if len(self._candidates) < self._max_workflows - len(self._known):
            self._candidates.add(tag)
            return tag
        return OTHER_WORKFLOW

    async def flush(self) -> None:
        """Add the pending aggregate to LMDB in one write transaction; on failure the rows stay pending for
        the next flush (and an error is logged). Before :meth:`start` the rows just stay pending."""
        async with self._flush_lock:
            if self._env is None or self._executor is None or not self._pending:
                return
            rows, self._pending = self._pending, {}
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, _write, self._env, self._dbs, rows, self._max_workflows
            )
            # The bookkeeping rides on the future, so a cancelled flush neither loses nor repeats rows.
            future.add_done_callback(partial(self._flushed, rows))
            await asyncio.wait([future])

    def _flushed(self, rows: dict[_Row, _Totals], future: Future) -> None:
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            log.error("cost ledger flush of %d rows to %s failed; keeping them for the next flush: %r",
                      len(rows), self._path, error or "cancelled")
            for row, totals in rows.items():
                _add(self._pending, row, totals)
            self._set_known(self._known)
        else:
            self._set_known(future.result())

    def _set_known(self, known: Sequence[str]) -> None:
        self._known = frozenset(known)
        self._candidates = {row[5] for row in self._pending} - self._known - set(_UNCOUNTED_TAGS)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except Exception:  # flush logs its own failures; this is a bug, but the loop must go on
                log.exception("cost ledger flush raised")

    async def query(
        self,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        place: str | None = None,
        workflow: str | None = None,
        since: str | None = None,
        until: str | None = None,
        group_by: Sequence[str] = GROUP_FIELDS,
    ) -> list[dict]:
        """Totals of the rows matching every filter given, days ``since``..``until`` ("YYYY-MM-DD",
        inclusive), summed per distinct value of the ``group_by`` fields and sorted by them.

        Each row is ``{<group_by fields>..., "requests", "input_tokens", "output_tokens", "compute_s",
        "cost", "cost_avoided"}`` (the key id is the field ``"key"``). Flushes first, so everything recorded
        by this process is included; no matching row gives ``[]``. Raises ValueError for unknown fields,
        places or malformed dates, RuntimeError before :meth:`start`.
        """
        groups = _check_group_by(group_by)
        first, last = _check_day("since", since), _check_day("until", until)
        if first is not None and last is not None and first > last:
            raise ValueError(f"since ({since}) is after until ({until})")
        if place is not None and place not in PLACES:
            raise ValueError(f"place must be one of {', '.join(PLACES)}; got {place!r}")
        filters = tuple((i, v) for i, v in enumerate((None, tenant, key_id, model, place, workflow)) if v is not None)
        if self._env is None or self._executor is None:
            raise RuntimeError("the cost ledger is not started")
        await self.flush()
        indexes = tuple(GROUP_FIELDS.index(name) for name in groups)
        sums = await asyncio.get_running_loop().run_in_executor(
            self._executor, _scan, self._env, self._dbs, first, last, filters, indexes
        )
        return [dict(zip(groups, key)) | dict(zip(TOTAL_FIELDS, totals)) for key, totals in sorted(sums.items())]

    async def close(self) -> None:
        """Stop the periodic flush, flush what is pending and close the environment; :meth:`start` reopens."""
        task, self._flush_task = self._flush_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        executor = self._executor
        if executor is None:
            return
        await self.flush()
        if self._pending:
            log.error("cost ledger closing with %d rows not written to %s; they are lost",
                      len(self._pending), self._path)
        env, self._env, self._dbs = self._env, None, None
        if env is not None:
            await asyncio.get_running_loop().run_in_executor(executor, env.close)
        self._executor = None
        executor.shutdown(wait=False)


# -- blocking parts, run in the ledger's worker thread ------------------------------------------------------


def _open(path: Path) -> tuple[lmdb.Environment, _Dbs, list[str]]:
    env = open_private(path, map_size=_MAP_SIZE, max_dbs=2)
    try:
        dbs = _Dbs(env.open_db(DB_TOTALS), env.open_db(DB_META))
        with env.begin(write=True) as txn:
            found = txn.get(_META_FORMAT, db=dbs.meta)
            if found is None:
                txn.put(_META_FORMAT, _pack(FORMAT_VERSION), db=dbs.meta)
            elif found != _pack(FORMAT_VERSION):
                raise RuntimeError(f"the cost ledger at {path} is of another format ({found!r}); "
                                   f"move it aside or use a server version that reads it")
            known = _read_workflows(txn, dbs)
    except BaseException:
        env.close()
        raise
    return env, dbs, known


def _write(env: lmdb.Environment, dbs: _Dbs, rows: dict[_Row, _Totals], max_workflows: int) -> list[str]:
    """Add ``rows`` to the totals in one transaction; return the admitted workflow tags."""
    with env.begin(write=True) as txn:
        admitted = _read_workflows(txn, dbs)
        allowed = set(admitted[:max_workflows])
        grown = False
        merged: dict[_Row, _Totals] = {}
        for row, totals in rows.items():  # in first-recorded order, so the first tags seen are admitted
            tag = row[5]
            if tag not in allowed and tag not in _UNCOUNTED_TAGS:
                if len(admitted) < max_workflows:
                    admitted.append(tag)
                    allowed.add(tag)
                    grown = True
                else:
                    row = (*row[:5], OTHER_WORKFLOW)
            _add(merged, row, totals)
        if grown:
            txn.put(_META_WORKFLOWS, _pack(admitted), db=dbs.meta)
        for row, totals in merged.items():
            key = _row_key(row)
            raw = txn.get(key, db=dbs.totals)
            if raw is not None:
                old = _decode(raw)
                if old is None:
                    log.error("cost ledger row %r is damaged; replacing it", row)
                else:
                    totals = [a + b for a, b in zip(old[1], totals)]
            txn.put(key, _pack([FORMAT_VERSION, *row[1:], *totals]), db=dbs.totals)
    return admitted[:max_workflows]


def _scan(env: lmdb.Environment, dbs: _Dbs, first: str | None, last: str | None,
          filters: tuple[tuple[int, str], ...], indexes: tuple[int, ...]) -> dict[tuple, _Totals]:
    sums: dict[tuple, _Totals] = {}
    end = last.encode() if last is not None else None
    with env.begin(write=False) as txn, txn.cursor(db=dbs.totals) as cursor:
        if not (cursor.set_range(first.encode()) if first is not None else cursor.first()):
            return sums
        for key, raw in cursor.iternext():
            day = key[:10]
            if end is not None and day > end:
                break
            decoded = _decode(raw)
            if decoded is None:
                log.error("cost ledger row %s of %s is damaged; skipping it", key[10:].hex(), day.decode())
                continue
            row = (day.decode(), *decoded[0])
            if all(row[i] == value for i, value in filters):
                _add(sums, tuple(row[i] for i in indexes), decoded[1])
    return sums


def _read_workflows(txn: lmdb.Transaction, dbs: _Dbs) -> list[str]:
    raw = txn.get(_META_WORKFLOWS, db=dbs.meta)
    if raw is None:
        return []
    try:
        tags = msgpack.unpackb(raw, raw=False)
    except Exception:
        tags = None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        log.error("cost ledger workflow tags are damaged; starting a new set")
        return []
    return tags


# -- records ------------------------------------------------------------------------------------------------


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _row_key(row: _Row) -> bytes:
    return row[0].encode("ascii") + hashlib.blake2b(_pack(list(row[1:])), digest_size=16).digest()


def _decode(raw: bytes) -> tuple[tuple[str, ...], _Totals] | None:
    """``(labels without the day, totals)`` of a stored row, or None if it is damaged."""
    try:
        fields = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    if not (isinstance(fields, list) and len(fields) == 12 and fields[0] == FORMAT_VERSION):
        return None
    labels, totals = tuple(fields[1:6]), fields[6:]
    if not (
        all(isinstance(label, str) for label in labels)
        and all(type(value) is int for value in totals[:3])
        and all(type(value) is float for value in totals[3:])
    ):
        return None
    return labels, totals


def _add(sums: dict, key: tuple, totals: _Totals) -> None:
    current = sums.get(key)
    if current is None:
        sums[key] = list(totals)
    else:
        for i, value in enumerate(totals):
            current[i] += value


def _day_of(now: float) -> tuple[str, float, float]:
    """``("YYYY-MM-DD", start, end)`` of the UTC day holding unix time ``now``."""
    t = time.gmtime(now)
    start = float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)))
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", start, start + 86400.0


def _check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    if isinstance(group_by, str):
        raise ValueError(f"group_by must be a list of field names, not the string {group_by!r}")
    groups = tuple(group_by)
    unknown = [name for name in groups if name not in GROUP_FIELDS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(map(repr, unknown))}; "
                         f"group_by takes any of {', '.join(GROUP_FIELDS)}")
    if len(set(groups)) != len(groups):
        raise ValueError(f"group_by names a field twice: {list(groups)}")
    return groups


def _check_day(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _DAY.fullmatch(value):
        raise ValueError(f"{name} must be a date as YYYY-MM-DD, got {value!r}")
    try:
        date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} is not a valid date: {value!r}") from None
    return value

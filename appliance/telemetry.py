"""Prometheus metrics (``appliance_*``, per model and version) and the JSON access log."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from appliance.keys import LANES

if TYPE_CHECKING:
    from appliance.admission import GateState

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class PendingIncrements:
    """Counter and gauge increments gathered on the event loop and applied to their Prometheus children in one
    pass: a request pays a dict update instead of a locked increment per metric.

    Registered in a registry *before* the metrics it feeds, it applies what is pending whenever that registry is
    collected (``/metrics``, ``get_sample_value``), so a scrape never misses an increment; with several worker
    processes each applies its own on the access log's flush timer (0.2 s) and before its own exposition.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._pending: dict[Any, float] = {}
        self._sources: list[Callable[[Callable[[Any, float], None]], None]] = []
        if registry is not None:
            registry.register(self)

    def add_source(self, source: Callable[[Callable[[Any, float], None]], None]) -> None:
        """Have every flush first call ``source(add)``: a component that tallies its own way (the cost ledger, by
        row) hands its increments over then instead of on each event."""
        self._sources.append(source)

    def add(self, child: Any, amount: float = 1.0) -> None:
        """Count ``amount`` on a counter or gauge child (a gauge's amount may be negative)."""
        pending = self._pending
        pending[child] = pending.get(child, 0.0) + amount

    def flush(self) -> None:
        """Apply every pending increment."""
        for source in self._sources:
            source(self.add)
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for child, amount in pending.items():
            if amount:
                child.inc(amount)

    def describe(self) -> list:
        """No metrics of its own (and no collection at registration)."""
        return []

    def collect(self) -> list:
        """Apply what is pending before the registry collects the metrics registered after this."""
        self.flush()
        return []


def multiprocess_dir() -> str | None:
    """The folder shared by worker processes for their metrics, when the server runs several."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


# name -> (help, per-lane, the value of a gate's state, multiprocess mode: how worker processes' values combine)
LANE_GAUGES: dict[str, tuple[str, bool, Callable[[GateState, str], float], str]] = {
    "appliance_lane_queue_depth": ("Requests waiting at a model version's admission gate, by lane", True,
                                   lambda gate, lane: gate.waiting[lane], "livesum"),
    "appliance_lane_estimated_wait_seconds": ("The wait a request of this lane arriving now would be estimated "
                                              "at", True, lambda gate, lane: gate.estimated_wait_s[lane], "livemax"),
    "appliance_lane_queue_capacity": ("The most requests that may wait at the gate, both lanes together", False,
                                      lambda gate, lane: gate.max_waiting, "livesum"),
    "appliance_lane_active": ("Places taken past the gate: the sequences or rows of the requests running or in "
                              "the model's own queue", False,
                              lambda gate, lane: gate.active, "livesum"),
    "appliance_lane_active_limit": ("The places of the gate: the most sequences or rows let past it at once", False,
                                    lambda gate, lane: gate.limit, "livesum"),
}


def _lane_labels(per_lane: bool) -> tuple[str, ...]:
    return ("model", "version", "lane") if per_lane else ("model", "version")


class LaneGauges:
    """The admission gates' queues as ``appliance_lane_*`` gauges, per model and version (and lane where the
    value is a lane's), read from the live gates so that the request path pays nothing for them.

    In one process this is a collector: the gates are read when the registry is collected (a scrape, or
    ``get_sample_value``). With several worker processes (``PROMETHEUS_MULTIPROC_DIR``), ``/metrics`` exposes only
    what the workers' shared files hold, so a collector would never be seen; there :meth:`mirror`, called on the
    metrics flush timer (every 0.2 s), writes the same readings into file-backed gauges. Each worker has gates of
    its own (its own queues, in front of its own copy of each model), so depth, capacity, active and limit are
    summed over the live workers and the estimated wait is the longest any worker would give; a retired version
    reads 0 there until its worker exits, and a scrape sees the other workers' gates as of their last flush (at most
    0.2 s old) and its own worker's as they are.
    """

    def __init__(self, registry: CollectorRegistry, read: Callable[[], Iterable[GateState]]) -> None:
        self._read = read
        self._files: dict[str, Gauge] | None = None
        self._written: set[tuple[str, tuple[str, ...]]] = set()
        if multiprocess_dir() is None:
            registry.register(self)
        else:
            # Not in any registry: the multiprocess collector reads their files.
            self._files = {name: Gauge(name, description, _lane_labels(per_lane), registry=None,
                                       multiprocess_mode=mode)
                           for name, (description, per_lane, _, mode) in LANE_GAUGES.items()}

    def _values(self) -> Iterator[tuple[str, tuple[str, ...], float]]:
        for gate in self._read():
            labels = (gate.model, str(gate.version))
            for name, (_, per_lane, value, _) in LANE_GAUGES.items():
                if per_lane:
                    for lane in LANES:
                        yield name, (*labels, lane), float(value(gate, lane))
                else:
                    yield name, labels, float(value(gate, ""))

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {name: GaugeMetricFamily(name, description, labels=_lane_labels(per_lane))
                for name, (description, per_lane, _, _) in LANE_GAUGES.items()}

    def describe(self) -> list[Metric]:
        """The families, without samples (the registry learns the names without reading the gates)."""
        return list(self._families().values())

    def collect(self) -> list[Metric]:
        """The gates now (one process)."""
        families = self._families()
        for name, labels, value in self._values():
            families[name].add_metric(labels, value)
        return list(families.values())

    def mirror(self) -> None:
        """Write the gates now into the worker's shared metric files (several workers; no-op in one process)."""
        if self._files is None:
            return
        seen = set()
        for name, labels, value in self._values():
            self._files[name].labels(*labels).set(value)
            seen.add((name, labels))
        for name, labels in self._written - seen:  # a version retired, or admission turned off
            self._files[name].labels(*labels).set(0.0)
        self._written = seen


class Metrics:
    """The server's collectors, registered in their own registry (one per app, so tests stay independent).

    With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor), values live in files
    shared by the workers and :meth:`exposition` sums them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Counters and histograms without a ``_created`` series each (prometheus_client's default doubles them).
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        self.pending = PendingIncrements(self.registry)  # first, so that it is collected before the others
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.lanes: LaneGauges | None = None  # see watch_lanes
        labels = ("model", "version")
        self.requests = Counter(
            "appliance_requests", "Inference requests by final HTTP status", (*labels, "status"), registry=self.registry
        )
        self.request_duration = Histogram(
            "appliance_request_duration_seconds", "Time from request parsed to response ready", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_duration = Histogram(
            "appliance_queue_duration_seconds", "Time a request waited in its model's queue", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.compute_duration = Histogram(
            "appliance_compute_duration_seconds", "Engine time per batch", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "appliance_batch_size", "Rows per executed batch", labels, buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.in_flight = Gauge(
            "appliance_requests_in_flight", "Requests being handled", labels, registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.load_duration = Gauge(
            "appliance_model_load_duration_seconds", "Time the last load of this version took", labels,
            registry=self.registry, multiprocess_mode="livemax",
        )
        self.warmup_duration = Gauge(
            "appliance_model_warmup_duration_seconds", "Time the last warmup of this version took", labels,
            registry=self.registry, multiprocess_mode="livemax",
        )
        self.model_ready = Gauge(
            "appliance_model_ready", "1 while this version serves traffic", labels, registry=self.registry,
            multiprocess_mode="livemin",
        )
        self._generation_collectors(labels)
        self._cache_and_auth_collectors()

    def _cache_and_auth_collectors(self) -> None:
        reg = self.registry
        scoped = ("model", "scope")  # scope: a hash of the cache scope, never the scope or a key itself
        self.cache_lookups = Counter("appliance_cache_lookups", "Response cache lookups by result (hit, miss, "
                                     "bypass)", (*scoped, "result"), registry=reg)
        self.cache_memory_hits = Counter("appliance_cache_memory_hits", "Response cache hits answered from the "
                                         "serving worker's memory without a read of LMDB (a part of the hits)",
                                         scoped, registry=reg)
        self.cache_evictions = Counter("appliance_cache_evictions", "Entries evicted to keep the size cap", scoped,
                                       registry=reg)
        self.cache_stored_bytes = Counter("appliance_cache_stored_bytes", "Bytes written to the response cache",
                                          scoped, registry=reg)
        self.cache_served_bytes = Counter("appliance_cache_served_bytes", "Bytes answered from the response cache",
                                          scoped, registry=reg)
        self.cache_errors = Counter("appliance_cache_errors", "Response cache failures (served as misses)",
                                    ("operation",), registry=reg)
        self.cache_size = Gauge("appliance_cache_size_bytes", "Payload bytes held by the response cache", (),
                                registry=reg, multiprocess_mode="mostrecent")
        self.cache_entries = Gauge("appliance_cache_entries", "Entries held by the response cache", (),
                                   registry=reg, multiprocess_mode="mostrecent")
        self.route_decisions = Counter("appliance_route_decisions", "Routing and overflow decisions by where the "
                                       "request went and why (named, complexity, overflow, failover)",
                                       ("router", "place", "kind"), registry=reg)
        self.admission_rejected = Counter("appliance_admission_rejected", "Requests not admitted to a local model "
                                          "(over the lane's wait or the queue full)", ("model", "lane"),
                                          registry=reg)
        self.traces_dropped = Counter("appliance_traces_dropped", "Sampled requests whose spans were not exported: "
                                      "the span export process fell behind or stopped ([tracing] on)",
                                      registry=reg)
        self.auth_rejected = Counter("appliance_auth_rejected", "Requests refused by authentication, "
                                     "authorization or limits", ("reason",), registry=reg)
        self.upstream_requests = Counter("appliance_upstream_requests", "Calls to cloud upstreams by outcome (ok, "
                                         "client_error, rate_limited, failed, refused, cancelled, broke_off)",
                                         ("upstream", "outcome"), registry=reg)
        self.upstream_retries = Counter("appliance_upstream_retries", "Retries of upstream calls by what failed "
                                        "(connect, timeout, status)", ("upstream", "reason"), registry=reg)
        self.upstream_breaker = Gauge("appliance_upstream_breaker_state", "Circuit breaker per upstream: 0 closed, "
                                      "1 half-open, 2 open", ("upstream",), registry=reg, multiprocess_mode="max")

    def _generation_collectors(self, labels: tuple[str, ...]) -> None:
        reg = self.registry
        self.time_to_first_token = Histogram("appliance_time_to_first_token_seconds", "Request to first token",
                                             labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.inter_token = Histogram("appliance_inter_token_latency_seconds", "Between streamed tokens", labels,
                                     buckets=LATENCY_BUCKETS, registry=reg)
        self.generation_duration = Histogram("appliance_generation_duration_seconds", "Request to last token",
                                             labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.generation_queue = Histogram("appliance_generation_queue_seconds", "Waiting for a KV-cache slot",
                                          labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens read", labels, registry=reg)
        self.cached_prompt_tokens = Counter("appliance_cached_prompt_tokens",
                                            "Prompt tokens copied from a prefix a KV-cache row held, not computed",
                                            labels, registry=reg)
        self.generated_tokens = Counter("appliance_generated_tokens", "Tokens generated", labels, registry=reg)
        self.running_sequences = Gauge("appliance_running_sequences", "Sequences holding a KV-cache slot", labels,
                                       registry=reg, multiprocess_mode="livesum")
        self.waiting_sequences = Gauge("appliance_waiting_sequences", "Sequences waiting for a slot", labels,
                                       registry=reg, multiprocess_mode="livesum")
        self.kv_cache_usage = Gauge("appliance_kv_cache_usage_ratio", "Share of KV-cache positions in use", labels,
                                    registry=reg, multiprocess_mode="livemax")

    def watch_lanes(self, read: Callable[[], Iterable[GateState]]) -> None:
        """Expose the admission gates that ``read`` returns (on the event loop) as ``appliance_lane_*`` gauges
        (in place of any watched before)."""
        if self.lanes is not None and multiprocess_dir() is None:
            self.registry.unregister(self.lanes)
        self.lanes = LaneGauges(self.registry, read)

    def flush(self) -> None:
        """Apply pending increments and, with several workers, write the lane gauges to the shared files (called
        on the server's flush timer)."""
        self.pending.flush()
        if self.lanes is not None:
            self.lanes.mirror()

    def upstream_call(self, upstream: str, outcome: str) -> None:
        """Count one upstream call's outcome."""
        self.pending.add(self.upstream_requests.labels(upstream, outcome))

    def upstream_retry(self, upstream: str, reason: str) -> None:
        """Count one retry of an upstream call."""
        self.pending.add(self.upstream_retries.labels(upstream, reason))

    def upstream_breaker_state(self, upstream: str, state: str) -> None:
        """Record an upstream's circuit-breaker state."""
        self.upstream_breaker.labels(upstream).set(BREAKER_STATES[state])

    def exposition(self) -> bytes:
        """The Prometheus text exposition: this process's registry, or the sum over all worker processes."""
        self.flush()
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined)
        return generate_latest(combined)

    def for_version(self, model: str, version: int) -> VersionMetrics:
        """Children bound to one model version, so the hot path skips the label lookups."""
        key = (model, str(version))
        return VersionMetrics(
            pending=self.pending,
            time_to_first_token=self.time_to_first_token.labels(*key),
            inter_token=self.inter_token.labels(*key),
            generation_duration=self.generation_duration.labels(*key),
            generation_queue=self.generation_queue.labels(*key),
            prompt_tokens=self.prompt_tokens.labels(*key),
            cached_prompt_tokens=self.cached_prompt_tokens.labels(*key),
            generated_tokens=self.generated_tokens.labels(*key),
            running_sequences=self.running_sequences.labels(*key),
            waiting_sequences=self.waiting_sequences.labels(*key),
            kv_cache_usage=self.kv_cache_usage.labels(*key),
            queue_duration=self.queue_duration.labels(*key),
            compute_duration=self.compute_duration.labels(*key),
            batch_size=self.batch_size.labels(*key),
            in_flight=self.in_flight.labels(*key),
            ready=self.model_ready.labels(*key),
            load_duration=self.load_duration.labels(*key),
            warmup_duration=self.warmup_duration.labels(*key),
        )

    def observe_request(self, model: str, version: str, status: int, seconds: float) -> None:
        """Count one finished request under its status and record its duration."""
        key = (model, version, status)
        children = self._request_children.get(key)
        if children is None:
            children = self.requests.labels(model, version, str(status)), self.request_duration.labels(model, version)
            self._request_children[key] = children
        self.pending.add(children[0])
        children[1].observe(seconds)


@dataclass(slots=True)
class VersionMetrics:
    """Metric children of one model version."""

    queue_duration: Histogram
    compute_duration: Histogram
    batch_size: Histogram
    in_flight: Gauge
    ready: Gauge
    load_duration: Gauge
    warmup_duration: Gauge

    time_to_first_token: Histogram
    inter_token: Histogram
    generation_duration: Histogram
    generation_queue: Histogram
    prompt_tokens: Counter
    cached_prompt_tokens: Counter
    generated_tokens: Counter
    running_sequences: Gauge
    waiting_sequences: Gauge
    kv_cache_usage: Gauge
    pending: PendingIncrements = field(default_factory=PendingIncrements)

    def started(self) -> None:
        """One more request in flight on this version."""
        self.pending.add(self.in_flight, 1.0)

    def finished(self) -> None:
        """One request fewer in flight."""
        self.pending.add(self.in_flight, -1.0)

    def observe_generation(self, stats: dict[str, float]) -> None:
        """Record the generation scheduler's state after a step."""
        self.running_sequences.set(stats["running"])
        self.waiting_sequences.set(stats["waiting"])
        self.kv_cache_usage.set(stats["kv_used"])

    def observe_batch(self, rows: int, compute_s: float) -> None:
        """Record one executed batch."""
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_s)


class AccessLog:
    """One JSON line per request; buffered, flushed by :meth:`flush` (the server calls it on a timer and at exit).

    Never carries a payload: only ids, model, status and timings.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self._stream = stream or sys.stdout
        self.enabled = enabled
        self._lines: list[str] = []

    def record(
        self,
        *,
        request_id: str,
        method: str,
        path: str,
        status: int,
        total_s: float,
        model: str = "",
        version: str = "",
        queue_s: float = 0.0,
        compute_s: float = 0.0,
        tenant: str = "",
        key_id: str = "",
        cache: str = "",
        place: str = "",
        route: str = "",
    ) -> None:
        """Add one request's line."""
        if not self.enabled:
            return
        self._lines.append(
            orjson.dumps(
                {
                    "ts": round(time.time(), 6),
                    "type": "access",
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "model": model,
                    "version": version,
                    "status": status,
                    "queue_ms": round(queue_s * 1000, 3),
                    "compute_ms": round(compute_s * 1000, 3),
                    "total_ms": round(total_s * 1000, 3),
                    "tenant": tenant,
                    "key": key_id,
                    "cache": cache,
                    "place": place,
                    "route": route,
                },
            ).decode()
        )
        if len(self._lines) >= 512:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        # Written in chunks of whole lines under PIPE_BUF, so lines from several workers never interleave.
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) + 1 > 4096:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        self._write(chunk)

    def _write(self, lines: list[str]) -> None:
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()

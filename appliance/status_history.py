"""The recent past of the server's own metrics, for the status page.

One task (:func:`sample_forever`) reads a few Prometheus series every ``interval_s`` into a ring of
:class:`Reading`s; the request path pays nothing for it. What the page plots comes from the differences between
readings: rates of counters, percentiles of histograms from their bucket deltas (``histogram_quantile``'s linear
interpolation), ratios (cache hits, fallbacks). :func:`derive` makes those figures for any two readings, so the
status endpoint uses it both for the points of the charts (consecutive readings) and for a window (a reading
taken now against the one from ``window_s`` ago).

In one process the series are read from the app's registry on the event loop (a handful of families: well under
a millisecond). With several worker processes they are read from the shared metric files, in a worker thread, so
that they are the sums over every worker, like ``/metrics``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

from appliance.telemetry import Metrics, multiprocess_dir

log = logging.getLogger("appliance.status")

HISTOGRAMS = {"request": "appliance_request_duration_seconds", "ttft": "appliance_time_to_first_token_seconds",
              "itl": "appliance_inter_token_latency_seconds"}
# Sample name -> the labels kept (summed over the others).
COUNTERS: dict[str, tuple[str, ...]] = {
    "appliance_requests_total": ("model", "status"),
    "appliance_cache_lookups_total": ("model", "result"),
    "appliance_route_decisions_total": ("kind", "place"),
    "appliance_generated_tokens_total": ("model",),
    "appliance_upstream_requests_total": ("upstream", "outcome"),
}
GAUGES: dict[str, tuple[str, ...]] = {
    "appliance_lane_queue_depth": ("model", "version", "lane"),
    "appliance_lane_estimated_wait_seconds": ("model", "version", "lane"),
    "appliance_lane_queue_capacity": ("model", "version"),
    "appliance_lane_active": ("model", "version"),
    "appliance_lane_active_limit": ("model", "version"),
    "appliance_running_sequences": ("model", "version"),
    "appliance_waiting_sequences": ("model", "version"),
    "appliance_kv_cache_usage_ratio": ("model", "version"),
    "appliance_gpu_utilization_ratio": ("gpu", "name"),
    "appliance_gpu_memory_used_bytes": ("gpu", "name"),
    "appliance_gpu_memory_total_bytes": ("gpu", "name"),
    "appliance_gpu_temperature_celsius": ("gpu", "name"),
    "appliance_gpu_power_watts": ("gpu", "name"),
}
SAMPLE_NAMES = frozenset([f"{name}_bucket" for name in HISTOGRAMS.values()] + list(COUNTERS) + list(GAUGES))
ROUTE_KINDS = ("named", "complexity", "overflow", "failover")
FALLBACKS = ("overflow", "failover")
QUANTILES = (("p50", 0.5), ("p99", 0.99))


@dataclass(frozen=True, slots=True)
class Reading:
    """The series the status page needs, at one moment (``t``: unix time)."""

    t: float
    # family key ("request", "ttft", "itl") -> model -> cumulative bucket counts, in the order of ``bounds``
    histograms: dict[str, dict[str, tuple[float, ...]]]
    bounds: dict[str, tuple[float, ...]]  # family key -> the buckets' upper bounds, ascending, +Inf last
    counters: dict[str, dict[tuple[str, ...], float]]  # sample name -> kept label values -> value
    gauges: dict[str, dict[tuple[str, ...], float]]

    @classmethod
    def of(cls, samples: Iterable[Sample], t: float) -> Reading:
        """A reading made of Prometheus samples (any others are ignored)."""
        buckets: dict[str, dict[str, dict[float, float]]] = {key: {} for key in HISTOGRAMS}
        counters: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in COUNTERS}
        gauges: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in GAUGES}
        family_of = {f"{name}_bucket": key for key, name in HISTOGRAMS.items()}
        for sample in samples:
            name, labels = sample.name, sample.labels
            if name in family_of:
                per_bound = buckets[family_of[name]].setdefault(labels.get("model", ""), {})
                bound = float(labels["le"])
                per_bound[bound] = per_bound.get(bound, 0.0) + sample.value  # summed over versions
            elif name in COUNTERS:
                key = tuple(labels.get(label, "") for label in COUNTERS[name])
                counters[name][key] = counters[name].get(key, 0.0) + sample.value
            elif name in GAUGES:
                key = tuple(labels.get(label, "") for label in GAUGES[name])
                gauges[name][key] = gauges[name].get(key, 0.0) + sample.value
        histograms: dict[str, dict[str, tuple[float, ...]]] = {}
        bounds: dict[str, tuple[float, ...]] = {}
        for key, models in buckets.items():
            family_bounds = sorted({bound for per_bound in models.values() for bound in per_bound})
            bounds[key] = tuple(family_bounds)
            histograms[key] = {model: tuple(per_bound.get(b, 0.0) for b in family_bounds)
                               for model, per_bound in models.items()}
        return cls(t, histograms, bounds, counters, gauges)


def quantile(q: float, bounds: tuple[float, ...], counts: tuple[float, ...]) -> float | None:
    """The ``q`` quantile of cumulative bucket ``counts`` (Prometheus's ``histogram_quantile``): linear within
    the bucket that holds it; the largest finite bound when it falls in the +Inf bucket; ``None`` without data."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(newer: tuple[float, ...], older: tuple[float, ...] | None) -> tuple[float, ...]:
    """Bucket counts observed between two readings; a series that went backwards (a restarted worker) counts
    from zero."""
    if older is None or len(older) != len(newer) or any(n < o for n, o in zip(newer, older)):
        return newer
    return tuple(n - o for n, o in zip(newer, older))


def _merged(histogram: dict[str, tuple[float, ...]], model: str | None) -> tuple[float, ...] | None:
    if model is not None:
        return histogram.get(model)
    rows = list(histogram.values())
    return tuple(map(sum, zip(*rows))) if rows else None


def _counter_delta(now: Reading, then: Reading | None, name: str, match: Callable[[tuple[str, ...]], bool],
                   ) -> dict[tuple[str, ...], float]:
    older = then.counters[name] if then is not None else {}
    result = {}
    for key, value in now.counters[name].items():
        if match(key):
            before = older.get(key, 0.0)
            result[key] = value - before if value >= before else value
    return result


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def derive(now: Reading, then: Reading | None, model: str | None = None) -> dict[str, Any]:
    """What happened between ``then`` (``None``: the start) and ``now``, for every model or one ``model``:
    request rates by status class, latency percentiles, token rate, cache hit ratio and, over every model,
    routing decisions and the fallback ratio. Percentiles and ratios are ``None`` where nothing was observed."""
    seconds = max(now.t - then.t, 1e-9) if then is not None else None
    of_model = (lambda key: True) if model is None else (lambda key: key[0] == model)
    figures: dict[str, Any] = {"seconds": round(seconds, 3) if seconds is not None else None}

    statuses = _counter_delta(now, then, "appliance_requests_total", of_model)
    by_class = {"2xx": 0.0, "4xx": 0.0, "5xx": 0.0}
    for (_, status), count in statuses.items():
        by_class["5xx" if status[:1] == "5" else "4xx" if status[:1] == "4" else "2xx"] += count
    total = sum(by_class.values())
    figures["requests"] = total
    figures["requests_per_s"] = total / seconds if seconds else None
    figures["status_per_s"] = {name: count / seconds if seconds else None for name, count in by_class.items()}
    figures["error_ratio"] = _ratio(by_class["5xx"], total)

    for key in HISTOGRAMS:
        newer = _merged(now.histograms[key], model)
        older = _merged(then.histograms[key], model) if then is not None else None
        counts = _delta(newer, older) if newer is not None else ()
        for name, q in QUANTILES:
            figures[f"{key}_{name}_s"] = quantile(q, now.bounds[key], counts)
        figures[f"{key}_count"] = counts[-1] if counts else 0.0

    tokens = sum(_counter_delta(now, then, "appliance_generated_tokens_total", of_model).values())
    figures["tokens_per_s"] = tokens / seconds if seconds else None

    lookups = {"hit": 0.0, "miss": 0.0, "bypass": 0.0}
    for (_, result), count in _counter_delta(now, then, "appliance_cache_lookups_total", of_model).items():
        lookups[result] = lookups.get(result, 0.0) + count
    figures["cache"] = lookups
    figures["cache_hit_ratio"] = _ratio(lookups["hit"], lookups["hit"] + lookups["miss"])

    if model is None:
        routes = {kind: {"local": 0.0, "cloud": 0.0} for kind in ROUTE_KINDS}
        for (kind, place), count in _counter_delta(now, then, "appliance_route_decisions_total",
                                                   lambda key: True).items():
            routes.setdefault(kind, {}).setdefault(place, 0.0)
            routes[kind][place] += count
        sums = {kind: sum(places.values()) for kind, places in routes.items()}
        figures["routes"] = routes
        figures["fallback_ratio"] = _ratio(sum(sums.get(k, 0.0) for k in FALLBACKS),
                                           sums.get("named", 0.0) + sums.get("complexity", 0.0))
        outcomes: dict[str, dict[str, float]] = {}
        for (upstream, outcome), count in _counter_delta(now, then, "appliance_upstream_requests_total",
                                                         lambda key: True).items():
            outcomes.setdefault(upstream, {})[outcome] = count
        figures["upstream_calls"] = outcomes
    return figures


class StatusHistory:
    """A ring of readings, one every ``interval_s``, kept for ``keep_s``; with each its chart point (what happened
    since the reading before), computed once when it is added."""

    def __init__(self, interval_s: float = 5.0, keep_s: float = 900.0) -> None:
        if not interval_s > 0 or not keep_s >= interval_s:
            raise ValueError(f"interval_s must be positive and keep_s at least as long; got {interval_s}, {keep_s}")
        self.interval_s = interval_s
        self.keep_s = keep_s
        self.started_at: float | None = None  # when the server started (set by whoever runs the sampler)
        points = int(keep_s / interval_s)  # the intervals in keep_s, between one more readings
        self._readings: collections.deque[Reading] = collections.deque(maxlen=points + 1)
        self._points: collections.deque[dict[str, Any]] = collections.deque(maxlen=points)

    def add(self, reading: Reading) -> None:
        """Keep a reading (the oldest goes when the ring is full) and its point."""
        if self._readings:
            self._points.append(_point(reading, self._readings[-1]))
        self._readings.append(reading)

    @property
    def first(self) -> Reading | None:
        """The oldest reading kept."""
        return self._readings[0] if self._readings else None

    def before(self, t: float) -> Reading | None:
        """The newest reading taken at or before ``t``; else the oldest kept (``None`` when there is none)."""
        chosen = self.first
        for reading in self._readings:
            if reading.t > t:
                break
            chosen = reading
        return chosen

    def series(self) -> dict[str, Any]:
        """The chart points as columns: ``t`` (the end of each interval, unix time) and one list per figure."""
        points = list(self._points)
        columns: dict[str, Any] = {"interval_s": self.interval_s, "t": [p["t"] for p in points]}
        for name in points[0] if points else ():
            if name != "t" and not isinstance(points[0][name], dict):
                columns[name] = [p[name] for p in points]
        for group in ("routes_per_s", "waiting", "gpu_utilization"):
            keys = sorted({key for p in points for key in p[group]})
            columns[group] = {key: [p[group].get(key) for p in points] for key in keys}
        return columns


def _point(now: Reading, then: Reading) -> dict[str, Any]:
    figures = derive(now, then)
    seconds = figures["seconds"]
    waiting: dict[str, float] = {}
    for (_, _, lane), value in now.gauges["appliance_lane_queue_depth"].items():
        waiting[lane] = waiting.get(lane, 0.0) + value
    point = {"t": round(now.t, 3), "requests_per_s": figures["requests_per_s"],
             **{f"{name}_per_s": value for name, value in figures["status_per_s"].items()},
             "tokens_per_s": figures["tokens_per_s"], "cache_hit_ratio": figures["cache_hit_ratio"],
             "fallback_ratio": figures["fallback_ratio"],
             "routes_per_s": {kind: sum(places.values()) / seconds for kind, places in figures["routes"].items()},
             "waiting": waiting,
             "gpu_utilization": {gpu: value for (gpu, _), value in now.gauges["appliance_gpu_utilization_ratio"].items()}}
    for key in HISTOGRAMS:
        for name, _ in QUANTILES:
            point[f"{key}_{name}_s"] = figures[f"{key}_{name}_s"]
    return point


def _read_files() -> list[Sample]:
    return [sample for metric in MultiProcessCollector(None).collect() for sample in metric.samples
            if sample.name in SAMPLE_NAMES]


async def read_now(metrics: Metrics) -> Reading:
    """A reading of the server's metrics now: this process's registry (on the loop), or with several worker
    processes the sum of their shared files (in a worker thread)."""
    t = time.time()
    if multiprocess_dir() is None:
        metrics.pending.flush()  # a restricted collection skips the pending increments (a collector without names)
        families = metrics.registry.restricted_registry(SAMPLE_NAMES).collect()
        return Reading.of((sample for family in families for sample in family.samples), t)
    metrics.flush()  # this worker's counts into its files first
    samples = await asyncio.get_running_loop().run_in_executor(None, _read_files)
    return Reading.of(samples, t)


async def sample_forever(history: StatusHistory, metrics: Metrics) -> None:
    """Add a reading to ``history`` now and every ``interval_s`` until cancelled (a failed read is logged once)."""
    failing = False
    while True:
        try:
            history.add(await read_now(metrics))
            failing = False
        except Exception:  # noqa: BLE001 - the status page's history must never stop the server
            if not failing:
                log.exception("status history: reading the metrics failed; retrying every %.1f s",
                              history.interval_s)
            failing = True
        await asyncio.sleep(history.interval_s)

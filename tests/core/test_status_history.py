"""The status page's history: percentiles from bucket deltas, rates and ratios between readings, and the ring."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.samples import Sample

from appliance.status_history import Reading, StatusHistory, derive, quantile

BOUNDS = (0.1, 0.2, 0.5, math.inf)


def test_quantiles_interpolate_within_the_bucket_like_prometheus():
    # 10 observations: 4 at or under 0.1, 4 more under 0.2, 2 more under 0.5.
    counts = (4.0, 8.0, 10.0, 10.0)
    assert quantile(0.5, BOUNDS, counts) == pytest.approx(0.1 + 0.1 * (5 - 4) / 4)
    assert quantile(0.2, BOUNDS, counts) == pytest.approx(0.05)  # the first bucket starts at 0
    assert quantile(0.99, BOUNDS, counts) == pytest.approx(0.2 + 0.3 * (9.9 - 8) / 2)
    assert quantile(0.99, BOUNDS, (0.0, 0.0, 1.0, 3.0)) == 0.5  # in +Inf: the largest finite bound
    assert quantile(0.5, BOUNDS, (0.0, 0.0, 0.0, 0.0)) is None and quantile(0.5, (), ()) is None


def _reading(t: float, registry: CollectorRegistry) -> Reading:
    return Reading.of((sample for family in registry.collect() for sample in family.samples), t)


def test_figures_between_two_readings_are_what_happened_in_between():
    registry = CollectorRegistry()
    duration = Histogram("appliance_request_duration_seconds", "", ("model", "version"), buckets=BOUNDS[:-1],
                         registry=registry)
    requests = Counter("appliance_requests", "", ("model", "version", "status"), registry=registry)
    routes = Counter("appliance_route_decisions", "", ("router", "place", "kind"), registry=registry)
    lookups = Counter("appliance_cache_lookups", "", ("model", "scope", "result"), registry=registry)
    for _ in range(100):  # before the window: slow
        duration.labels("a", "1").observe(0.4)
        requests.labels("a", "1", "200").inc()
    before = _reading(1000.0, registry)
    for _ in range(9):
        duration.labels("a", "2").observe(0.05)  # another version of the same model
        requests.labels("a", "2", "200").inc()
        routes.labels("-", "local", "named").inc()
        lookups.labels("a", "h", "miss").inc()
    duration.labels("b", "1").observe(0.15)
    requests.labels("b", "1", "503").inc()
    routes.labels("-", "local", "named").inc()
    routes.labels("-", "cloud", "overflow").inc(2)
    lookups.labels("a", "h", "hit").inc(3)
    lookups.labels("a", "h", "bypass").inc(5)
    after = _reading(1010.0, registry)

    every = derive(after, before)
    assert every["requests"] == 10 and every["requests_per_s"] == pytest.approx(1.0)
    assert every["status_per_s"] == {"2xx": pytest.approx(0.9), "4xx": 0.0, "5xx": pytest.approx(0.1)}
    assert every["error_ratio"] == pytest.approx(0.1)
    # Only the window's observations: nine at 0.05, one at 0.15 (the hundred at 0.4 came before).
    assert every["request_p50_s"] == pytest.approx(0.1 * 5 / 9)
    assert 0.1 < every["request_p99_s"] <= 0.2
    assert every["cache_hit_ratio"] == pytest.approx(3 / 12)  # bypasses are not cacheable: not in the ratio
    assert every["routes"]["overflow"] == {"local": 0.0, "cloud": 2.0}
    assert every["fallback_ratio"] == pytest.approx(2 / 10)

    only_a = derive(after, before, "a")
    assert only_a["requests"] == 9 and only_a["error_ratio"] == 0.0 and "routes" not in only_a
    since_start = derive(after, None)
    assert since_start["requests"] == 110 and since_start["requests_per_s"] is None


def test_a_counter_that_went_backwards_counts_from_zero():
    older = Reading.of([Sample("appliance_requests_total", {"model": "a", "status": "200"}, 50.0, None, None)], 0.0)
    newer = Reading.of([Sample("appliance_requests_total", {"model": "a", "status": "200"}, 4.0, None, None)], 2.0)
    assert derive(newer, older)["requests"] == 4  # a worker restarted: its 4 are new


def test_the_ring_keeps_its_span_and_one_point_per_interval():
    history = StatusHistory(interval_s=1.0, keep_s=3.0)
    registry = CollectorRegistry()
    requests = Counter("appliance_requests", "", ("model", "version", "status"), registry=registry)
    for second in range(6):
        requests.labels("a", "1", "200").inc(second)  # 0, 1, 2, ... requests in each second
        history.add(_reading(float(second), registry))
    series = history.series()
    assert series["t"] == [3.0, 4.0, 5.0]  # four readings kept: three points between them
    assert series["requests_per_s"] == [pytest.approx(3.0), pytest.approx(4.0), pytest.approx(5.0)]
    assert history.first is not None and history.first.t == 2.0
    assert history.before(4.5).t == 4.0 and history.before(-1).t == 2.0
    with pytest.raises(ValueError):
        StatusHistory(interval_s=0)

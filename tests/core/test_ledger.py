"""The cost ledger: exact totals in a real LMDB file, across restarts and processes."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import appliance.ledger as ledger_module
from appliance.ledger import GROUP_FIELDS, PLACES, TOTAL_FIELDS, CostLedger, UsageRecord
from waiting import ManualClock, wait_until

DAY0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86400.0
REPO = Path(__file__).resolve().parents[2]


def make_ledger(path: Path, clock: Callable[[], float] | None = None, **options) -> CostLedger:
    options.setdefault("flush_interval_s", 3600)  # tests flush explicitly unless they say otherwise
    return CostLedger(path, CollectorRegistry(), clock=clock or ManualClock(DAY0 + 3600), **options)


def day_of(offset_days: int) -> str:
    return f"2026-01-{1 + offset_days:02d}"


def expected(records: Sequence[tuple[str, UsageRecord]], group_by: Sequence[str], **filters) -> list[dict]:
    """The reference aggregate, computed plainly in Python."""
    sums: dict[tuple, list] = {}
    for day, r in records:
        fields = {"day": day, "tenant": r.tenant, "key": r.key_id, "model": r.model, "place": r.place,
                  "workflow": r.workflow}
        if any(fields[name] != value for name, value in filters.items() if name not in ("since", "until")):
            continue
        if "since" in filters and day < filters["since"] or "until" in filters and day > filters["until"]:
            continue
        key = tuple(fields[name] for name in group_by)
        totals = sums.setdefault(key, [0, 0, 0, 0.0, 0.0, 0.0])
        for i, value in enumerate((1, r.input_tokens, r.output_tokens, r.compute_s, r.cost, r.cost_avoided)):
            totals[i] += value
    return [dict(zip(group_by, key)) | dict(zip(TOTAL_FIELDS, totals)) for key, totals in sorted(sums.items())]


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert [{k: v for k, v in row.items() if k not in TOTAL_FIELDS[3:]} for row in got] == [
        {k: v for k, v in row.items() if k not in TOTAL_FIELDS[3:]} for row in want
    ]
    for g, w in zip(got, want):
        for name in TOTAL_FIELDS[3:]:
            assert g[name] == pytest.approx(w[name], rel=1e-9, abs=1e-9), (g, w)


def random_record(rng: random.Random) -> UsageRecord:
    place = rng.choice(PLACES)
    cost = round(rng.uniform(0, 0.01), 6)
    return UsageRecord(
        tenant=rng.choice(["acme", "globex", "initech"]),
        key_id=rng.choice(["", "k1", "k2"]),
        model=rng.choice(["minilm", "smollm2", "gpt-x"]),
        place=place,
        workflow=rng.choice(["", "", "ingest", "chat", "report"]),
        input_tokens=rng.randint(0, 500),
        output_tokens=rng.randint(0, 200),
        compute_s=rng.uniform(0, 0.5),
        cost=0.0 if place == "cache" else cost,
        cost_avoided=cost if place == "cache" else 0.0,
    )


async def test_random_records_sum_up_for_any_grouping_and_filter(tmp_path: Path) -> None:
    rng = random.Random(1234)
    clock = ManualClock(DAY0 + 3600)
    ledger = make_ledger(tmp_path / "ledger", clock)
    await ledger.start()
    records = []
    for i in range(500):
        offset = rng.randrange(5)
        clock.now = DAY0 + offset * DAY + rng.uniform(0, DAY - 1e-3)
        record = random_record(rng)
        ledger.record(record)
        records.append((day_of(offset), record))
        if i % 97 == 0:
            await ledger.flush()  # some rows are added to stored ones, the rest are pending at query time
    cases = [
        (GROUP_FIELDS, {}),
        (("tenant",), {}),
        (("day", "place"), {}),
        (("model", "workflow"), {"tenant": "acme"}),
        ((), {}),
        (("key",), {"place": "cache", "since": day_of(1), "until": day_of(3)}),
        (("day", "tenant", "key"), {"model": "minilm", "workflow": "chat"}),
        (("place", "day"), {"key_id": "", "since": day_of(2)}),
        (("workflow",), {"until": day_of(0)}),
    ]
    for group_by, filters in cases:
        want_filters = {("key" if k == "key_id" else k): v for k, v in filters.items()}
        got = await ledger.query(group_by=group_by, **filters)
        assert_rows_equal(got, expected(records, group_by, **want_filters))
    assert await ledger.query(tenant="nobody") == []
    assert await ledger.query(since="2030-01-01") == []
    assert await ledger.query(until="2020-01-01") == []
    totals = await ledger.query(group_by=())
    assert totals[0]["requests"] == 500
    assert list(totals[0]) == list(TOTAL_FIELDS)
    await ledger.close()


async def test_rows_have_the_documented_shape(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "ledger")
    await ledger.start()
    ledger.record(UsageRecord("acme", "k1", "minilm", "local", "ingest", 3, 4, 0.5, 0.25))
    ledger.record(UsageRecord("acme", "k1", "minilm", "local", "ingest", 1, 2, 0.25, 0.5))
    assert await ledger.query() == [{
        "day": "2026-01-01", "tenant": "acme", "key": "k1", "model": "minilm", "place": "local",
        "workflow": "ingest", "requests": 2, "input_tokens": 4, "output_tokens": 6, "compute_s": 0.75,
        "cost": 0.75, "cost_avoided": 0.0,
    }]
    await ledger.close()


async def test_day_is_the_utc_date_of_the_clock(tmp_path: Path) -> None:
    clock = ManualClock(DAY0 - 0.001)  # the last millisecond of 2025-12-31
    ledger = make_ledger(tmp_path / "ledger", clock)
    await ledger.start()
    ledger.record(UsageRecord("acme", "", "m", "local"))
    clock.now = DAY0
    ledger.record(UsageRecord("acme", "", "m", "local"))
    ledger.record(UsageRecord("acme", "", "m", "local"))
    rows = await ledger.query(group_by=("day",))
    assert [(row["day"], row["requests"]) for row in rows] == [("2025-12-31", 1), ("2026-01-01", 2)]
    await ledger.close()


async def test_totals_survive_a_restart_and_a_second_start_adds_to_them(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger = make_ledger(path)
    await ledger.start()
    for _ in range(10):
        ledger.record(UsageRecord("acme", "k1", "minilm", "cloud", input_tokens=2, cost=0.5))
    await ledger.close()  # the final flush writes what is pending

    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600

    reopened = make_ledger(path)
    await reopened.start()
    assert (await reopened.query(group_by=("tenant",)))[0] | {"compute_s": 0} == {
        "tenant": "acme", "requests": 10, "input_tokens": 20, "output_tokens": 0, "compute_s": 0, "cost": 5.0,
        "cost_avoided": 0.0,
    }
    for _ in range(5):
        reopened.record(UsageRecord("acme", "k1", "minilm", "cloud", input_tokens=2, cost=0.5))
    await reopened.close()

    again = make_ledger(path)  # the same object can also be started again after close
    await again.start()
    await again.close()
    await again.start()
    rows = await again.query(group_by=("tenant",))
    assert (rows[0]["requests"], rows[0]["input_tokens"], rows[0]["cost"]) == (15, 30, 7.5)
    await again.close()


async def test_two_processes_add_up_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    script = textwrap.dedent("""
        import asyncio, sys
        from pathlib import Path
        from prometheus_client import CollectorRegistry
        from appliance.ledger import CostLedger, UsageRecord

        async def main(path, n, who):
            ledger = CostLedger(Path(path), CollectorRegistry(), max_workflows=2, flush_interval_s=0.005,
                                clock=lambda: 1767225600.0 + 60)
            await ledger.start()
            for i in range(n):
                ledger.record(UsageRecord("acme", who, "m", ("local", "cloud", "cache")[i % 3],
                                          workflow="wf%d" % (i % 5), input_tokens=i, output_tokens=1,
                                          compute_s=0.25, cost=0.5, cost_avoided=0.125))
                if i % 7 == 0:
                    await asyncio.sleep(0.001)  # let the periodic flush interleave with the other process
            await ledger.close()

        asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
    """)
    n = 400
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(n), who], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for who in ("k1", "k2")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()

    ledger = make_ledger(path, max_workflows=2)
    await ledger.start()
    total = await ledger.query(group_by=())
    assert total == [{"requests": 2 * n, "input_tokens": 2 * sum(range(n)), "output_tokens": 2 * n,
                      "compute_s": 0.25 * 2 * n, "cost": 0.5 * 2 * n, "cost_avoided": 0.125 * 2 * n}]
    per_key = await ledger.query(group_by=("key",))
    assert [(row["key"], row["requests"]) for row in per_key] == [("k1", n), ("k2", n)]
    workflows = {row["workflow"] for row in await ledger.query(group_by=("workflow",))}
    kept = workflows - {"other"}
    assert len(kept) == 2 and kept < {f"wf{i}" for i in range(5)}  # one shared set of two, whoever came first
    assert "other" in workflows
    await ledger.close()


async def test_workflow_tags_are_bounded_and_the_set_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger = make_ledger(path, max_workflows=3)
    await ledger.start()
    for tag in ("a", "b", "", "c", "d", "a", "other"):
        ledger.record(UsageRecord("acme", "", "m", "local", workflow=tag))
    rows = await ledger.query(group_by=("workflow",))
    assert [(row["workflow"], row["requests"]) for row in rows] == [
        ("", 1), ("a", 2), ("b", 1), ("c", 1), ("other", 2)
    ]
    await ledger.close()

    reopened = make_ledger(path, max_workflows=3)
    await reopened.start()
    for tag in ("e", "b", "f"):
        reopened.record(UsageRecord("acme", "", "m", "local", workflow=tag))
    rows = await reopened.query(group_by=("workflow",), since="2026-01-01", until="2026-01-01")
    assert [(row["workflow"], row["requests"]) for row in rows] == [
        ("", 1), ("a", 2), ("b", 2), ("c", 1), ("other", 4)
    ]
    assert await reopened.query(workflow="e") == []
    await reopened.close()


async def test_max_workflows_zero_records_every_tag_as_other(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "ledger", max_workflows=0)
    await ledger.start()
    ledger.record(UsageRecord("acme", "", "m", "local", workflow="x"))
    ledger.record(UsageRecord("acme", "", "m", "local"))
    rows = await ledger.query(group_by=("workflow",))
    assert [(row["workflow"], row["requests"]) for row in rows] == [("", 1), ("other", 1)]
    await ledger.close()


async def test_prometheus_counters_count_at_record_time(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    ledger = CostLedger(tmp_path / "ledger", registry, clock=ManualClock(DAY0 + 3600))  # not even started: no I/O needed
    ledger.record(UsageRecord("acme", "k1", "minilm", "cloud", input_tokens=10, output_tokens=3, cost=0.25))
    ledger.record(UsageRecord("acme", "k2", "minilm", "cloud", input_tokens=5, output_tokens=1, cost=0.5))
    ledger.record(UsageRecord("acme", "k1", "minilm", "cache", input_tokens=10, output_tokens=3,
                              cost_avoided=0.25))
    value = registry.get_sample_value
    cloud = {"tenant": "acme", "model": "minilm", "place": "cloud"}
    cache = {"tenant": "acme", "model": "minilm", "place": "cache"}
    assert value("appliance_cost_total", cloud) == 0.75
    assert value("appliance_cost_total", cache) == 0.0
    assert value("appliance_cost_avoided_total", {"tenant": "acme", "model": "minilm"}) == 0.25
    assert value("appliance_usage_requests_total", cloud) == 2
    assert value("appliance_usage_requests_total", cache) == 1
    assert value("appliance_usage_tokens_total", cloud | {"direction": "input"}) == 15
    assert value("appliance_usage_tokens_total", cloud | {"direction": "output"}) == 4
    assert value("appliance_usage_tokens_total", cache | {"direction": "input"}) == 10
    assert value("appliance_cost_total", {"tenant": "globex", "model": "minilm", "place": "cloud"}) is None


async def test_cost_and_tokens_by_workflow_are_bounded_like_the_ledger(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    ledger = CostLedger(tmp_path / "ledger", registry, max_workflows=1, clock=ManualClock(DAY0 + 3600))
    ledger.record(UsageRecord("acme", "k1", "m", "local", workflow="triage", input_tokens=4, output_tokens=2,
                              cost=0.5))
    ledger.record(UsageRecord("acme", "k1", "m", "cloud", workflow="triage", input_tokens=1, cost=0.25))
    ledger.record(UsageRecord("acme", "k1", "m", "local", workflow="summaries", input_tokens=7, cost=1.0))
    ledger.record(UsageRecord("acme", "k1", "m", "local", input_tokens=3))
    value = registry.get_sample_value
    assert value("appliance_workflow_cost_total", {"workflow": "triage"}) == 0.75
    assert value("appliance_workflow_tokens_total", {"workflow": "triage", "direction": "input"}) == 5
    assert value("appliance_workflow_tokens_total", {"workflow": "triage", "direction": "output"}) == 2
    # max_workflows = 1: a second tag counts as "other", never a series of its own
    assert value("appliance_workflow_cost_total", {"workflow": "summaries"}) is None
    assert value("appliance_workflow_cost_total", {"workflow": "other"}) == 1.0
    assert value("appliance_workflow_tokens_total", {"workflow": "", "direction": "input"}) == 3


async def test_record_does_no_io_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger = make_ledger(path)
    ledger.record(UsageRecord("acme", "", "m", "local", cost=1.0))  # before start: pending in memory
    assert not path.exists()
    await ledger.start()
    data = path / "data.mdb"
    os.utime(data, ns=(0, 0))  # long ago: any write from now on changes the time, however coarse the clock
    before = data.stat()
    for _ in range(200):
        ledger.record(UsageRecord("acme", "", "m", "local", cost=1.0))
    after = data.stat()
    assert (after.st_mtime_ns, after.st_size) == (0, before.st_size)
    await ledger.flush()
    assert data.stat().st_mtime_ns != 0
    rows = await ledger.query(group_by=())
    assert (rows[0]["requests"], rows[0]["cost"]) == (201, 201.0)
    await ledger.close()


async def test_periodic_flush_writes_without_being_asked(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger = make_ledger(path, flush_interval_s=0.02)
    await ledger.start()
    data = path / "data.mdb"
    os.utime(data, ns=(0, 0))  # long ago: the flush's write changes the time, however coarse the clock
    ledger.record(UsageRecord("acme", "", "m", "local"))
    # Polled from a thread: the periodic flush runs on this event loop, which must stay free.
    await asyncio.to_thread(wait_until, lambda: data.stat().st_mtime_ns != 0, 10, "the periodic flush")
    await ledger.close()


async def test_a_failed_flush_keeps_the_rows_for_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    ledger = make_ledger(tmp_path / "ledger")
    await ledger.start()
    ledger.record(UsageRecord("acme", "", "m", "local", "wf", input_tokens=1, cost=0.5))
    real_write = ledger_module._write

    def failing_write(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(ledger_module, "_write", failing_write)
    with caplog.at_level(logging.ERROR, logger="appliance.ledger"):
        await ledger.flush()
    assert "failed" in caplog.text and "disk on fire" in caplog.text
    ledger.record(UsageRecord("acme", "", "m", "local", "wf", input_tokens=1, cost=0.5))
    monkeypatch.setattr(ledger_module, "_write", real_write)
    rows = await ledger.query(group_by=("workflow",))
    assert [(r["workflow"], r["requests"], r["input_tokens"], r["cost"]) for r in rows] == [("wf", 2, 2, 1.0)]
    await ledger.close()


async def test_bad_queries_raise_value_error(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "ledger")
    await ledger.start()
    with pytest.raises(ValueError, match="cannot group by 'region'"):
        await ledger.query(group_by=("day", "region"))
    with pytest.raises(ValueError, match="not the string"):
        await ledger.query(group_by="day")
    with pytest.raises(ValueError, match="twice"):
        await ledger.query(group_by=("day", "day"))
    for bad in ("2026-1-01", "yesterday", "20260101", "2026-01-01T00:00"):
        with pytest.raises(ValueError, match="since must be a date as YYYY-MM-DD"):
            await ledger.query(since=bad)
    with pytest.raises(ValueError, match="until is not a valid date"):
        await ledger.query(until="2026-02-30")
    with pytest.raises(ValueError, match="after until"):
        await ledger.query(since="2026-01-02", until="2026-01-01")
    with pytest.raises(ValueError, match="place must be one of"):
        await ledger.query(place="moon")
    await ledger.close()
    with pytest.raises(RuntimeError, match="not started"):
        await ledger.query()


@pytest.mark.parametrize("fields", [
    {"place": "edge"}, {"input_tokens": -1}, {"output_tokens": 1.5}, {"cost": float("nan")},
    {"compute_s": -0.1}, {"cost_avoided": float("inf")}, {"tenant": None},
])
def test_invalid_records_are_refused(fields: dict) -> None:
    base = {"tenant": "acme", "key_id": "", "model": "m", "place": "local"}
    with pytest.raises(ValueError):
        UsageRecord(**(base | fields))


def test_bad_options_fail_fast(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_workflows"):
        CostLedger(tmp_path, CollectorRegistry(), max_workflows=-1)
    with pytest.raises(ValueError, match="flush_interval_s"):
        CostLedger(tmp_path, CollectorRegistry(), flush_interval_s=0)

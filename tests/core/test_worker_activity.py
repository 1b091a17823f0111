"""The model requests in flight across worker processes, as the routing-quality replays see them: a sibling's
requests in flight, and one that came and went between two reads, count as busy; a stopped worker counts as idle."""

from __future__ import annotations

import asyncio
import multiprocessing

from appliance.api.state import Lifecycle
from appliance.worker_activity import SharedActivity
from appliance.workers import WorkerGroup


def pair(tmp_path) -> tuple[Lifecycle, SharedActivity, Lifecycle, SharedActivity]:
    lifecycles = [Lifecycle(), Lifecycle()]
    views = [SharedActivity(WorkerGroup(index, 2, tmp_path), lifecycles[index]) for index in range(2)]
    for view in views:
        view.open()
    return lifecycles[0], views[0], lifecycles[1], views[1]


def test_a_siblings_requests_in_flight_count_once_published(tmp_path):
    mine, my_view, theirs, their_view = pair(tmp_path)
    assert my_view.in_flight() == 0
    theirs.model_requests, theirs.model_started = 2, 2
    assert my_view.in_flight() == 0  # not published yet
    their_view.publish()
    assert my_view.in_flight() == 2 + 1  # two in flight, and it started some since the last read
    assert my_view.in_flight() == 2
    mine.model_requests = 1
    assert my_view.in_flight() == 3  # this worker's own count is read directly
    theirs.model_requests = 0
    their_view.publish()
    mine.model_requests = 0
    assert my_view.in_flight() == 0
    assert their_view.in_flight() == 0


def test_a_request_that_came_and_went_between_two_reads_counts_as_busy_once(tmp_path):
    _, my_view, theirs, their_view = pair(tmp_path)
    my_view.in_flight()
    theirs.model_started += 1  # started and finished between two publications: in flight 0 at both
    their_view.publish()
    assert my_view.in_flight() == 1
    assert my_view.in_flight() == 0


def test_a_stopped_worker_says_nothing_in_flight(tmp_path):
    _, my_view, theirs, their_view = pair(tmp_path)
    theirs.model_requests = theirs.model_started = 5
    their_view.publish()
    my_view.in_flight()
    their_view.close()
    assert my_view.in_flight() == 0


def _publish_from_another_process(control_dir: str, ready, done) -> None:
    lifecycle = Lifecycle()
    view = SharedActivity(WorkerGroup(1, 2, __import__("pathlib").Path(control_dir)), lifecycle)
    view.open()
    lifecycle.model_requests = lifecycle.model_started = 3
    view.publish()
    ready.set()
    done.wait(30)
    view.close()


def test_the_counts_cross_process_boundaries_and_the_publisher_runs_with_the_server(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    process = context.Process(target=_publish_from_another_process, args=(str(tmp_path), ready, done))
    process.start()
    try:
        assert ready.wait(60)
        lifecycle = Lifecycle()
        view = SharedActivity(WorkerGroup(0, 2, tmp_path), lifecycle, interval_s=0.01)

        async def serving() -> list[int]:
            context_manager = view.lifespan(None)
            await anext(context_manager)  # as aiohttp's cleanup_ctx starts it
            seen = [view.in_flight()]
            done.set()
            await asyncio.get_running_loop().run_in_executor(None, process.join, 30)
            seen.append(view.in_flight())
            lifecycle.model_requests = 1
            await asyncio.sleep(0.05)  # published by the running task
            raw = (tmp_path / "activity").read_bytes()
            seen.append(int.from_bytes(raw[:8], "little"))
            await anext(context_manager, None)
            return seen

        assert asyncio.run(serving()) == [3, 0, 1]
    finally:
        done.set()
        process.join(30)


def test_a_worker_of_a_group_waits_for_the_whole_group_only_when_replays_are_sampled(tmp_path):
    from appliance.api.state import QUALITY
    from appliance.app import create_app
    from conftest import make_config

    group = WorkerGroup(0, 2, tmp_path)
    sampled = create_app(make_config(tmp_path / "repo", tmp_path / "state",
                                     routing={"quality_sample_ratio": 0.5}), workers=group)
    assert isinstance(getattr(sampled[QUALITY]._in_flight, "__self__", None), SharedActivity)
    alone = create_app(make_config(tmp_path / "repo", tmp_path / "state", routing={"quality_sample_ratio": 0.5}))
    unsampled = create_app(make_config(tmp_path / "repo", tmp_path / "state"), workers=group)
    for app in (alone, unsampled):
        assert not isinstance(getattr(app[QUALITY]._in_flight, "__self__", None), SharedActivity)

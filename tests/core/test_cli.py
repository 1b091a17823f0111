"""The ``appliance`` command as a user runs it: mistakes in paths and ports are one clear line, before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import uvloop

import tiny_models
from conftest import make_config
from waiting import wait_until

from appliance.listener import ListenError
from appliance.server import run_server

LOADED = "loaded in"  # the repository's log line for each model version it loads


def appliance(*args: str, state: Path, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process with its state (and default repository) under ``state``."""
    environ = {**os.environ, "APPLIANCE_PATHS_STATE_DIR": str(state), **env}
    environ.pop("APPLIANCE_PATHS_MODEL_REPOSITORY", None)
    environ.pop("APPLIANCE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=environ, capture_output=True,
                          text=True, timeout=timeout_s)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture()
def tiny_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, tiny_models.BATCHED.format(max_batch=8, delay_us=0),
                              tiny_models.add_constant)
    return repo


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_serve_with_a_models_folder_that_is_not_there_stops_and_builds_nothing(tmp_path, kind):
    target = tmp_path / "modles"  # the typo a user makes
    if kind == "file":
        target.write_text("not a folder")
    result = appliance("serve", "--models", str(target), "--port", str(free_port()), state=tmp_path / "state")
    assert result.returncode == 2
    line = error_line(result)
    assert str(target) in line and ("does not exist" if kind == "missing" else "is not a folder") in line
    assert "appliance build --models" in line and "drop --models" in line
    assert target.exists() == (kind == "file")  # the typo was not created
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.onnx"))


def test_serve_with_an_empty_models_folder_serves_it_without_building_the_defaults(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    port = free_port()
    environ = {**os.environ, "APPLIANCE_PATHS_STATE_DIR": str(tmp_path / "state")}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--models", str(empty), "--port",
                                str(port)], env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def live() -> bool:
            assert process.poll() is None, f"the server exited: {process.stderr.read()}"
            try:
                return requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(live, 60, "the server to come up")
    finally:
        process.terminate()
        process.wait(30)
    stderr = process.stderr.read()
    assert "has no models: serving none" in stderr and "building the default models" not in stderr
    assert list(empty.iterdir()) == []


def test_serve_on_a_busy_port_stops_before_loading_a_model(tmp_path, tiny_repo, busy_port):
    result = appliance("serve", "--models", str(tiny_repo), "--port", str(busy_port), state=tmp_path / "state")
    assert result.returncode == 2
    line = error_line(result)  # one line: no traceback, and no model-loading log before it
    assert f"127.0.0.1:{busy_port}" in line and "already in use" in line
    assert "--port" in line and "APPLIANCE_SERVER_PORT" in line
    assert LOADED not in result.stderr


def test_a_port_taken_after_the_check_is_the_same_one_line_error(tmp_path, tiny_repo, busy_port, caplog):
    """The real bind, after the models loaded (another process took the port since the probe): no traceback."""
    config = make_config(tiny_repo, tmp_path / "state", server={"port": busy_port})
    caplog.set_level("INFO", logger="appliance")
    with pytest.raises(ListenError) as raised:
        uvloop.run(run_server(config, handle_signals=False))
    message = str(raised.value)
    assert f"127.0.0.1:{busy_port}" in message and "already in use" in message and "--port" in message
    assert "\n" not in message
    assert any(LOADED in r.getMessage() for r in caplog.records)  # this path did load, then let go
    assert any("unloaded" in r.getMessage() for r in caplog.records)


def test_build_from_a_missing_source_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    result = appliance("build", "--source", str(missing), "--name", "mine", "--models", str(tmp_path / "repo"),
                       state=tmp_path / "state")
    assert result.returncode == 1
    line = error_line(result)
    assert str(missing) in line and "does not exist" in line and "GGUF file" in line
    assert not (tmp_path / "repo" / "mine").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a model", b"GGU"])
def test_build_from_a_file_that_is_not_gguf_says_so(tmp_path, content):
    source = tmp_path / "model.gguf"
    source.write_bytes(content)
    result = appliance("build", "--source", str(source), "--name", "mine", "--models", str(tmp_path / "repo"),
                       state=tmp_path / "state")
    assert result.returncode == 1
    line = error_line(result)
    assert str(source) in line and "is not a GGUF file" in line
    assert "Traceback" not in result.stderr and "numpy" not in result.stderr


def test_build_from_a_folder_without_modules_json_says_what_it_needs(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    result = appliance("build", "--source", str(folder), "--name", "mine", "--models", str(tmp_path / "repo"),
                       state=tmp_path / "state")
    assert result.returncode == 1
    assert "without modules.json" in error_line(result)


class _IndexHandler(BaseHTTPRequestHandler):
    """Answers ``POST /v2/repository/index`` as a running appliance would, for one model."""

    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        assert self.path == "/v2/repository/index"
        body = json.dumps([{"name": "add_one", "version": "1", "state": "READY"}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def index_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _IndexHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_models_takes_port_and_models_like_serve(tmp_path, tiny_repo, index_server):
    live = appliance("models", "--models", str(tiny_repo), "--port", str(index_server), state=tmp_path / "state")
    assert live.returncode == 0, live.stderr
    assert f"repository: {tiny_repo}\n" in live.stdout and "add_one v1: READY" in live.stdout
    offline = appliance("models", "--models", str(tiny_repo), "--port", str(free_port()), state=tmp_path / "state")
    assert offline.returncode == 0, offline.stderr
    assert "server not reachable" in offline.stdout and "add_one v1: -" in offline.stdout


def test_models_with_a_models_folder_that_is_not_there_says_so(tmp_path):
    target = tmp_path / "modles"
    result = appliance("models", "--models", str(target), state=tmp_path / "state")
    assert result.returncode == 2
    line = error_line(result)
    assert str(target) in line and "does not exist" in line
    assert not target.exists()

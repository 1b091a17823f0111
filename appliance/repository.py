"""The model repository (``<name>/<version>/model.toml``) and the manager of what is loaded from it.

A load reads the newest version, loads and warms it in a worker thread, and only then swaps it in, in one step on
the event loop. Requests already queued on the old version finish there before it is closed. A version that fails
to load or warm up leaves whatever was serving in place, and the error is kept for the index and the log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, ConfigError
from appliance.engine_factory import default_decoders, default_engines
from appliance.engine_registry import DecoderFactory, EngineFactory, Runtimes
from appliance.errors import ModelLoadFailed, ModelNotFound, ModelNotReady
from appliance.model_spec import ModelSpec, read_model_spec
from appliance.models import ModelVersion, model_for
from appliance.telemetry import Metrics

log = logging.getLogger("appliance.repository")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def scan_repository(root: Path) -> dict[str, list[int]]:
    """Model names and their version numbers (ascending), from folder names alone."""
    found: dict[str, list[int]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not MODEL_NAME.match(model_dir.name):
            continue
        versions = sorted(int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit())
        if versions:
            found[model_dir.name] = versions
    return found


@dataclass
class SyncResult:
    """What :meth:`ModelManager.sync_repository` did, by model name."""

    loaded: list[str]
    unloaded: list[str]
    failed: list[str]


@dataclass
class ModelState:
    """What the index reports for one model."""

    name: str
    version: int | None
    state: str  # READY, UNAVAILABLE, LOADING
    reason: str = ""
    runtime: str = ""  # the serving version's runtime choice (kind, device, why)


class ModelManager:
    """Holds the serving version of each model and performs loads, swaps and unloads."""

    def __init__(
        self,
        config: Config,
        engine_factory: EngineFactory | None = None,
        metrics: Metrics | None = None,
        drain_timeout_s: float | None = None,
        *,
        decoder_factory: DecoderFactory | None = None,
    ) -> None:
        """Versions make their engines with ``engine_factory`` and their decoders with ``decoder_factory``
        (default: the registries of :mod:`appliance.engine_factory`, keyed by ``[engine] kind``)."""
        self._config = config
        self._runtimes = Runtimes(engine_factory or default_engines(), decoder_factory or default_decoders())
        self._metrics = metrics or Metrics()
        self._drain_timeout_s = config.server.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.root = config.paths.models()
        self._serving: dict[str, ModelVersion] = {}
        self._aliases: dict[str, str] = {}
        self._states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- lookups (event loop, no awaits) -------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The version serving ``name`` (a model name or alias); raise 404 or 503 errors that say what to do."""
        served = self._serving.get(name)
        if served is None:
            target = self._aliases.get(name)
            served = self._serving.get(target) if target else None
        if served is None:
            state = self._states.get(name)
            if state is not None:
                why = f": {state.reason}" if state.reason else ""
                raise ModelNotReady(
                    f"model {name!r} is {state.state.lower()}{why}; load it with POST /v2/repository/models/{name}/load"
                )
            raise ModelNotFound(f"unknown model {name!r}; GET /v2/repository/index lists the models")
        if version is not None and version != served.version:
            raise ModelNotFound(
                f"version {version} of model {served.name!r} is not served; the serving version is {served.version}"
            )
        if not served.ready:
            raise ModelNotReady(f"model {served.name!r} version {served.version} is not ready")
        return served

    def serving(self) -> list[ModelVersion]:
        """The versions taking traffic now."""
        return list(self._serving.values())

    def index(self) -> list[ModelState]:
        """Every model in the repository or loaded, with its state."""
        names = set(scan_repository(self.root)) | set(self._serving) | set(self._states)
        result = []
        for name in sorted(names):
            if name in self._states and self._states[name].state == "LOADING":
                result.append(self._states[name])
            elif name in self._serving:
                serving = self._serving[name]
                result.append(ModelState(name, serving.version, "READY", runtime=serving.runtime.summary))
            elif name in self._states:
                result.append(self._states[name])
            else:
                result.append(ModelState(name, None, "UNAVAILABLE", "not loaded"))
        return result

    # -- control -------------------------------------------------------------------------------------------------

    async def load_all(self) -> list[ModelState]:
        """Load every model in the repository; failures are logged and reported, the others still load."""
        for name in scan_repository(self.root):
            try:
                await self.load(name)
            except ModelLoadFailed as exc:
                log.error("%s", exc.message)
        return self.index()

    async def load(self, name: str) -> ModelVersion:
        """Load the newest version of ``name``, warm it up, then swap it in; raise :class:`ModelLoadFailed`."""
        if not MODEL_NAME.match(name):
            raise ModelNotFound(f"{name!r} is not a valid model name")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = scan_repository(self.root).get(name)
            if not versions:
                raise ModelNotFound(f"model {name!r} is not in the repository {self.root}")
            version = versions[-1]
            self._states[name] = ModelState(name, version, "LOADING")
            try:
                candidate = await self._prepare(name, version)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, the old version keeps serving
                reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ConfigError) else str(exc)
                old = self._serving.get(name)
                keep = f"; version {old.version} keeps serving" if old else ""
                if old is None:
                    self._states[name] = ModelState(name, version, "UNAVAILABLE", f"version {version} failed: {reason}")
                else:
                    self._states.pop(name)
                log.error("model %s version %s failed to load%s: %s", name, version, keep, reason)
                raise ModelLoadFailed(f"failed to load model {name!r} version {version}{keep}: {reason}") from exc
            old = self._serving.get(name)
            self._swap_in(candidate, old)
            self._states.pop(name, None)
        if old is not None and old is not candidate:
            await old.stop(self._drain_timeout_s)
            log.info("model %s version %s retired", name, old.version)
        return candidate

    async def _prepare(self, name: str, version: int) -> ModelVersion:
        spec: ModelSpec = read_model_spec(name, version, self.root / name / str(version))
        self._check_aliases(spec)
        candidate = model_for(spec, self._config, self._metrics.for_version(name, version), self._runtimes)
        loop = asyncio.get_running_loop()
        try:
            load_s = await loop.run_in_executor(None, candidate.load_blocking)
            warmup_s = await loop.run_in_executor(None, candidate.warmup_blocking)
            opened = time.perf_counter()
            await candidate.open()
            warmup_s += time.perf_counter() - opened
        except Exception:
            await candidate.stop(self._drain_timeout_s)
            raise
        candidate.metrics.load_duration.set(load_s)
        candidate.metrics.warmup_duration.set(warmup_s)
        log.info(
            "model %s version %s loaded in %.3f s, warmed up in %.3f s (%s)",
            name, version, load_s, warmup_s, candidate.description,
        )
        return candidate

    def _check_aliases(self, spec: ModelSpec) -> None:
        for alias in spec.aliases:
            owner = self._aliases.get(alias)
            if alias in self._serving and alias != spec.name or owner not in (None, spec.name):
                raise ConfigError(f"alias {alias!r} of model {spec.name!r} is already taken by {owner or alias!r}")

    def _swap_in(self, candidate: ModelVersion, old: ModelVersion | None) -> None:
        # One synchronous step on the event loop: no request can see a half-swapped table.
        candidate.start()
        candidate.metrics.ready.set(1)
        self._aliases = {a: n for a, n in self._aliases.items() if n != candidate.name}
        self._aliases.update({alias: candidate.name for alias in candidate.spec.aliases})
        self._serving[candidate.name] = candidate
        if old is not None and old.version != candidate.version:
            old.metrics.ready.set(0)
        log.info("model %s version %s is serving", candidate.name, candidate.version)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; queued requests finish first."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            served = self._serving.pop(name, None)
            if served is None:
                if name in scan_repository(self.root) or name in self._states:
                    return  # already unloaded: like Triton, unloading twice is not an error
                raise ModelNotFound(f"unknown model {name!r}")
            self._aliases = {a: n for a, n in self._aliases.items() if n != name}
            self._states[name] = ModelState(name, served.version, "UNAVAILABLE", "unloaded")
            served.metrics.ready.set(0)
            await served.stop(self._drain_timeout_s)
            log.info("model %s version %s unloaded", name, served.version)

    async def sync_repository(self) -> SyncResult:
        """Make what serves match the repository folder (a SIGHUP reload).

        Loads models that are new, not serving, or whose newest version is not the serving one; unloads models
        whose folder is gone. A model unloaded through the API stays unloaded. Failures keep the old version serving.
        """
        found = scan_repository(self.root)
        result = SyncResult([], [], [])
        for name, versions in found.items():
            served = self._serving.get(name)
            state = self._states.get(name)
            if served is not None and served.version == versions[-1]:
                continue
            if served is None and state is not None and state.reason == "unloaded":
                continue
            try:
                await self.load(name)
                result.loaded.append(name)
            except (ModelLoadFailed, ModelNotFound) as exc:
                log.error("%s", exc.message)
                result.failed.append(name)
        for name in [n for n in self._serving if n not in found]:
            await self.unload(name)
            self._states.pop(name, None)  # gone from the folder: forget it, so that a new folder loads again
            result.unloaded.append(name)
        return result

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        for name in list(self._serving):
            await self.unload(name)

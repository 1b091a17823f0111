"""Reload on SIGHUP: the configuration, the model repository and the API keys, without dropping a request.

The configuration is read again from the same file, environment and command-line flags as at start. A new
configuration that does not validate is rejected with the reason in the log, and the running one stays in force.
A valid one is applied where it can change live; settings that only take effect on a restart are named in the log
and keep their running values until then:

* live: ``server.log_level``, ``server.access_log``, ``paths.model_repository``, ``paths.cache_dir``,
  ``paths.keys_file``, ``[routing]``, ``[admission]`` (gates keep their capacity), and the ``[onnxruntime]`` and
  ``[batching]`` defaults (for model versions loaded from then on);
* on restart only: ``server.host``, ``server.port``, ``server.workers``, ``server.max_body_bytes``,
  ``server.drain_timeout_s``, ``paths.state_dir``, ``paths.response_cache``, ``paths.ledger``, ``[cache]``,
  ``[ledger]`` and ``[upstreams.*]``.

The key store is also watched while serving (a new or revoked key takes effect within a second); a reload reads
it at once. An invalid key store is logged and the keys in force stay.

Then the repository is brought in line with the folder: new models and models with a newer version are loaded
(warmed, then swapped in; queued requests finish on the old version), models whose folder is gone are unloaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from appliance.api.state import ACCESS_LOG, AUTH, CONFIG, MODELS
from appliance.config import Config, ConfigError, apply_table, check_config, load_config
from appliance.keys import KeyStore
from appliance.notify import Notifier

log = logging.getLogger("appliance.reload")

RESTART_ONLY = frozenset({
    "server.host", "server.port", "server.workers", "server.max_body_bytes", "server.drain_timeout_s",
    "paths.state_dir", "paths.response_cache", "paths.ledger", "cache.enabled", "cache.max_bytes", "cache.ttl_s",
    "cache.sync", "ledger.enabled", "ledger.device_rate_per_hour", "ledger.max_workflows",
})


@dataclass(frozen=True)
class ConfigSource:
    """Where the configuration comes from, so that it can be read again: the file (else ``$APPLIANCE_CONFIG``),
    the environment, and the command line's overrides (``{section: {setting: value}}``). Picklable for workers."""

    path: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def load(self) -> Config:
        """Read and validate; raise :class:`ConfigError` naming the field and what to change."""
        config = load_config(self.path)
        for section, values in self.overrides.items():
            if values:
                apply_table(getattr(config, section), section, values, "the command line")
        check_config(config)
        return config


@dataclass
class ReloadReport:
    """What a reload did."""

    config_error: str = ""
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def merge_config(running: Config, new: Config) -> tuple[list[str], list[str]]:
    """Copy the live-changeable settings of ``new`` into ``running`` (in place, so every holder sees them).

    Returns the settings applied and the changed settings that wait for a restart, as ``section.setting`` names.
    """
    applied, restart = [], []
    if sorted(running.upstreams) != sorted(new.upstreams):
        restart.append(f"upstreams ({sorted(running.upstreams)} -> {sorted(new.upstreams)})")
    for section_field in dataclasses.fields(Config):
        if section_field.name in ("source", "upstreams"):
            continue
        old_section, new_section = getattr(running, section_field.name), getattr(new, section_field.name)
        for setting in dataclasses.fields(old_section):
            name = f"{section_field.name}.{setting.name}"
            before, after = getattr(old_section, setting.name), getattr(new_section, setting.name)
            if before == after:
                continue
            if name in RESTART_ONLY:
                restart.append(f"{name} ({before!r} -> {after!r})")
            else:
                setattr(old_section, setting.name, after)
                applied.append(f"{name} ({before!r} -> {after!r})")
    running.source = new.source
    return applied, restart


class Reloader:
    """Performs reloads for one application; one at a time, a reload asked for during another runs after it."""

    def __init__(self, app: web.Application, source: ConfigSource, notifier: Notifier | None = None) -> None:
        self._app = app
        self._source = source
        self._notifier = notifier or Notifier(None)
        self._lock = asyncio.Lock()

    async def reload(self) -> ReloadReport:
        """Reload the configuration, the keys and the model repository; never raises for a bad config."""
        async with self._lock:
            self._notifier.reloading("reloading configuration and models")
            report = ReloadReport()
            try:
                self._reload_config(report)
                self._reload_keys(report)
                await self._reload_models(report)
            finally:
                self._notifier.ready(self._summary(report))
            return report

    def _reload_config(self, report: ReloadReport) -> None:
        try:
            new = self._source.load()
        except ConfigError as exc:
            report.config_error = str(exc)
            log.error("reload: the new configuration is rejected and the running one stays in force: %s", exc)
            return
        running = self._app[CONFIG]
        report.applied, report.needs_restart = merge_config(running, new)
        self._apply(running)
        if report.applied:
            log.info("reload: applied %s", ", ".join(report.applied))
        if report.needs_restart:
            log.warning("reload: changed but only applied on a restart (systemctl restart appliance): %s",
                        ", ".join(report.needs_restart))
        if not report.applied and not report.needs_restart:
            log.info("reload: configuration unchanged (%s)", running.source)

    def _apply(self, config: Config) -> None:
        logging.getLogger("appliance").setLevel(config.server.log_level.upper())
        self._app[ACCESS_LOG].enabled = config.server.access_log
        self._app[MODELS].root = config.paths.models()
        auth = self._app[AUTH]
        if auth.store.path != config.paths.keys():
            auth.store = KeyStore(config.paths.keys())

    def _reload_keys(self, report: ReloadReport) -> None:
        """Read the key store now; an invalid one is logged and the keys in force stay."""
        self._app[AUTH].refresh(force=True)

    async def _reload_models(self, report: ReloadReport) -> None:
        result = await self._app[MODELS].sync_repository()
        report.loaded, report.unloaded, report.failed = result.loaded, result.unloaded, result.failed
        log.info("reload: models loaded %s, unloaded %s, failed %s", result.loaded or "none",
                 result.unloaded or "none", result.failed or "none")

    @staticmethod
    def _summary(report: ReloadReport) -> str:
        config = "config rejected (see log)" if report.config_error else "config reloaded"
        return (f"serving; last reload: {config}, {len(report.loaded)} loaded, {len(report.unloaded)} unloaded, "
                f"{len(report.failed)} failed")

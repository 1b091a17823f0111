"""Server configuration: one TOML file, defaults, ``APPLIANCE_*`` environment overrides.

The configuration is read and validated once, at start. Every error names the field, the value it got, where the
value came from and what is allowed, so that the operator knows what to change.

Environment overrides are ``APPLIANCE_<SECTION>_<FIELD>`` (for example ``APPLIANCE_SERVER_PORT=9000``); values are
parsed by the field's type (lists are comma separated). ``APPLIANCE_CONFIG`` names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from msgspec import Meta

from appliance import validation
from appliance.validation import ConfigError

CONFIG_ENV = "APPLIANCE_CONFIG"
ENV_PREFIX = "APPLIANCE_"
DEFAULT_TRACES_ENDPOINT = "http://localhost:4318/v1/traces"


def _default_state_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "appliance")


@dataclass
class ServerConfig:
    """HTTP listener and process lifecycle."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    drain_timeout_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    access_log: bool = True
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "admin": GET /metrics needs an admin key (its series name tenants and models); "public": anyone who can reach
    # the port may scrape it
    metrics_access: Literal["public", "admin"] = "public"


@dataclass
class PathsConfig:
    """Where the appliance keeps its state."""

    state_dir: str = field(default_factory=_default_state_dir)
    model_repository: str = ""  # empty: <state_dir>/models
    cache_dir: str = ""  # empty: <state_dir>/cache
    keys_file: str = ""  # empty: <state_dir>/keys.json
    response_cache: str = ""  # empty: <state_dir>/response-cache
    ledger: str = ""  # empty: <state_dir>/ledger

    def models(self) -> Path:
        """The model repository folder."""
        return Path(self.model_repository or Path(self.state_dir) / "models").expanduser()

    def cache(self) -> Path:
        """The folder for derived files (optimized models, engine plans)."""
        return Path(self.cache_dir or Path(self.state_dir) / "cache").expanduser()

    def keys(self) -> Path:
        """The API key store (hashes only)."""
        return Path(self.keys_file or Path(self.state_dir) / "keys.json").expanduser()

    def ledger_dir(self) -> Path:
        """The LMDB cost ledger's folder."""
        return Path(self.ledger or Path(self.state_dir) / "ledger").expanduser()

    def response_cache_dir(self) -> Path:
        """The LMDB response cache's folder."""
        return Path(self.response_cache or Path(self.state_dir) / "response-cache").expanduser()


Provider = Literal["tensorrt", "cuda", "cpu"]
OptimizationLevel = Literal["disable", "basic", "extended", "all"]
PROVIDER_NAMES: tuple[str, ...] = get_args(Provider)
OPTIMIZATION_LEVELS: tuple[str, ...] = get_args(OptimizationLevel)


@dataclass
class OnnxRuntimeConfig:
    """Defaults for ONNX Runtime sessions; a model's ``[engine]`` table may override them."""

    providers: list[Provider] = field(default_factory=lambda: list(PROVIDER_NAMES))
    intra_op_threads: Annotated[int, Meta(ge=0, le=1024)] = 0
    inter_op_threads: Annotated[int, Meta(ge=0, le=1024)] = 0
    graph_optimization_level: OptimizationLevel = "all"
    optimized_model_cache: bool = True


@dataclass
class BatchingConfig:
    """Defaults for the dynamic batcher; a model's ``[batching]`` table may override them."""

    max_queue_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    default_timeout_ms: Annotated[float, Meta(ge=0)] = 0.0  # 0: no deadline unless the request sets one


@dataclass
class CacheConfig:
    """The permission-scoped LMDB response cache."""

    enabled: bool = True
    max_bytes: Annotated[int, Meta(ge=1024 * 1024, le=1024**4)] = 1024**3
    ttl_s: Annotated[float, Meta(ge=1, le=365 * 86400)] = 86400.0
    sync: bool = True  # fsync each write (a power cut loses at most the last write); false: faster, OS-crash risk
    # Per worker process: answers read or stored lately, held in memory so a repeat is a hit without a thread
    # hand-off (LMDB stays the cache of record; a purge in any worker empties every worker's); 0 turns it off
    memory_bytes: Annotated[int, Meta(ge=0, le=1024**4)] = 64 * 1024**2


@dataclass
class RoutingConfig:
    """Complexity routing for ``model: "auto"`` (and the other ``aliases``): a score from the request alone.

    Each feature is scaled to 0..1 and weighted; the sum picks the ``small`` tier up to ``small_max_score``, the
    ``mid`` tier up to ``mid_max_score``, and above it ``cloud_upstream`` when the caller's policy allows (else mid).
    """

    aliases: list[str] = field(default_factory=lambda: ["auto"])
    small_max_score: Annotated[float, Meta(ge=0, le=1)] = 0.25
    mid_max_score: Annotated[float, Meta(ge=0, le=1)] = 0.6
    cloud_upstream: str = ""
    prompt_tokens_scale: Annotated[int, Meta(ge=1)] = 1500
    weight_prompt_tokens: Annotated[float, Meta(ge=0, le=1)] = 0.3
    turns_scale: Annotated[int, Meta(ge=1)] = 8
    weight_turns: Annotated[float, Meta(ge=0, le=1)] = 0.1
    output_tokens_scale: Annotated[int, Meta(ge=1)] = 1024
    weight_output_tokens: Annotated[float, Meta(ge=0, le=1)] = 0.15
    weight_code: Annotated[float, Meta(ge=0, le=1)] = 0.25
    weight_math: Annotated[float, Meta(ge=0, le=1)] = 0.25
    weight_reasoning: Annotated[float, Meta(ge=0, le=1)] = 0.3
    # Routing quality (appliance/routing_quality.py): the share of small-tier routes replayed on both tiers.
    quality_sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 0.0
    quality_max_tokens: Annotated[int, Meta(ge=1, le=4096)] = 64
    quality_max_pending: Annotated[int, Meta(ge=1, le=10000)] = 32
    quality_idle_ms: Annotated[int, Meta(ge=0, le=600000)] = 250
    quality_embedding_model: Annotated[str, Meta(min_length=1)] = "auto"


@dataclass
class AdmissionConfig:
    """Lanes in front of every local model: a priority, a maximum wait, and overflow when it would be exceeded."""

    enabled: bool = True
    interactive_max_wait_ms: Annotated[float, Meta(ge=1)] = 1000.0
    batch_max_wait_ms: Annotated[float, Meta(ge=1)] = 60000.0
    max_waiting: Annotated[int, Meta(ge=1, le=1_000_000)] = 256  # per model, both lanes together
    overflow_to_cloud: bool = True


@dataclass
class LedgerConfig:
    """Cost attribution: rates for local work and the persistent ledger."""

    enabled: bool = True
    device_rate_per_hour: Annotated[float, Meta(ge=0)] = 0.0  # local cost per compute hour
    max_workflows: Annotated[int, Meta(ge=1, le=10_000)] = 64


@dataclass
class TracingConfig:
    """OpenTelemetry traces: a span per request and per step of the request path, sent over OTLP/HTTP."""

    enabled: bool = False
    endpoint: str = DEFAULT_TRACES_ENDPOINT  # the collector's OTLP/HTTP traces URL, path included
    service_name: Annotated[str, Meta(min_length=1, max_length=256)] = "appliance"
    sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0  # of new traces; a client's sampled flag is followed
    # New traces each worker records per second at most, over the ratio (a burst of as many; recording and exporting
    # 200 a second takes about 1% of a core); 0: no cap
    max_traces_per_second: Annotated[float, Meta(ge=0)] = 200.0


@dataclass
class Config:
    """The effective configuration of one server process."""

    server: ServerConfig = field(default_factory=ServerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    onnxruntime: OnnxRuntimeConfig = field(default_factory=OnnxRuntimeConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    upstreams: dict[str, Any] = field(default_factory=dict, compare=False)  # name -> UpstreamConfig
    source: str = field(default="defaults", compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections and their values, as they would be written in the TOML file."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _sections()}

    def to_toml(self) -> str:
        """The effective configuration as TOML text."""
        lines = [f"# effective configuration ({self.source})"]
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        for name, upstream in self.upstreams.items():  # credentials are never printed
            lines.append(f"\n[upstreams.{name}]")
            lines.append(f"kind = {_toml_value(upstream.kind)}")
            lines.append(f"base_url = {_toml_value(upstream.base_url)}")
            lines.append("models = {" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}"
                                                  for k, v in upstream.models.items()) + "}")
        return "\n".join(lines) + "\n"


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.name not in ("source", "upstreams")]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (``path``, else ``$APPLIANCE_CONFIG``, else none), apply environment overrides, validate."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    raw: dict[str, Any] = {}
    sources = ["defaults"]
    if path is not None:
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist; fix --config or {CONFIG_ENV}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {file} is not valid TOML: {exc}") from None
        sources.append(str(file))
    config = Config()
    for section_name, section_values in raw.items():
        if section_name == "upstreams":
            from appliance.upstream_config import parse_upstreams

            config.upstreams = parse_upstreams(section_values, str(path), environ)
            continue
        apply_table(_section(config, section_name, origin=str(path)), section_name, section_values, str(path))
    overrides = False
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        origin = f"environment variable {name}"
        section_name, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        section = _section(config, section_name, origin=origin)
        setting = validation.fields(type(section)).get(key)
        value = text if setting is None else validation.from_text(text, setting.hint)
        apply_table(section, section_name, {key: value}, origin)
        overrides = True
    if overrides:
        sources.append("APPLIANCE_* environment")
    config.source = " + ".join(sources)
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Checks that involve more than one setting."""
    routing = config.routing
    if routing.small_max_score > routing.mid_max_score:
        raise ConfigError(f"routing.small_max_score ({routing.small_max_score}) is above routing.mid_max_score "
                          f"({routing.mid_max_score}); the small tier's threshold must be the lower one")
    if routing.cloud_upstream and routing.cloud_upstream not in config.upstreams:
        raise ConfigError(f"routing.cloud_upstream = {routing.cloud_upstream!r} names no [upstreams.*] table; "
                          f"declared: {', '.join(config.upstreams) or 'none'}")
    if routing.cloud_upstream and config.upstreams[routing.cloud_upstream].kind != "openai":
        raise ConfigError(f"routing.cloud_upstream = {routing.cloud_upstream!r} is a "
                          f"{config.upstreams[routing.cloud_upstream].kind!r} upstream; routing sends chat and "
                          "completions, so it must be an 'openai' one")
    check_tracing(config.tracing)
    if config.server.workers > 1 and config.server.port == 0:
        raise ConfigError(
            f"server.workers = {config.server.workers} needs a fixed server.port (0 picks a different port per "
            "worker); set server.port or use one worker"
        )


def check_tracing(tracing: TracingConfig) -> None:
    """``[tracing] endpoint`` is an http(s) URL with the traces path; the packages are installed (when enabled)."""
    url = urlsplit(tracing.endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"tracing.endpoint = {tracing.endpoint!r} is not an http or https URL; set it to the "
                          f"collector's OTLP/HTTP traces URL, e.g. {DEFAULT_TRACES_ENDPOINT!r}")
    if url.path in ("", "/"):
        raise ConfigError(f"tracing.endpoint = {tracing.endpoint!r} has no path; OTLP/HTTP takes traces at "
                          f"/v1/traces: set it to {tracing.endpoint.rstrip('/') + '/v1/traces'!r}")
    if tracing.enabled:
        import importlib.util

        missing = [name for name in ("opentelemetry.sdk", "opentelemetry.proto")
                   if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"tracing.enabled = true needs {', '.join(missing)}: install opentelemetry-sdk and "
                              "opentelemetry-proto, or set tracing.enabled = false")


def apply_table(target: Any, name: str, table: Any, origin: str) -> None:
    """Validate a TOML table against the dataclass ``target`` and set its fields; raise :class:`ConfigError`."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] in {origin} must be a table of settings")
    try:
        validation.assign(target, table, (name,))
    except validation.Invalid as exc:
        raise ConfigError(exc.message(origin)) from None


def _section(config: Config, name: str, origin: str) -> Any:
    names = [f.name for f in _sections()]
    if name not in names:
        raise ConfigError(f"unknown configuration section {name!r} (from {origin}); sections are: {', '.join(names)}")
    return getattr(config, name)

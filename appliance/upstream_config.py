"""The ``[upstreams.<name>]`` tables: validated once at start, the credential read into a :class:`Secret`."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from msgspec import Meta

from appliance import validation
from appliance.validation import ConfigError

Kind = Literal["openai", "kserve"]
KINDS: tuple[str, ...] = get_args(Kind)
_URL = "an http:// or https:// URL: scheme, host, optional port and path prefix"
_MODELS = 'local model name = "upstream model name"; "*" = "*" passes any name through'
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Secret:
    """A credential that never shows its value in ``repr``, ``str``, logs or ``dataclasses.asdict`` output."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself; only for the ``Authorization`` header."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __deepcopy__(self, memo: dict) -> Secret:
        return self


@dataclass
class UpstreamConfig:
    """One ``[upstreams.<name>]`` table; :func:`parse_upstreams` builds it, validated, with the credential read.

    ``models`` maps a local model name or alias to the upstream's model name; the key ``"*"`` matches any name and
    maps it to itself (value ``"*"``) or to its value.
    """

    name: str
    kind: Kind
    base_url: Annotated[str, Meta(description=_URL)]
    models: Annotated[dict[Annotated[str, Meta(min_length=1)], Annotated[str, Meta(min_length=1)]],
                      Meta(min_length=1, description=_MODELS)]
    api_key_env: str = ""
    api_key_file: str = ""
    price_input_per_million: Annotated[float, Meta(ge=0, le=1e6)] = 0.0
    price_output_per_million: Annotated[float, Meta(ge=0, le=1e6)] = 0.0
    timeout_s: Annotated[float, Meta(ge=0.01, le=3600)] = 30.0
    max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 16
    failure_threshold: Annotated[int, Meta(ge=1, le=100_000)] = 5
    error_rate_threshold: Annotated[float, Meta(ge=0.01, le=1)] = 0.5
    error_window: Annotated[int, Meta(ge=1, le=100_000)] = 20
    cooldown_s: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    retry_budget: Annotated[float, Meta(ge=0, le=1)] = 0.2
    backoff_s: Annotated[float, Meta(ge=0, le=10)] = 0.05
    credential: Secret = field(default_factory=Secret, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")


def parse_upstreams(table: object, origin: str, environ: Mapping[str, str] = os.environ) -> dict[str, UpstreamConfig]:
    """Validate the ``[upstreams]`` table (name -> settings) from ``origin``; raise :class:`ConfigError`."""
    if not isinstance(table, dict):
        raise ConfigError(f"[upstreams] in {origin} must be a table of [upstreams.<name>] tables")
    return {name: _parse_one(name, entry, origin, environ) for name, entry in table.items()}


def _parse_one(name: object, entry: object, origin: str, environ: Mapping[str, str]) -> UpstreamConfig:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"upstream name {name!r} (from {origin}) is not allowed: expected letters, digits, "
                          "'-', '_' and '.', starting with a letter or digit")
    if not isinstance(entry, dict):
        raise ConfigError(f"[upstreams.{name}] in {origin} must be a table of settings")
    try:
        values = validation.values_for(UpstreamConfig, entry, ("upstreams", name), skip=("name", "credential"))
    except validation.Invalid as exc:
        raise ConfigError(exc.message(origin)) from None
    _check_base_url(f"upstreams.{name}.base_url", values["base_url"], origin)
    return UpstreamConfig(name=name, credential=_read_credential(name, values, origin, environ), **values)


def _check_base_url(setting: str, value: str, origin: str) -> None:
    parts = urllib.parse.urlsplit(value)
    if "@" in parts.netloc:  # do not echo the value: it holds a user or password
        raise ConfigError(f"{setting} (from {origin}) must not carry a user or password: "
                          f"put the credential in api_key_env or api_key_file")
    try:
        parts.port  # noqa: B018 - raises on a bad port
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{setting} = {value!r} (from {origin}) is not allowed: expected {_URL}")


def _read_credential(name: str, values: dict[str, Any], origin: str, environ: Mapping[str, str]) -> Secret:
    env, file = values.get("api_key_env", ""), values.get("api_key_file", "")
    if env and file:
        raise ConfigError(f"upstreams.{name}.api_key_env = {env!r} and upstreams.{name}.api_key_file = {file!r} "
                          f"(from {origin}) are both set: set at most one")
    if env:
        where = f"upstreams.{name}.api_key_env = {env!r} (from {origin})"
        text = environ.get(env, "")
        if not text.strip():
            raise ConfigError(f"{where}: environment variable {env} is not set or empty; export it or use api_key_file")
    elif file:
        where = f"upstreams.{name}.api_key_file = {file!r} (from {origin})"
        try:
            text = Path(file).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the file ({exc.strerror or type(exc).__name__}); "
                              "fix the path or its permissions") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: the file is not UTF-8 text") from None
        if not text.strip():
            raise ConfigError(f"{where}: the file is empty")
    else:
        return Secret()  # local upstreams need no credential
    secret = text.strip()
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise ConfigError(f"{where}: the credential contains whitespace or control characters")
    return Secret(secret)

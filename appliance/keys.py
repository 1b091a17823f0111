"""The API key store: one JSON file of key records, holding only a hash of each key's secret.

A token reads ``apk_<id>_<secret>``. The id is public (it names the key in ``appliance keys list`` and in logs);
the secret is shown once, when the key is created. The file is written by ``appliance keys`` and read by the
server, which polls :meth:`KeyStore.mtime_ns` and loads a fresh :class:`KeySet` when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from msgspec import Meta

from appliance import validation
from appliance.private_files import locked, write_atomically

KEY_PREFIX = "apk_"
Lane = Literal["interactive", "batch"]
CacheScope = Literal["tenant", "key", "none"]
LANES: tuple[str, ...] = get_args(Lane)
CACHE_SCOPES: tuple[str, ...] = get_args(CacheScope)
FILE_VERSION = 1

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # names, tenants and workflow tags
_ID = re.compile(r"[0-9a-f]{12}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 . _ -"
# Patterns end in \Z, not $: a $ would let a trailing newline through.
Name = Annotated[str, Meta(pattern=rf"^{NAME.pattern}\Z", description=_NAME_RULE)]
Rate = Annotated[int, Meta(ge=0, description="0 = unlimited")]
UnixTime = Annotated[float, Meta(ge=0, description="a unix time in seconds")]
ModelName = Annotated[str, Meta(pattern=r"^[^\s,]+\Z", description="a model name without spaces or commas")]
# Compared against when the token names no known key, so that a failure takes as long whatever its cause.
_DUMMY_DIGEST = hashlib.sha256(b"appliance: no such key").digest()


class KeyStoreError(ValueError):
    """The key store or a key request cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class ApiKey:
    """One API key's record (without its secret): who it belongs to and what it may do."""

    id: Annotated[str, Meta(pattern=rf"^{_ID.pattern}\Z", description="12 lowercase hex digits")]
    name: Name
    tenant: Name
    models: tuple[ModelName, ...]  # model names or aliases it may call; empty: all models
    cloud: bool = False  # its requests' data may leave the device
    cache_scope: CacheScope = "tenant"  # "tenant": shared by the tenant's keys; "key": private to this key; "none"
    requests_per_minute: Rate = 0
    tokens_per_minute: Rate = 0
    admin: bool = False
    # The default workflow tag for cost attribution; "": none.
    workflow: Annotated[str, Meta(pattern=rf"^({NAME.pattern})?\Z", description=f"{_NAME_RULE}, or '' for none")] = ""
    lane: Lane = "interactive"  # the default admission lane
    # It may send token ids as embeddings input: off by default, since clients that send another tokenizer's ids
    # (LangChain's tiktoken length check) would get the wrong tokens embedded, silently.
    token_input: bool = False
    # Its requests and answers may be kept after the answer (the response cache, routing-quality replays); False is
    # the "local-only-no-retention" policy: its data also never leaves the device.
    retention: bool = True
    created: UnixTime = 0.0
    revoked: UnixTime = 0.0  # the time of revocation; 0: active

    @property
    def active(self) -> bool:
        """Whether the key has not been revoked."""
        return self.revoked == 0

    def scope(self) -> str | None:
        """The response-cache scope of this key's requests, or ``None`` when they must not be cached."""
        if not self.retention:
            return None
        if self.cache_scope == "tenant":
            return f"tenant:{self.tenant}"
        if self.cache_scope == "key":
            return f"key:{self.id}"
        return None

    def may_use(self, *names: str) -> bool:
        """Whether the key may call a model known by any of ``names`` (its name and aliases)."""
        return not self.models or any(name in self.models for name in names)


class KeySet:
    """An immutable snapshot of the store used by the server to authenticate."""

    def __init__(self, keys: Iterable[tuple[ApiKey, str]]) -> None:
        """``keys``: each record with its stored hash (``"sha256:<hex>"``)."""
        self._keys: dict[str, tuple[ApiKey, bytes]] = {}
        for key, stored in keys:
            if not _HASH.fullmatch(stored):
                raise ValueError(f"key {key.id}: stored hash must read 'sha256:' and 64 lowercase hex digits")
            self._keys[key.id] = (key, bytes.fromhex(stored.removeprefix("sha256:")))
        self._active = sum(1 for key, _ in self._keys.values() if key.active)

    def __len__(self) -> int:
        """The number of active keys."""
        return self._active

    def verify(self, token: str) -> ApiKey | None:
        """The active key that ``token`` belongs to, or ``None`` (malformed, unknown, wrong secret or revoked)."""
        parsed = _parse_token(token)
        entry = self._keys.get(parsed[0]) if parsed else None
        if parsed is None or entry is None:
            hmac.compare_digest(_digest(token if isinstance(token, str) else ""), _DUMMY_DIGEST)
            return None
        key, expected = entry
        if not hmac.compare_digest(_digest(parsed[1]), expected):
            return None
        return key if key.active else None


class KeyStore:
    """The key file at ``path``: read it, and create or revoke keys without losing concurrent changes."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """No I/O happens until a method is called."""
        self.path = Path(path)
        self._clock = clock

    def load(self) -> KeySet:
        """A snapshot for authentication; empty when the file does not exist. Raises :class:`KeyStoreError`."""
        return KeySet(self._read())

    def keys(self) -> list[ApiKey]:
        """Every record, revoked ones included, oldest first."""
        return sorted((key for key, _ in self._read()), key=lambda key: key.created)

    def create(self, *, name: str, tenant: str, models: Iterable[str] = (), cloud: bool = False,
               cache_scope: str = "tenant", requests_per_minute: int = 0, tokens_per_minute: int = 0,
               admin: bool = False, workflow: str = "", lane: str = "interactive",
               token_input: bool = False, retention: bool = True) -> tuple[ApiKey, str]:
        """Add a key; return its record and its token, which is not stored and cannot be shown again."""
        if isinstance(models, str):
            raise KeyStoreError(f"cannot create key {name!r}: models must be a list of names, not {models!r}")
        if cloud and not retention:
            raise KeyStoreError(f"cannot create key {name!r}: a key without retention keeps its data on the device; "
                                "drop --cloud or --no-retention")
        try:
            key = _checked(dict(id="0" * 12, name=name, tenant=tenant, models=tuple(models), cloud=cloud,
                                cache_scope=cache_scope, requests_per_minute=requests_per_minute,
                                tokens_per_minute=tokens_per_minute, admin=admin, workflow=workflow, lane=lane,
                                token_input=token_input, retention=retention))
        except KeyStoreError as exc:
            raise KeyStoreError(f"cannot create key {name!r}: {exc}") from None
        with locked(self.path):
            records = self._read()
            taken = {existing.id for existing, _ in records}
            for existing, _ in records:
                if existing.active and existing.name == name:
                    raise KeyStoreError(
                        f"{self.path}: an active key named {name!r} already exists (id {existing.id}); choose "
                        f"another name, or revoke it first with `appliance keys revoke {existing.id}`"
                    )
            key_id = secrets.token_hex(6)
            while key_id in taken:
                key_id = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            key = replace(key, id=key_id, created=self._clock())
            # The secret is 256 random bits, so a fast hash is enough: there is nothing to brute-force.
            records.append((key, "sha256:" + hashlib.sha256(secret.encode()).hexdigest()))
            self._write(records)
        return key, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, id_or_name: str) -> ApiKey:
        """Revoke the key with this id, else the active key with this name; return the revoked record."""
        with locked(self.path):
            records = self._read()
            index = next((i for i, (key, _) in enumerate(records) if key.id == id_or_name), None)
            if index is None:
                index = next((i for i, (key, _) in enumerate(records) if key.name == id_or_name and key.active),
                             None)
            if index is None:
                if any(key.name == id_or_name for key, _ in records):
                    raise KeyStoreError(f"{self.path}: the key named {id_or_name!r} is already revoked")
                raise KeyStoreError(
                    f"{self.path}: no key has the id or name {id_or_name!r}; `appliance keys list` shows them"
                )
            key, stored = records[index]
            if not key.active:
                raise KeyStoreError(f"{self.path}: key {key.id} ({key.name}) is already revoked")
            key = replace(key, revoked=self._clock())
            records[index] = (key, stored)
            self._write(records)
        return key

    def mtime_ns(self) -> int:
        """The file's modification time in nanoseconds; 0 when it does not exist."""
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _read(self) -> list[tuple[ApiKey, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyStoreError(f"cannot read the API key store {self.path}: {exc}; check the file and its "
                                "permissions (paths.keys_file)") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyStoreError(
                f"the API key store {self.path} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno}); repair it or restore it from a backup"
            ) from None
        if not isinstance(document, dict) or type(document.get("version")) is not int \
                or document["version"] != FILE_VERSION or not isinstance(document.get("keys"), list):
            raise KeyStoreError(
                f"the API key store {self.path} must be a JSON object {{\"version\": {FILE_VERSION}, \"keys\": "
                "[...]}; repair it or restore it from a backup"
            )
        records = [self._record(raw, position) for position, raw in enumerate(document["keys"], 1)]
        seen: dict[str, ApiKey] = {}
        active_names: dict[str, ApiKey] = {}
        for key, _ in records:
            if key.id in seen:
                raise KeyStoreError(f"{self.path}: two keys have the id {key.id}; remove or revoke one of them")
            seen[key.id] = key
            if key.active and key.name in active_names:
                raise KeyStoreError(f"{self.path}: keys {active_names[key.name].id} and {key.id} are both active "
                                    f"and named {key.name!r}; revoke one with `appliance keys revoke ID`")
            if key.active:
                active_names[key.name] = key
        return records

    def _record(self, raw: Any, position: int) -> tuple[ApiKey, str]:
        label = f"key #{position}"
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            label = f"key {raw['id']}" + (f" ({raw['name']})" if isinstance(raw.get("name"), str) else "")

        def fail(problem: str) -> KeyStoreError:
            return KeyStoreError(f"{self.path}: {label}: {problem}; correct the record or restore the file from "
                                 "a backup")

        if not isinstance(raw, dict):
            raise fail("must be a JSON object")
        try:
            key = _checked({name: value for name, value in raw.items() if name != "hash"})
        except KeyStoreError as exc:
            raise fail(str(exc)) from None
        if "hash" not in raw:
            raise fail("missing field 'hash'")
        if not isinstance(raw["hash"], str) or not _HASH.fullmatch(raw["hash"]):
            raise fail("hash must read 'sha256:' followed by 64 lowercase hex digits")
        return key, raw["hash"]

    def _write(self, records: list[tuple[ApiKey, str]]) -> None:
        document = {"version": FILE_VERSION, "keys": [_to_json(key) | {"hash": stored} for key, stored in records]}
        write_atomically(self.path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def _checked(values: dict[str, Any]) -> ApiKey:
    """A record from its fields; :class:`KeyStoreError` (without the file) says which field is wrong and why."""
    try:
        key = validation.build(ApiKey, values)
    except validation.Invalid as exc:
        if exc.kind == "unknown":
            problem = f"unknown field {exc.loc[-1]!r}; the fields are: {', '.join([*exc.known, 'hash'])}"
        elif exc.kind == "missing":
            problem = f"missing field {exc.path!r}"
        else:
            problem = exc.message()
        raise KeyStoreError(problem) from None
    if not (math.isfinite(key.created) and math.isfinite(key.revoked)):  # msgspec's limits let infinity through
        raise KeyStoreError("created and revoked must be unix times >= 0")
    return key


def _to_json(key: ApiKey) -> dict[str, Any]:
    record = asdict(key)
    record["models"] = list(key.models)
    return record


def _parse_token(token: str) -> tuple[str, str] | None:
    if not isinstance(token, str) or not token.startswith(KEY_PREFIX):
        return None
    key_id, separator, secret = token[len(KEY_PREFIX):].partition("_")
    if not separator or not secret or not _ID.fullmatch(key_id):
        return None
    return key_id, secret


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()

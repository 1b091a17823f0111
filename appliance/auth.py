"""Who is calling: API keys to principals, admin checks and per-key request and token limits.

With no keys configured and the server bound to loopback, every caller is the local operator (:data:`LOCAL`).
Once the key store holds an active key, or the server listens beyond loopback, every request but health, metrics
and the OpenAPI document needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import Forbidden, RateLimited, Unauthorized
from appliance.keys import ApiKey, KeySet, KeyStore, KeyStoreError
from appliance.types import Principal

log = logging.getLogger("appliance.auth")

REFRESH_INTERVAL_S = 1.0  # how often the key store's mtime is checked: revocation takes effect within this


def principal_for(key: ApiKey) -> Principal:
    """The principal an API key stands for."""
    return Principal(tenant=key.tenant, key_id=key.id, key_name=key.name, models=key.models, cloud=key.cloud,
                     cache_scope=key.scope(), admin=key.admin, workflow=key.workflow,
                     requests_per_minute=key.requests_per_minute, tokens_per_minute=key.tokens_per_minute,
                     lane=key.lane, token_input=key.token_input, retention=key.retention)


# The local operator on a loopback-only server without keys: may do everything except send data off the box.
# Its cache scope is one no key can have (keys get "tenant:..." or "key:..."), so that entries cached before the
# first key was made are never served to a key.
LOCAL = Principal(tenant="local", key_id="", key_name="local", models=(), cloud=False, cache_scope="operator",
                  admin=True)


def is_loopback(host: str) -> bool:
    """Whether ``host`` accepts local connections only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, store: KeyStore) -> str | None:
    """Why the server must not listen on ``host``, or ``None``: beyond loopback it needs at least one active key."""
    if is_loopback(host):
        return None
    try:
        keys = store.load()
    except KeyStoreError as exc:
        return f"the key store is invalid: {exc}"
    if len(keys):
        return None
    return (f"server.host = {host!r} accepts connections from other machines, but the key store {store.path} has "
            "no active API keys, so anyone who can reach the port could use the models and their cached answers. "
            "Create a key first (appliance keys create --name NAME --tenant TENANT, add --admin for an operator "
            "key), or set server.host = \"127.0.0.1\"")


class Authenticator:
    """Turns the ``Authorization`` header into a :class:`Principal`; picks up key store changes while serving."""

    def __init__(self, store: KeyStore, loopback_only: bool) -> None:
        self.store = store
        self._loopback_only = loopback_only
        self._keys = KeySet(())
        self._mtime_ns = -1
        self._principals: dict[str, Principal] = {}

    @property
    def required(self) -> bool:
        """Whether callers must present a key: keys exist, or the server is reachable from other hosts."""
        return len(self._keys) > 0 or not self._loopback_only

    def load(self) -> None:
        """Read the store now; raise :class:`KeyStoreError` when it is invalid (used at start)."""
        mtime = self.store.mtime_ns()
        self._swap(self.store.load(), mtime)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the store if it changed (on the loop: a reload); on an invalid store keep the keys in force."""
        mtime = self.store.mtime_ns()
        if mtime == self._mtime_ns and not force:
            return False
        return self._apply(self._read(mtime), mtime)

    def _read(self, mtime: int) -> KeySet | None:
        try:
            return self.store.load()
        except (KeyStoreError, OSError) as exc:
            log.error("the key store %s is invalid; the keys loaded before stay in force: %s", self.store.path, exc)
            return None

    def _apply(self, keys: KeySet | None, mtime: int) -> bool:
        if keys is None:
            self._mtime_ns = mtime
            return False
        self._swap(keys, mtime)
        log.info("key store %s reloaded: %d active keys", self.store.path, len(keys))
        return True

    def _swap(self, keys: KeySet, mtime_ns: int) -> None:
        self._keys, self._mtime_ns, self._principals = keys, mtime_ns, {}

    async def watch(self) -> None:
        """Poll the store's mtime so that new and revoked keys take effect without a restart (run as a task).

        The file is read in a worker thread and the new keys swapped in on the loop, so that an authentication in
        progress never mixes the old keys with the new snapshot's verified-token memo.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            with contextlib.suppress(OSError):
                mtime = self.store.mtime_ns()
                if mtime != self._mtime_ns:
                    self._apply(await loop.run_in_executor(None, self._read, mtime), mtime)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an ``Authorization`` header; raise :class:`Unauthorized` when it names no active key."""
        if not self.required:
            return LOCAL
        if not authorization:
            if not len(self._keys):
                raise Unauthorized("this server listens beyond loopback and has no API keys yet; create one with "
                                   "`appliance keys create` and send it as 'Authorization: Bearer <key>'")
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        token = token.strip()
        principal = self._principals.get(token)
        if principal is not None:
            return principal
        key = self._keys.verify(token)
        if key is None:
            raise Unauthorized("unknown or revoked API key")
        principal = principal_for(key)
        if len(self._principals) < 4096:  # verified tokens of this snapshot; cleared whenever the store changes
            self._principals[token] = principal
        return principal


def require_admin(principal: Principal, what: str) -> None:
    """Raise :class:`Forbidden` unless the caller holds an admin key."""
    if not principal.admin:
        raise Forbidden(f"{what} needs an admin key (appliance keys create --admin); key {principal.key_name!r} "
                        "is not one")


@dataclass(slots=True)
class _Bucket:
    level: float
    updated: float


class RateLimiter:
    """Per-key token buckets for requests and tokens per minute.

    Each process enforces its share (``1 / workers``) of a key's limits: the buckets live in process memory, so
    with several worker processes a key's budget is split between them.
    """

    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._share = share
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _bucket(self, buckets: dict[str, _Bucket], key: str, per_minute: float) -> tuple[_Bucket, float]:
        capacity = max(per_minute * self._share, 1.0)
        now = self._clock()
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(capacity, now)
        else:
            bucket.level = min(capacity, bucket.level + (now - bucket.updated) * capacity / 60.0)
            bucket.updated = now
        return bucket, capacity

    def admit(self, principal: Principal) -> None:
        """Take one request from the key's budget; raise :class:`RateLimited` with the wait when it is spent."""
        requests_per_minute, tokens_per_minute = principal.requests_per_minute, principal.tokens_per_minute
        if tokens_per_minute:
            bucket, capacity = self._bucket(self._tokens, principal.key_id, tokens_per_minute)
            if bucket.level <= 0:
                wait = -bucket.level * 60.0 / capacity + 60.0 / capacity
                raise RateLimited(f"key {principal.key_name!r} is over its {tokens_per_minute} tokens per minute; "
                                  f"retry in {math.ceil(wait)} s", retry_after_s=wait)
        if requests_per_minute:
            bucket, capacity = self._bucket(self._requests, principal.key_id, requests_per_minute)
            if bucket.level < 1:
                wait = (1 - bucket.level) * 60.0 / capacity
                raise RateLimited(f"key {principal.key_name!r} is over its {requests_per_minute} requests per "
                                  f"minute; retry in {math.ceil(wait)} s", retry_after_s=wait)
            bucket.level -= 1

    def charge_tokens(self, principal: Principal, tokens: int) -> None:
        """Take the tokens a finished request used; the next request waits while the budget is below zero."""
        tokens_per_minute = principal.tokens_per_minute
        if tokens_per_minute and tokens:
            bucket, _ = self._bucket(self._tokens, principal.key_id, tokens_per_minute)
            bucket.level -= tokens

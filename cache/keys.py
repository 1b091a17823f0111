"""Cache keys: a deterministic encoding of requests and the hashes that scope them.

A key binds the caller's permission scope, the model, its version and build to the
canonical form of the request, so that two callers in different scopes can never share
an entry, and a rebuilt or reloaded model never serves a response of its predecessor.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import msgpack

from appliance.private_files import locked, write_atomically

__all__ = ["cache_key", "canonical_bytes", "load_label_key", "scope_hash"]

_SCOPE_DOMAIN = b"appliance-cache-scope\0"
_KEY_DOMAIN = "appliance-cache-key/1"

# Far deeper than any real request, well within Python's recursion limit.
_MAX_DEPTH = 256
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# Integers outside msgpack's 64-bit range are encoded as this extension type (decimal text).
_EXT_BIGINT = 1


def scope_hash(scope: str, key: bytes) -> str:
    """A short, stable label for ``scope`` (16 hex chars): HMAC-SHA256 under this install's ``key``.

    Used in metrics and stored in entries instead of the raw scope. Keyed, so that a guessed tenant name cannot
    be confirmed against a label by anyone who does not hold the install's key.
    """
    return hmac.new(key, _SCOPE_DOMAIN + scope.encode(), hashlib.sha256).hexdigest()[:16]


def load_label_key(path: Path) -> bytes:
    """The install's scope-label key in ``path`` (32 random bytes, owner-only), made on first use.

    Worker processes race to make it on a new install: each reads or makes it under the file's lock, so a worker
    never reads another's key half-written, and all of them end up with the one key made first.
    """
    with locked(path):
        try:
            return _read_label_key(path)
        except FileNotFoundError:
            key = secrets.token_bytes(32)
            write_atomically(path, key)
            return key


def _read_label_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{path} holds {len(key)} bytes, not the 32 of a scope-label key; delete it to make a new one "
                         "(the stored cache entries then lose their labels)")
    return key


def canonical_bytes(value: object) -> bytes:
    """Encode a JSON-like value deterministically.

    Equal values give equal bytes whatever the insertion order of their dict keys;
    values of different types never collide (``1``, ``1.0``, ``"1"``, ``True`` and
    ``b"1"`` all differ, as do a dict and a list of its pairs). Tuples encode as lists.

    Raises:
        TypeError: for a value (or dict key) that is not None, bool, int, float, str,
            bytes, bytearray, list, tuple or dict.
        ValueError: for nesting deeper than 256 levels, or an integer too long to print.
    """
    # A packer per call: a Packer keeps a buffer and must not be shared between threads.
    return _encode(msgpack.Packer(use_bin_type=True), value, 0)


def cache_key(scope: str, model: str, version: int, build_hash: str, canonical: object) -> bytes:
    """Return the 32-byte key of ``canonical`` (a request) for a scope and a model build.

    ``scope`` is whatever the server derived from the caller's principal; it is hashed
    as given. Raises TypeError for arguments of the wrong type (see ``canonical_bytes``).
    """
    for name, text in (("scope", scope), ("model", model), ("build_hash", build_hash)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be str, got {type(text).__name__}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be int, got {type(version).__name__}")
    # Each field is a separate msgpack item with its own length, so no two tuples encode alike.
    fields = [_KEY_DOMAIN, scope, model, version, build_hash, canonical_bytes(canonical)]
    return hashlib.sha256(msgpack.packb(fields, use_bin_type=True)).digest()


def _encode(packer: msgpack.Packer, value: object, depth: int) -> bytes:
    if depth > _MAX_DEPTH:
        raise ValueError("value is nested too deeply to be cached")
    # bool before int: bool is an int subclass, but msgpack gives it its own type.
    if value is None or isinstance(value, bool):
        return packer.pack(value)
    if isinstance(value, int):
        if _INT_MIN <= value <= _INT_MAX:
            return packer.pack(int(value))
        return packer.pack(msgpack.ExtType(_EXT_BIGINT, str(int(value)).encode()))
    if isinstance(value, float):
        return packer.pack(float(value))
    if isinstance(value, str):
        return packer.pack(str(value))
    if isinstance(value, (bytes, bytearray)):
        return packer.pack(bytes(value))
    if isinstance(value, (list, tuple)):
        parts = [packer.pack_array_header(len(value))]
        for item in value:
            parts.append(_encode(packer, item, depth + 1))
        return b"".join(parts)
    if isinstance(value, dict):
        # Sorting encoded pairs orders keys of any supported type; as no encoding is a prefix
        # of another, that is the order of the encoded keys.
        pairs = []
        for key, item in value.items():
            pairs.append(_encode(packer, key, depth + 1) + _encode(packer, item, depth + 1))
        return packer.pack_map_header(len(pairs)) + b"".join(sorted(pairs))
    raise TypeError(f"cannot cache a value of type {type(value).__name__}")

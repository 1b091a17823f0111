"""Cache keys: a deterministic encoding of requests and the hashes that scope them.

A key binds the caller's permission scope, the model, its version and build to the
canonical form of the request, so that two callers in different scopes can never share
an entry, and a rebuilt or reloaded model never serves a response of its predecessor.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

import msgpack

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

    Worker processes race to make it: each writes a key to a file of its own and links it into place, which either
    puts a whole file there or fails because another's is there already; the losers read the winner's. Where the
    filesystem has no hard links, the key is created in place and a reader waits briefly for all 32 bytes.
    """
    try:
        return _read_label_key(path, wait_s=LABEL_KEY_WAIT_S)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    own = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            _write_key(fd, key)
        finally:
            os.close(fd)
        os.link(own, path)
        return key
    except FileExistsError:
        pass  # another worker's key is in place
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if _create_in_place(path, key):  # no hard links here (vfat, some network and FUSE mounts)
            return key
    finally:
        own.unlink(missing_ok=True)
    return _read_label_key(path, wait_s=LABEL_KEY_WAIT_S)


LABEL_KEY_WAIT_S = 1.0  # how long a reader waits for a key another process is still writing in place


def _create_in_place(path: Path, key: bytes) -> bool:
    """Create ``path`` holding ``key``; ``False`` if another process created it first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        _write_key(fd, key)
    finally:
        os.close(fd)
    return True


def _write_key(fd: int, key: bytes) -> None:
    os.write(fd, key)
    os.fsync(fd)


def _read_label_key(path: Path, wait_s: float = 0.0) -> bytes:
    deadline = time.monotonic() + wait_s
    while True:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        if len(key) > 32 or time.monotonic() >= deadline:
            raise ValueError(f"{path} holds {len(key)} bytes, not the 32 of a scope-label key; delete it to make a "
                             "new one (the stored cache entries then lose their labels)")
        time.sleep(0.01)  # a process that created it in place is still writing


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

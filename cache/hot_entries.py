"""The answers one worker process read from the response cache or stored in it lately, kept in its memory.

A hit from LMDB costs a hand-off to a worker thread and back (tens of microseconds of CPU, more than the read).
A repeat of an answer held here is a hit on the event loop, with no hand-off: a dictionary lookup and an expiry
check. LMDB stays the cache of record, shared by the workers and kept across restarts; this is a bounded,
least-recently-used copy of part of it, under the same keys (so the same scopes: a key names its caller's scope),
and an entry here expires when its LMDB entry does.

What LMDB loses another way than by expiry is not mirrored entry by entry: a purge in any worker advances the
shared :class:`~appliance.cache.purge_epoch.PurgeEpoch`, and a worker that sees it move drops everything it
holds. Eviction from LMDB to stay within ``max_bytes`` does not reach here: an answer evicted there and still held
here is still a correct answer, within its time to live.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class HotEntries:
    """Payloads by cache key, at most ``max_bytes`` of them (least recently used go first), each until its expiry
    (unix seconds on ``clock``). ``max_bytes`` 0 holds nothing. Used from one event loop."""

    def __init__(self, max_bytes: int, clock: Callable[[], float]) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        """The payload held under ``key`` and not expired, else ``None`` (an expired one is dropped)."""
        held = self._entries.get(key)
        if held is None:
            return None
        payload, expires = held
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return payload

    def put(self, key: bytes, payload: bytes, expires: float) -> None:
        """Hold ``payload`` under ``key`` until ``expires``; one larger than an eighth of the budget is not held
        (it would push out many small ones). A budget of 0 holds nothing, not even an empty payload."""
        if not self.max_bytes or len(payload) * 8 > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (payload, expires)
        self.bytes += len(payload)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Hold nothing."""
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: bytes) -> None:
        payload, _ = self._entries.pop(key)
        self.bytes -= len(payload)

"""Waiting for what another thread or process does, without fixed sleeps.

Within one process a test waits on an event that the code or a fake sets, and moves time with a
:class:`ManualClock`. Across processes (a server's readiness, its log, a file it writes) there is often nothing to
wait on but the effect itself: :func:`wait_until` polls for it and returns as soon as it holds. Its deadline only
bounds a failure; no test asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.02


def wait_until(condition: Callable[[], T], timeout_s: float = 60.0, what: str | Callable[[], str] = "") -> T:
    """The first truthy value of ``condition()``, called every few milliseconds; ``AssertionError`` after
    ``timeout_s`` without one, saying ``what`` was awaited (a callable makes the message only then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"not within {timeout_s} s: {message or condition}")
        time.sleep(POLL_S)


class ManualClock:
    """A monotonic clock that moves only when the test calls :meth:`advance`.

    It also tells when a thread other than the one that made it has read it: the batchers' worker threads read
    their clock only once they hold a queued request, so :meth:`read_by_worker` returning means the worker has
    looked at what was queued and decided what to do with it at the current time.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._owner = threading.get_ident()
        self._read = threading.Event()

    def __call__(self) -> float:
        if threading.get_ident() != self._owner:
            self._read.set()
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        """Move the clock on by ``seconds``."""
        self.now += seconds

    async def read_by_worker(self, timeout_s: float = 10.0) -> None:
        """Wait until another thread has read the clock since the last call."""
        assert await asyncio.to_thread(self._read.wait, timeout_s), "the worker never read the clock"
        self._read.clear()

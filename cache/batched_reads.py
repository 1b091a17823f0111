"""Cache lookups gathered into worker-thread calls: one read transaction for many requests.

A lookup that ran in a worker thread of its own cost a thread hand-off each (about 80 us of CPU on the serving
process, and the GIL passed back and forth), far more than the LMDB read itself (a few us). Lookups made while a
read is in flight wait for it and then go together, so under load one hand-off serves the lookups of many
requests, and a lone request still takes exactly one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

Found = TypeVar("Found")

MAX_IN_FLIGHT = 2  # reads running at once: a slow page read holds up the lookups of one read, not all of them


class BatchedReads(Generic[Found]):
    """Runs ``read_many(keys)`` in ``executor`` for the keys of the lookups waiting, each key once per read.

    ``read_many`` must answer one item per key, in order, and never raise for a key it cannot read (an exception
    fails every lookup of that read). Used from one event loop.
    """

    def __init__(self, executor: Executor, read_many: Callable[[Sequence[bytes]], Sequence[Found]],
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._executor = executor
        self._read_many = read_many
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._waiting: dict[bytes, asyncio.Future[Found]] = {}

    async def get(self, key: bytes) -> Found:
        """What ``read_many`` answers for ``key``."""
        found = self._waiting.get(key)
        if found is None:
            loop = asyncio.get_running_loop()
            found = self._waiting[key] = loop.create_future()
            if len(self._waiting) == 1 and self._in_flight < self._max_in_flight:
                # Next loop iteration: the lookups of requests read in this one go in the same read.
                self._in_flight += 1
                loop.call_soon(self._start)
        # A lookup whose caller gives up must not cancel the others sharing the read.
        return await asyncio.shield(found)

    def _start(self) -> None:
        if not self._waiting:  # a read that ended meanwhile took them
            self._in_flight -= 1
            return
        waiting, self._waiting = self._waiting, {}
        read = asyncio.get_running_loop().run_in_executor(self._executor, self._read_many, list(waiting))
        read.add_done_callback(lambda done: self._deliver(waiting, done))

    def _deliver(self, waiting: dict[bytes, asyncio.Future[Found]], done: asyncio.Future) -> None:
        if self._waiting:
            self._start()  # the lookups that came meanwhile, together, in the slot this read frees
        else:
            self._in_flight -= 1
        if done.cancelled():
            for future in waiting.values():
                future.cancel()
        elif (error := done.exception()) is not None:
            for future in waiting.values():
                if not future.done():
                    future.set_exception(error)
        else:
            for future, found in zip(waiting.values(), done.result()):
                if not future.done():
                    future.set_result(found)

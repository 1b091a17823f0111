"""Model requests in flight across a group of worker processes, for work that must run only when all of them are
idle (the routing-quality replays).

Each worker publishes, every ``interval_s``, how many model requests it has in flight and how many it has started
in all, into its own 16-byte slot of a small shared file in the group's control folder (memory-mapped; a slot has
one writer, and aligned 8-byte stores are not torn). A reader sums the others' in-flight counts with its own, and
counts a sibling whose started total moved since the last read as busy, so that a request that came and went
between two publications is not missed.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.api.state import Lifecycle
    from appliance.workers import WorkerGroup

SLOT = struct.Struct("<qq")  # in flight, started in all
FILE_NAME = "activity"


class SharedActivity:
    """This worker's view of the model requests in flight in its group (``in_flight``), and its share of it."""

    def __init__(self, group: WorkerGroup, lifecycle: Lifecycle, interval_s: float = 0.02,
                 path: Path | None = None) -> None:
        self._group, self._lifecycle, self._interval_s = group, lifecycle, interval_s
        self._path = path or group.control_dir / FILE_NAME
        self._map: mmap.mmap | None = None
        self._seen: dict[int, int] = {}  # sibling -> started total at the last read

    def open(self) -> None:
        """Map the group's file (made, or grown to one slot per worker, by whichever worker comes first)."""
        size = SLOT.size * self._group.count
        descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(descriptor).st_size < size:
                os.ftruncate(descriptor, size)
            self._map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)

    def close(self) -> None:
        """Stop publishing (this worker's slot says nothing in flight) and unmap."""
        if self._map is not None:
            SLOT.pack_into(self._map, SLOT.size * self._group.index, 0, self._lifecycle.model_started)
            self._map.close()
            self._map = None

    def publish(self) -> None:
        """Write this worker's counts into its slot."""
        if self._map is not None:
            lifecycle = self._lifecycle
            SLOT.pack_into(self._map, SLOT.size * self._group.index, lifecycle.model_requests,
                           lifecycle.model_started)

    def in_flight(self) -> int:
        """Model requests in flight here and in the siblings, plus one for each sibling that started one since the
        last read."""
        total = self._lifecycle.model_requests
        if self._map is None:
            return total
        for sibling in self._group.siblings():
            in_flight, started = SLOT.unpack_from(self._map, SLOT.size * sibling)
            total += in_flight + (started != self._seen.get(sibling, started))
            self._seen[sibling] = started
        return total

    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """An aiohttp ``cleanup_ctx``: map the file and publish every ``interval_s`` while the server runs."""
        self.open()
        publisher = asyncio.get_running_loop().create_task(self._publish_periodically(), name="worker-activity")
        yield
        publisher.cancel()
        self.close()

    async def _publish_periodically(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(self._interval_s)

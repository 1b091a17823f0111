"""A counter that every purge of the response cache advances, shared by the server's worker processes.

Each worker keeps the answers it read or wrote lately in its own memory (:mod:`appliance.cache.hot_entries`). A
purge runs in one worker; the others learn of it here: the counter lives in a file of eight bytes beside the LMDB
files, mapped into every worker's memory, so reading it on each lookup costs a memory read, not a system call or a
transaction. The purging worker advances it (under the file's lock) after the purge has committed, so a lookup that
starts once the purge has answered sees the new value and drops what it holds.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from appliance.private_files import locked

SIZE = 8  # one little-endian unsigned counter


class PurgeEpoch:
    """The purge counter in ``path``, made (zero) on first use; :meth:`current` is 0 until :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._map: mmap.mmap | None = None

    def open(self) -> None:
        """Map the file, making it under its lock when missing (blocking: call from a worker thread)."""
        with locked(self.path):
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(descriptor).st_size < SIZE:
                    os.ftruncate(descriptor, SIZE)  # a new file reads as zeros: epoch 0
                self._map = mmap.mmap(descriptor, SIZE)
            finally:
                os.close(descriptor)  # the mapping keeps the file

    def current(self) -> int:
        """The counter as every worker sees it now."""
        mapped = self._map
        return 0 if mapped is None else int.from_bytes(mapped[:SIZE], "little")

    def advance(self) -> int:
        """Add one (blocking: the file's lock is taken; call from a worker thread); returns the new value."""
        if self._map is None:
            return 0
        with locked(self.path):
            value = (self.current() + 1) % 2**64
            self._map[:SIZE] = value.to_bytes(SIZE, "little")
        return value

    def close(self) -> None:
        """Unmap the file."""
        if self._map is not None:
            self._map.close()
            self._map = None

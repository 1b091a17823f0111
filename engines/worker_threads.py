"""Worker threads for the schedulers: one per engine instance, asleep on a wake-up queue while idle."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence

from appliance.engines.base import Engine


class EngineThreads:
    """Starts a thread per engine, lets idle threads sleep under a shared lock, and tells when all have stopped.

    Idle threads block on a queue of wake-up tokens (one futex, no lock hand-back, unlike a Condition); a spare
    token only costs a thread one extra look at its work.
    """

    def __init__(self, engines: Sequence[Engine], name: str) -> None:
        if not engines:
            raise ValueError("a scheduler needs at least one engine instance")
        self.engines = list(engines)
        self.name = name
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._waiting = 0
        self._exited = 0
        self._stopped: asyncio.Event | None = None
        self._prepared: asyncio.Future[None] | None = None
        self._prepared_count = 0

    def start(self, serve: Callable[[Engine], None]) -> None:
        """Run ``serve(engine)`` in a thread per engine; call on the event loop that will submit work.

        Each thread first calls its engine's ``prepare_thread()`` where it has one (engines whose CUDA graphs
        belong to the thread that captured them); :meth:`prepared` waits for that.
        """
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._prepared = self.loop.create_future()
        for index, engine in enumerate(self.engines):
            threading.Thread(target=self._run, args=(serve, engine), name=f"{self.name}-{index}",
                             daemon=True).start()

    def _run(self, serve: Callable[[Engine], None], engine: Engine) -> None:
        assert self.loop is not None
        prepare = getattr(engine, "prepare_thread", None)
        try:
            if prepare is not None:
                prepare()
        except Exception as exc:  # the version fails to load with this error; the thread ends
            self.loop.call_soon_threadsafe(self._one_prepared, exc)
            self.loop.call_soon_threadsafe(self._one_exited)
            return
        self.loop.call_soon_threadsafe(self._one_prepared, None)
        try:
            serve(engine)
        finally:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._one_exited)

    def _one_prepared(self, error: BaseException | None) -> None:
        self._prepared_count += 1
        if self._prepared is None or self._prepared.done():
            return
        if error is not None:
            self._prepared.set_exception(error)
        elif self._prepared_count == len(self.engines):
            self._prepared.set_result(None)

    async def prepared(self) -> None:
        """Wait until every thread has prepared its engine; raises what a ``prepare_thread()`` raised."""
        if self._prepared is not None:
            await asyncio.shield(self._prepared)

    def _one_exited(self) -> None:
        self._exited += 1
        if self._exited == len(self.engines) and self._stopped is not None:
            self._stopped.set()

    @property
    def anyone_waiting(self) -> bool:
        """Whether a thread sleeps (read under the lock)."""
        return self._waiting > 0

    def sleep(self, timeout_s: float | None) -> None:
        """Called by a worker thread holding the lock: release it, sleep until woken or timed out, take it back."""
        self._waiting += 1
        self.lock.release()
        try:
            self._wake.get(timeout=timeout_s)
        except queue.Empty:
            pass
        finally:
            self.lock.acquire()
            self._waiting -= 1

    def wake(self, count: int = 1) -> None:
        """Wake ``count`` sleeping threads (or let the next ones that sleep return at once)."""
        for _ in range(count):
            self._wake.put(None)

    def wake_all(self) -> None:
        """Wake every thread (closing)."""
        self.wake(len(self.engines))

    async def stopped(self, timeout_s: float | None) -> bool:
        """Wait until every thread has returned; ``False`` if ``timeout_s`` passed first."""
        if self._stopped is None:
            return True
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

"""The circuit breaker and the retry budget that guard each cloud upstream."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

RETRY_WINDOW_S = 60.0  # the retry budget's sliding window
RETRY_FLOOR = 3  # retries always allowed per window, however few calls there were


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures, or a failure share of at least
    ``error_rate_threshold`` over the last ``error_window`` results (once that many were seen). Open -> half-open
    after ``cooldown_s``; half-open admits one trial call at a time: success closes, failure re-opens."""

    def __init__(self, failure_threshold: int, error_rate_threshold: float, error_window: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.error_rate_threshold = error_rate_threshold
        self.error_window = error_window
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = "closed"
        self._opened_at = 0.0
        self._consecutive = 0
        self._results: deque[bool] = deque(maxlen=error_window)
        self._trial = False  # a half-open trial call is in flight

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._state, self._trial = "half_open", False
        return self._state

    def would_allow(self) -> bool:
        """Whether :meth:`allow` would admit a call now, without taking the half-open trial."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._trial)

    def allow(self) -> bool:
        """Admit a call? Closed: yes. Open: no. Half-open: yes for one trial at a time (it must be recorded)."""
        if not self.would_allow():
            return False
        if self._state == "half_open":
            self._trial = True
        return True

    def record(self, ok: bool) -> None:
        """The outcome of an admitted call."""
        state = self.state
        if state == "half_open":
            if self._trial:
                self._trial = False
                self._close() if ok else self._open()
            return
        if state == "open":
            return  # a call admitted before the breaker opened
        self._results.append(ok)
        self._consecutive = 0 if ok else self._consecutive + 1
        full = len(self._results) >= self.error_window
        if self._consecutive >= self.failure_threshold or (
                full and self._results.count(False) / len(self._results) >= self.error_rate_threshold):
            self._open()

    def abandon(self) -> None:
        """An admitted call ended without a verdict (cancelled): a half-open trial slot is freed for another."""
        if self._state == "half_open":
            self._trial = False

    def retry_after_s(self) -> float:
        """Seconds until a call may be admitted: the remaining cooldown when open, 1 while a trial runs, else 0."""
        state = self.state
        if state == "open":
            return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
        return 1.0 if state == "half_open" and self._trial else 0.0

    def _open(self) -> None:
        self._state, self._opened_at, self._trial = "open", self._clock(), False

    def _close(self) -> None:
        self._state, self._consecutive = "closed", 0
        self._results.clear()


class RetryBudget:
    """Retries allowed while those in the last minute stay under ``max(3, ratio * calls in the last minute)``."""

    def __init__(self, ratio: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_call(self) -> None:
        self._calls.append(self._clock())

    def spend(self) -> bool:
        """Take one retry if the budget allows."""
        now = self._clock()
        for times in (self._calls, self._retries):
            while times and times[0] <= now - RETRY_WINDOW_S:
                times.popleft()
        if len(self._retries) < max(RETRY_FLOOR, self.ratio * len(self._calls)):
            self._retries.append(now)
            return True
        return False

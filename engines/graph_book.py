"""Bookkeeping of CUDA graphs: which graph id each bucket shape has, and what each run on each thread does.

A captured graph belongs to the thread that captured it (ONNX Runtime keeps its graphs in a per-thread context;
a TensorRT capture is thread-local), so the book counts runs per (thread, graph): the first
``runs_before_capture`` runs of a graph on a thread are ordinary warm runs, the next one captures, every later one
replays. Shapes outside every bucket, and shapes beyond ``max_graphs``, get graph id -1: they run eagerly.
The book holds no CUDA state; the engines act on what it says, and the tests read it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from typing import Literal

EAGER = -1
"""The graph id of a run that neither captures nor replays (ONNX Runtime's ``gpu_graph_id`` -1)."""

RunKind = Literal["eager", "warm", "capture", "replay"]


class GraphBook:
    """Graph ids by shape key (1, 2, ...; ONNX Runtime reserves 0) and run counts by (thread, graph id)."""

    def __init__(self, max_graphs: int, runs_before_capture: int) -> None:
        self._max_graphs = max_graphs
        self._runs_before_capture = runs_before_capture
        self._ids: dict[Hashable, int] = {}
        self._runs: Counter[tuple[str, int]] = Counter()
        self._failed: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def graph_id(self, key: Hashable | None) -> int:
        """The graph id of a bucket shape; :data:`EAGER` for ``None`` (no bucket) or once ``max_graphs`` are
        taken."""
        if key is None:
            return EAGER
        with self._lock:
            graph = self._ids.get(key)
            if graph is None:
                if len(self._ids) >= self._max_graphs:
                    return EAGER
                graph = self._ids[key] = len(self._ids) + 1
            return graph

    def next_run(self, graph: int, thread: str | None = None) -> RunKind:
        """Count a run of ``graph`` on ``thread`` (the calling thread's name by default); what that run is."""
        if graph == EAGER:
            return "eager"
        thread = thread or threading.current_thread().name
        with self._lock:
            if (thread, graph) in self._failed:
                return "eager"
            self._runs[thread, graph] += 1
            count = self._runs[thread, graph]
        if count <= self._runs_before_capture:
            return "warm"
        return "capture" if count == self._runs_before_capture + 1 else "replay"

    def capture_failed(self, graph: int, thread: str | None = None) -> None:
        """Mark a graph whose capture failed on ``thread``: its later runs there are eager."""
        with self._lock:
            self._failed.add((thread or threading.current_thread().name, graph))

    def captured(self) -> dict[str, set[int]]:
        """The graph ids captured (and not failed) per thread."""
        threads: dict[str, set[int]] = {}
        with self._lock:
            for (thread, graph), count in self._runs.items():
                if count > self._runs_before_capture and (thread, graph) not in self._failed:
                    threads.setdefault(thread, set()).add(graph)
        return threads

    def captures_of(self, thread: str, graph: int) -> int:
        """How many times ``graph`` was captured on ``thread``: 0 or 1 (a graph is never captured twice)."""
        with self._lock:
            return int(self._runs[thread, graph] > self._runs_before_capture and (thread, graph) not in self._failed)

    @property
    def runs_before_capture(self) -> int:
        """Ordinary runs a graph needs on a thread before it is captured."""
        return self._runs_before_capture

    @property
    def ids(self) -> dict[Hashable, int]:
        """Shape key -> graph id, for every bucket shape seen."""
        with self._lock:
            return dict(self._ids)

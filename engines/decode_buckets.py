"""Decode steps in fixed row buckets, each replayed from a CUDA graph captured once.

A CUDA graph replays the kernels it captured on the addresses it captured them with, so each bucket of ``m`` rows
(1, 2, 4, ... up to the cache's rows) owns device buffers for its token ids, lengths and logits, and always runs
over rows ``[0, m)`` of the KV cache: a step whose rows end at ``stop`` runs the smallest bucket with ``m >= stop``;
the scheduler gives the rows it adds a placeholder, as it does to idle rows in range. Graphs need the cache's
addresses to stay put, so a decoder with graphs allocates its KV cache at full size once.

ONNX Runtime's CUDA execution provider captures a graph per ``gpu_graph_id`` run option (enable_cuda_graph on the
session): the first run with a new id runs eagerly, captures and replays; later runs only replay, whatever the
inputs' shapes or addresses, so an id stands for one shape on fixed buffers. A run with id ``-1`` runs without a
graph (prefill chunks, one-row steps off row 0). The total_sequence_length input is read on the host, so the capture keeps the
value it saw: the cache's full length, a bound GroupQueryAttention accepts for every row (each row's own length
comes from seqlens_k, on the device).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.engines.kv_cache import KvCache

NO_GRAPH = "-1"


def bucket_for(buckets: tuple[int, ...], stop: int) -> int:
    """The smallest bucket holding rows ``[0, stop)``."""
    return next(size for size in buckets if size >= stop)


@dataclass
class _Bucket:
    rows: int
    binding: Any
    input_ids: Any  # OrtValue [rows, 1] int64 on the device
    seqlens_k: Any  # OrtValue [rows] int32 on the device
    logits: Any  # OrtValue [rows, 1, vocab] float32 on the device
    next_token: Any  # OrtValue [rows, 1, 1] int64 on the device, where the graph has that output
    run_options: Any
    query_seqlens: Any = None  # OrtValue [rows] int32 of ones, where the graph takes query_seqlens (kept alive here)


@dataclass
class DecodeGraphs:
    """The buckets of one session, bound once over the (fixed) KV cache."""

    session: Any
    ort: Any
    kv: KvCache
    vocab: int
    next_token: bool  # whether the graph has the next_token output (greedy choices beside the logits)
    device: str = "cuda"
    device_id: int = 0
    buckets: tuple[int, ...] = ()
    cuda_graphs: bool = True  # False: the same bound buckets, run eagerly (and rebound when the cache moves)
    synchronize: Callable[[], None] = lambda: None  # waits for host-to-device copies to land (the device's memory)
    _bound: dict[int, _Bucket] = field(default_factory=dict)
    _runs: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._generation = self.kv.generation
        self._owner: int | None = None  # the thread that captured the graphs
        # A graph built for ragged prefill takes each row's new-token count: always one in a decode step.
        self._takes_query_seqlens = any(i.name == "query_seqlens" for i in self.session.get_inputs())

    def runs_here(self) -> bool:
        """Whether a decode step on the calling thread runs a bucket: with graphs only on the thread that captured
        them (ONNX Runtime keeps a graph in the capturing thread's context), without graphs on any thread."""
        return not self.cuda_graphs or self._owner == threading.get_ident()

    def _bucket(self, rows: int) -> _Bucket:
        if self.kv.generation != self._generation:
            if self.cuda_graphs:  # never, with the fixed cache graphs get: refuse rather than replay stale addresses
                raise RuntimeError("the KV cache moved under captured CUDA graphs")
            self._bound, self._generation = {}, self.kv.generation
        if rows not in self._bound:
            ort, where = self.ort, (self.device, self.device_id)
            ids = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1], np.int64, *where)
            lengths = ort.OrtValue.ortvalue_from_shape_and_type([rows], np.int32, *where)
            logits = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, self.vocab], np.float32, *where)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input("input_ids", ids)
            binding.bind_ortvalue_input("seqlens_k", lengths)
            # A CPU input of GroupQueryAttention, so its value is part of the capture: the cache's full length
            # (an upper bound of every row's length, which is all the kernel needs of it).
            binding.bind_cpu_input("total_sequence_length", np.array(self.kv.capacity, np.int32))
            ones = None
            if self._takes_query_seqlens:
                ones = ort.OrtValue.ortvalue_from_numpy(np.ones(rows, np.int32), *where)
                binding.bind_ortvalue_input("query_seqlens", ones)
            self.kv.bind(binding, 0, rows)
            binding.bind_ortvalue_output("logits", logits)
            tokens = None
            if self.next_token:
                tokens = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, 1], np.int64, *where)
                binding.bind_ortvalue_output("next_token", tokens)
            options = ort.RunOptions()
            if self.cuda_graphs:
                options.add_run_config_entry("gpu_graph_id", str(rows))
            self._bound[rows] = _Bucket(rows, binding, ids, lengths, logits, tokens, options, ones)
        return self._bound[rows]

    def run(self, input_ids: np.ndarray, seqlens_k: np.ndarray, *, tokens: bool = False) -> np.ndarray:
        """A decode step of rows ``[0, len(input_ids))``, a bucket's size: last-position logits ``[rows, vocab]``,
        or with ``tokens`` (graphs with the next_token output) each row's argmax ``[rows]``, the logits left on
        the device."""
        bucket = self._bucket(len(input_ids))
        bucket.input_ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        bucket.seqlens_k.update_inplace(np.ascontiguousarray(seqlens_k, dtype=np.int32))
        # A copy from pageable memory may return before it lands, and the provider's stream does not wait for the
        # legacy stream the copy ran on.
        self.synchronize()
        self.session.run_with_iobinding(bucket.binding, bucket.run_options)
        self._runs[bucket.rows] = self._runs.get(bucket.rows, 0) + 1
        if tokens:
            assert bucket.next_token is not None, "the graph has no next_token output"
            return bucket.next_token.numpy().reshape(-1).copy()
        logits = bucket.logits.numpy()[:, -1, :]
        # On the cpu device numpy() is a view of the bound buffer, which the next step overwrites (from a GPU it is
        # already a host copy).
        return logits.copy() if self.device == "cpu" else logits

    def warm(self) -> None:
        """Capture every bucket's graph now, on idle rows (length 1, token 0), and make the calling thread their
        owner: the only one that replays them."""
        self._owner = threading.get_ident()
        for rows in self.buckets:
            # ONNX Runtime 1.18 and later rerun the first run of a new graph id until it is captured; earlier
            # releases capture on the third run of an id. Three runs cover both.
            for _ in range(3):
                self.run(np.zeros((rows, 1), np.int64), np.zeros(rows, np.int32))

    @property
    def runs(self) -> dict[int, int]:
        """Runs per bucket so far."""
        return dict(self._runs)

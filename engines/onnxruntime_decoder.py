"""The ONNX Runtime :class:`~appliance.engines.base.Decoder`: a decoder graph and its shared KV buffers.

The KV cache is one buffer per layer and K/V, ``[rows, kv_heads, capacity, head_dim]``, bound to the graph as both
past and present (ONNX Runtime IOBinding), so GroupQueryAttention appends in place and nothing but the logits is
copied out. The graph's I/O contract is described in ``appliance.build.gguf_decoder``.

With ``dense_batches`` a second session over the same KV buffers, whose 4-bit weights were dequantized to float32
at load (``dense_weights``), takes every call except a one-row decode step: prefills and multi-row steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from appliance.engines.dense_weights import DenseTwin, dense_twin

log = logging.getLogger("appliance.engines.onnxruntime_decoder")

TwinBuilder = Callable[[onnx.ModelProto], DenseTwin]


class OnnxRuntimeDecoder:
    """A decoder session (CPU) over shared KV buffers; every method runs on one thread at a time.

    The buffers start small and double (copying the rows) when a sequence needs more positions, up to
    ``max_capacity``, and shrink back once nothing runs: attention over the shared buffer costs in proportion to its
    length, so short conversations should not pay for the longest one the cache could hold.
    """

    INITIAL_CAPACITY = 256

    def __init__(self, model_path: Path, generation: Mapping[str, Any], *, rows: int, max_capacity: int,
                 threads: int = 0, spin: bool = False, dense_batches: bool = False,
                 twin_builder: TwinBuilder = dense_twin) -> None:
        """``generation``: the build's ``generation.json`` (layer and head counts); ``threads`` 0: ONNX Runtime's
        choice; ``twin_builder`` makes the float32 twin when ``dense_batches`` asks for one."""
        import onnxruntime as ort

        self._ort = ort
        self._model_path = Path(model_path)
        self._threads, self._spin = threads, spin
        self.session: Any = ort.InferenceSession(str(model_path), self._options(), providers=["CPUExecutionProvider"])
        self._twin: Any = self._dense_twin(twin_builder) if dense_batches else None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.takes_query_seqlens = "query_seqlens" in graph_inputs
        # The graph's logits are [rows, new tokens, vocab] ("all") or [rows, 1, vocab] ("last").
        self.all_positions = self.session.get_outputs()[0].shape[1] != 1
        self._layers = int(generation["num_layers"])
        self._rows, self._max_capacity = rows, max_capacity
        self._shape = (rows, int(generation["num_kv_heads"]), int(generation["head_dim"]))
        self._buffers: list[np.ndarray] = []
        self._allocate(min(self.INITIAL_CAPACITY, max_capacity))

    @property
    def rows(self) -> int:
        """Sequences the KV cache holds at once."""
        return self._rows

    @property
    def capacity(self) -> int:
        """Positions each row holds now."""
        return self._capacity

    @property
    def max_capacity(self) -> int:
        """The most positions a row may grow to."""
        return self._max_capacity

    @property
    def uses_dense_twin(self) -> bool:
        """Whether multi-row calls and prefills run on the float32 twin."""
        return self._twin is not None

    def kv_cache_bytes(self, capacity: int | None = None) -> int:
        """Bytes of the KV buffers at ``capacity`` positions per row (default: the most they may grow to)."""
        rows, heads, dim = self._shape
        positions = self._max_capacity if capacity is None else capacity
        return self._layers * 2 * rows * heads * positions * dim * 4  # float32

    @property
    def description(self) -> str:
        """Runtime and cache size, for logs (and the load log line)."""
        twin = ", float32 twin for multi-row calls" if self._twin is not None else ""
        return (f"onnxruntime decoder with a shared KV cache: {self._rows} rows x {self._max_capacity} tokens "
                f"({self.kv_cache_bytes() / 2**20:.0f} MiB at most, {self.kv_cache_bytes(self._capacity) / 2**20:.0f}"
                f" MiB now), intra_op_threads={self._threads}{twin}")

    def _options(self) -> Any:
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.log_severity_level = 3
        # A decode step is hundreds of small parallel regions: threads that spin between them instead of sleeping
        # cut a step by ~20% (SmolLM2-135M, 2 cores), at the price of a busy core while a step runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        return options

    def _dense_twin(self, twin_builder: TwinBuilder) -> Any:
        try:
            twin = twin_builder(onnx.load(str(self._model_path)))
            if not twin.weights:
                return None
            options = self._options()
            twin.supply(options)
            session = self._ort.InferenceSession(twin.graph, options, providers=["CPUExecutionProvider"])
        except (MemoryError, *_ort_errors(self._ort)) as exc:
            # Short of memory: serve every call from the 4-bit graph (slower batches) rather than not at all.
            log.warning("%s: no float32 twin for multi-row calls (%s); batches use the 4-bit graph",
                        self._model_path, exc)
            _release_free_memory()
            return None
        log.info("%s: float32 twin for multi-row calls, %d weights, %.0f MB", self._model_path, len(twin.weights),
                 twin.weight_bytes / 1e6)
        del options, twin
        _release_free_memory()
        return session

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        rows, heads, dim = self._shape
        buffers = [np.zeros((rows, heads, capacity, dim), np.float32) for _ in range(self._layers * 2)]
        if keep:
            for new, old in zip(buffers, self._buffers):
                new[:, :, :keep] = old[:, :, :keep]
        self._buffers, self._capacity = buffers, capacity
        self._values: dict[tuple[int, int], list[Any]] = {}  # OrtValues over row ranges of the buffers, by range

    def ensure(self, positions: int) -> None:
        """Make room for ``positions`` tokens per row (doubling, at most ``max_capacity``)."""
        if positions <= self._capacity:
            return
        capacity = self._capacity
        while capacity < positions:
            capacity *= 2
        self._allocate(min(capacity, self._max_capacity), keep=self._capacity)

    def shrink(self) -> None:
        """Back to the initial size; only when no sequence holds a row."""
        if self._capacity > self.INITIAL_CAPACITY:
            self._allocate(min(self.INITIAL_CAPACITY, self._max_capacity))

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        """Row ``source``'s first ``positions`` tokens into rows ``targets``, in place (the bound OrtValues see
        the same memory)."""
        for buffer in self._buffers:
            buffer[targets, :, :positions] = buffer[source, :, :positions]

    def _kv(self, start: int, stop: int) -> list[Any]:
        key = (start, stop)
        if key not in self._values:
            self._values[key] = [self._ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self._buffers]
        return self._values[key]

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        """Rows ``start_row .. start_row + len(input_ids)``; the last position's logits per row ``[rows, vocab]``."""
        return self.logits(start_row, input_ids, seqlens_k)[:, -1, :]

    def logits(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray, *,
               query_seqlens: np.ndarray | None = None, total_sequence_length: int | None = None) -> np.ndarray:
        """One call of the graph as it is built: logits ``[rows, new tokens, vocab]`` (``[rows, 1, vocab]`` for a
        graph built with last-position logits only).

        ``query_seqlens`` (graphs built with that input): valid new tokens per row, default every token up to the
        row's length. ``total_sequence_length`` defaults to the longest row after the call.
        """
        rows = input_ids.shape[0]
        single_token = rows == 1 and input_ids.shape[1] == 1
        session = self.session if single_token or self._twin is None else self._twin
        total = int(seqlens_k.max()) + 1 if total_sequence_length is None else int(total_sequence_length)
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        if self.takes_query_seqlens:
            if query_seqlens is None:
                query_seqlens = np.minimum(input_ids.shape[1], np.asarray(seqlens_k) + 1)
            binding.bind_cpu_input("query_seqlens", np.ascontiguousarray(query_seqlens, dtype=np.int32))
        binding.bind_output("logits")
        for index, value in enumerate(self._kv(start_row, start_row + rows)):
            layer, which = divmod(index, 2)
            kind = ("key", "value")[which]
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
            binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
        session.run_with_iobinding(binding)
        # Only the logits leave the session: copy_outputs_to_cpu() would also copy every KV buffer.
        return binding.get_outputs()[0].numpy()

    def close(self) -> None:
        """Drop the sessions and the KV buffers."""
        self.session = self._twin = None
        self._buffers, self._values = [], {}


def _ort_errors(ort: Any) -> tuple[type[Exception], ...]:
    """ONNX Runtime's session-creation errors (allocation failures among them); not subclasses of RuntimeError."""
    state = ort.capi.onnxruntime_pybind11_state
    return state.Fail, state.RuntimeException


def _release_free_memory() -> None:
    """Hand freed heap back to the system (glibc keeps the pages of large freed arrays otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

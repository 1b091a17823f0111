"""The ONNX Runtime :class:`~appliance.engines.base.Decoder`: a decoder graph and its shared KV cache.

The KV cache (``appliance.engines.kv_cache``) is bound to the graph as both past and present, so
GroupQueryAttention appends in place and nothing but the logits is copied out. The graph's I/O contract is
described in ``appliance.build.gguf_decoder``.

On the CPU (the default :class:`Placement`) the cache lives in numpy buffers. With dense_batches a second session
over the same KV buffers, whose 4-bit weights were dequantized to float32 at load (``dense_weights``), takes every
call except a one-row decode step: prefills and multi-row steps. A float32 graph's split 8-bit weights (the Q8_0 LM
head) run one-row steps as built or dequantized, whichever this machine's kernels run faster (``split_weights``).

On a CUDA device (:meth:`Placement.cuda`) the session runs on ONNX Runtime's CUDA execution provider, the cache
lives in device memory and is never copied to the host, and shared decode steps run in row buckets replayed from
CUDA graphs (``appliance.engines.decode_buckets``); prefill chunks run without graphs. Every decode step on the
device passes the cache's full length as total_sequence_length, as the graphs were captured with, so a one-row step
computes the same whether it replays the one-row graph (row 0) or runs eagerly (any other row).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from appliance.engines.buckets import powers_of_two
from appliance.engines.decode_buckets import NO_GRAPH, DecodeGraphs, bucket_for
from appliance.engines.dense_weights import DenseTwin, dense_twin
from appliance.engines.device_memory import CudaMemory, DeviceMemory
from appliance.engines.kv_cache import DeviceKvCache, HostKvCache, KvShape
from appliance.engines.split_weights import SPLIT, SplitWeightsForm, choose_form, one_row_twin
from appliance.errors import ModelLoadFailed

log = logging.getLogger("appliance.engines.onnxruntime_decoder")

TwinBuilder = Callable[..., DenseTwin]  # (model, dequantized=weights made before) -> the float32 twin


@dataclass
class Placement:
    """Where a decoder runs: execution providers (and their options), and for a device cache the device, its
    memory copier and whether shared decode steps run in bucketed CUDA graphs."""

    providers: list[Any] = field(default_factory=lambda: ["CPUExecutionProvider"])
    device: str = ""  # "": numpy buffers on the host; "cuda" (or "cpu", in tests): OrtValues on that device
    device_id: int = 0
    memory: DeviceMemory | None = None
    # Shared decode steps in row buckets, captured as CUDA graphs where cuda_graphs (without graphs the buckets
    # only add rows; on the cpu device they let the tests run the bucket path)
    buckets: bool = False
    cuda_graphs: bool = False

    def without_graphs(self) -> Placement:
        """The same placement with CUDA graphs off (and the execution provider told so)."""
        def plain(provider: Any) -> Any:
            if not isinstance(provider, tuple):
                return provider
            name, options = provider
            return name, {key: value for key, value in options.items() if key != "enable_cuda_graph"}

        return replace(self, providers=[plain(p) for p in self.providers], cuda_graphs=False, buckets=False)

    @classmethod
    def cuda(cls, device_id: int, memory: DeviceMemory | None = None, cuda_graphs: bool = True) -> Placement:
        """ONNX Runtime's CUDA execution provider on ``device_id``, the cache on that GPU, copied by ``memory``
        (default: the CUDA runtime through cuda-python; :class:`ModelLoadFailed` where it is not installed)."""
        if memory is None:
            from appliance.engines.cuda_runtime import CudaRuntime, cudart_module

            cudart = cudart_module()
            if cudart is None:
                raise ModelLoadFailed("the decoder's device cache needs cuda-python; install the gpu extra (pip "
                                      "install 'appliance[gpu]'), or set [engine] providers = ['cpu']")
            memory = CudaMemory(CudaRuntime(cudart), device_id)
        options = {"device_id": str(device_id)}
        if cuda_graphs:
            options["enable_cuda_graph"] = "1"
        return cls(providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"], device="cuda",
                   device_id=device_id, memory=memory, buckets=cuda_graphs, cuda_graphs=cuda_graphs)


class OnnxRuntimeDecoder:
    """A decoder session over a shared KV cache; every method runs on one thread at a time.

    The cache starts small and doubles when a sequence needs more positions, up to ``max_capacity``, and shrinks
    back once nothing runs: attention over the shared buffer costs in proportion to its length on the CPU, so short
    conversations should not pay for the longest one the cache could hold. With CUDA graphs the cache is allocated
    at ``max_capacity`` once: a captured graph replays on the addresses it was captured with.
    """

    INITIAL_CAPACITY = 256

    def __init__(self, model_path: Path, generation: Mapping[str, Any], *, rows: int, max_capacity: int,
                 threads: int = 0, spin: bool = False, dense_batches: bool = False,
                 twin_builder: TwinBuilder = dense_twin, placement: Placement | None = None,
                 split_weights: str = SPLIT) -> None:
        """``generation``: the build's ``generation.json`` (layer and head counts); ``threads`` 0: ONNX Runtime's
        choice; ``twin_builder`` makes the float32 twin when ``dense_batches`` asks for one (CPU only);
        ``split_weights``: the form of float32 split 8-bit weights in one-row steps on the CPU, "split" (as built),
        "dense" or "timed" (``appliance.engines.split_weights``)."""
        import onnxruntime as ort

        self._ort = ort
        self._model_path = Path(model_path)
        self._threads, self._spin = threads, spin
        self.placement = placement or Placement()
        on_host = not self.placement.device
        self.split_weights = SplitWeightsForm(SPLIT)
        # One read of the graph for both rewrites (the twin rewrites its copy in place).
        model = self._read_graph() if on_host and (split_weights != SPLIT or dense_batches) else None
        one_row = None
        if model is not None and split_weights != SPLIT:
            one_row = self._one_row_graph(copy.deepcopy(model) if dense_batches else model, split_weights)
        self.session: Any = self._graph_session(one_row)
        del one_row
        self._twin: Any = self._dense_twin(twin_builder, model) if model is not None and dense_batches else None
        self.split_weights.weights = {}  # the dense weights the timing made live in the sessions now
        del model
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.takes_query_seqlens = "query_seqlens" in graph_inputs
        # The graph's logits are [rows, new tokens, vocab] ("all") or [rows, 1, vocab] ("last").
        self.all_positions = self.session.get_outputs()[0].shape[1] != 1
        half = graph_inputs["past_key_values.0.key"].type == "tensor(float16)"
        shape = KvShape(int(generation["num_layers"]), rows, int(generation["num_kv_heads"]),
                        int(generation["head_dim"]), np.dtype(np.float16 if half else np.float32))
        self._rows = rows
        initial = max_capacity if self.placement.cuda_graphs else self.INITIAL_CAPACITY
        if on_host:
            self.kv: HostKvCache | DeviceKvCache = HostKvCache(ort, shape, initial, max_capacity)
        else:
            assert self.placement.memory is not None, "a device cache needs the device's memory copier"
            self.kv = DeviceKvCache(ort, shape, initial, max_capacity, self.placement.memory,
                                    self.placement.device, self.placement.device_id)
        self._buckets = powers_of_two(rows) if self.placement.buckets else ()
        vocab = self.session.get_outputs()[0].shape[2]
        has_next_token = any(o.name == "next_token" for o in self.session.get_outputs())
        self._graphs = (DecodeGraphs(self.session, ort, self.kv, int(vocab), has_next_token,
                                     self.placement.device, self.placement.device_id, self._buckets,
                                     self.placement.cuda_graphs, self._synchronize())
                        if self._buckets and not self.all_positions else None)
        self._eager_options = ort.RunOptions()
        if self.placement.cuda_graphs:
            self._eager_options.add_run_config_entry("gpu_graph_id", NO_GRAPH)

    @property
    def rows(self) -> int:
        """Sequences the KV cache holds at once."""
        return self._rows

    @property
    def capacity(self) -> int:
        """Positions each row holds now."""
        return self.kv.capacity

    @property
    def max_capacity(self) -> int:
        """The most positions a row may grow to."""
        return self.kv.max_capacity

    @property
    def kv_dtype(self) -> np.dtype:
        """The cache's element type (the graph's: float32, or float16 for the CUDA graph)."""
        return self.kv.shape.dtype

    @property
    def uses_dense_twin(self) -> bool:
        """Whether multi-row calls and prefills run on the float32 twin."""
        return self._twin is not None

    @property
    def buckets(self) -> tuple[int, ...]:
        """The row buckets shared decode steps run in (empty: each step runs its own rows)."""
        return self._buckets if self._graphs is not None else ()

    def kv_cache_bytes(self, capacity: int | None = None) -> int:
        """Bytes of the KV buffers at ``capacity`` positions per row (default: the most they may grow to)."""
        return self.kv.shape.bytes(self.kv.max_capacity if capacity is None else capacity)

    @property
    def description(self) -> str:
        """Runtime, device and cache size, for logs (and the load log line)."""
        twin = ", float32 twin for multi-row calls" if self._twin is not None else ""
        if self.split_weights.nodes:
            twin += f", {self.split_weights.description}"
        where = self.session.get_providers()[0]
        if self.placement.device:
            where += f" (cache on {self.placement.device}:{self.placement.device_id}"
            where += f", decode buckets {','.join(map(str, self.buckets))}" if self.buckets else ""
            where += ", CUDA graphs)" if self.placement.cuda_graphs else ")"
        return (f"onnxruntime decoder on {where} with a shared {self.kv_dtype.name} KV cache: {self._rows} rows x "
                f"{self.max_capacity} tokens ({self.kv_cache_bytes() / 2**20:.0f} MiB at most, "
                f"{self.kv_cache_bytes(self.capacity) / 2**20:.0f} MiB now), intra_op_threads={self._threads}{twin}")

    def _options(self) -> Any:
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.log_severity_level = 3
        # A decode step is hundreds of small parallel regions: threads that spin between them instead of sleeping
        # cut a step by ~20% (SmolLM2-135M, 2 cores), at the price of a busy core while a step runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        return options

    def _read_graph(self) -> onnx.ModelProto:
        try:
            return onnx.load(str(self._model_path))
        except (OSError, DecodeError) as exc:
            raise ModelLoadFailed(f"{self._model_path}: not an ONNX model this onnx can read ({exc})") from exc

    def _one_row_graph(self, model: onnx.ModelProto, choice: str) -> DenseTwin | None:
        """``model`` with its float32 split weights made dense where ``choice`` ("timed", or "dense" as asked)
        takes that form, else ``None`` (the graph as built); ``split_weights`` says what was chosen and why."""
        self.split_weights = choose_form(model, choice, self._threads)
        if self.split_weights.nodes:
            log.info("%s: %s", self._model_path, self.split_weights.description)
        return one_row_twin(model, self.split_weights)

    def _session(self, providers: list[Any], rewritten: DenseTwin | None = None) -> Any:
        if rewritten is None:
            return self._ort.InferenceSession(str(self._model_path), self._options(), providers=providers)
        options = self._options()
        rewritten.supply(options)
        return self._ort.InferenceSession(rewritten.graph, options, providers=providers)

    def _graph_session(self, rewritten: DenseTwin | None = None) -> Any:
        """The session (of ``rewritten``, the graph with some weights made dense, where given); where ONNX Runtime
        refuses CUDA graphs for this graph, one without them (logged)."""
        try:
            session = self._session(self.placement.providers, rewritten)
        except Exception as exc:  # noqa: BLE001 - the EP's refusals come as several error types
            if not self.placement.cuda_graphs:
                raise
            log.warning("%s: CUDA graphs refused (%s); decode steps run eagerly", self._model_path, exc)
            self.placement = self.placement.without_graphs()
            session = self._session(self.placement.providers)
        if self.placement.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU quietly when the CUDA provider cannot load; the cache's device
            # memory would then be bound to a CPU session.
            raise ModelLoadFailed(
                f"{self._model_path}: ONNX Runtime's CUDA execution provider did not load (its log says why: CUDA "
                "or cuDNN libraries); install them, or set [engine] providers = ['cpu'] to run the CPU graph")
        return session

    def _dense_twin(self, twin_builder: TwinBuilder, model: onnx.ModelProto) -> Any:
        try:
            # The split weights made dense for the one-row graph are the twin's too: not dequantized again.
            twin = twin_builder(model, dequantized=self.split_weights.weights)
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

    def _synchronize(self) -> Callable[[], None]:
        memory = self.placement.memory
        return memory.synchronize if memory is not None else (lambda: None)

    def ensure(self, positions: int) -> None:
        """Make room for ``positions`` tokens per row (doubling, at most ``max_capacity``)."""
        self.kv.ensure(positions)

    def shrink(self) -> None:
        """Back to the initial size, each row's first positions kept; only when no sequence holds a row."""
        self.kv.shrink()

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        """Row ``source``'s first ``positions`` tokens into rows ``targets``, where the cache lives."""
        self.kv.copy_row(source, targets, positions)

    def decode_range(self, start: int, stop: int) -> tuple[int, int]:
        """Rows ``[0, bucket)`` where decode steps run in buckets, else ``[start, stop)``."""
        if self._graphs is None or not self._graphs.runs_here():
            return start, stop
        return 0, bucket_for(self._buckets, stop)

    def warm(self) -> None:
        """Capture the decode buckets' CUDA graphs, on the thread that will replay them, before any sequence holds
        a row; if a capture fails, shared steps run eagerly on their own rows instead (logged)."""
        if self._graphs is None or not self.placement.cuda_graphs:
            return
        try:
            self._graphs.warm()
        except Exception as exc:  # noqa: BLE001 - a failed capture may come as any of the EP's error types
            log.warning("%s: CUDA graph capture failed (%s); decode steps run eagerly in a new session",
                        self._model_path, exc)
            # The failed session may be left mid-capture: a fresh one without graphs over the same cache.
            self._graphs = None
            self.placement = self.placement.without_graphs()
            self._eager_options = self._ort.RunOptions()
            self.session = self._session(self.placement.providers)

    def _bucket_step(self, start_row: int, input_ids: np.ndarray) -> DecodeGraphs | None:
        """The bucket graphs, where this call is a decode step over a bucket they replay on this thread."""
        graphs = self._graphs
        if graphs is not None and start_row == 0 and input_ids.shape[1] == 1 and len(input_ids) in self._buckets \
                and graphs.runs_here():
            return graphs
        return None

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        """Rows ``start_row .. start_row + len(input_ids)``; the last position's logits per row ``[rows, vocab]``."""
        graphs = self._bucket_step(start_row, input_ids)
        if graphs is not None:
            return graphs.run(input_ids, seqlens_k)
        return self.logits(start_row, input_ids, seqlens_k)[:, -1, :]

    def greedy_tokens(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray | None:
        """Each row's argmax from the graph's next_token output, for a decode step over a bucket whose graph has
        it (the FP16 graph for the CUDA provider): only ``rows`` ids come back, never the logits; else ``None``."""
        graphs = self._bucket_step(start_row, input_ids)
        if graphs is None or not graphs.next_token:
            return None
        return graphs.run(input_ids, seqlens_k, tokens=True)

    def prefill_rows(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray,
                     query_seqlens: np.ndarray) -> np.ndarray | None:
        """Ragged prompt chunks of several rows in one call, for a graph built with ``query_seqlens`` (else
        ``None``): each row's logits at its last appended token."""
        if not self.takes_query_seqlens:
            return None
        logits = self.logits(start_row, input_ids, seqlens_k, query_seqlens=query_seqlens)
        if self.all_positions:
            return logits[np.arange(len(logits)), np.maximum(np.asarray(query_seqlens) - 1, 0)]
        return logits[:, -1, :]

    def logits(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray, *,
               query_seqlens: np.ndarray | None = None, total_sequence_length: int | None = None) -> np.ndarray:
        """One call of the graph as it is built, without graphs: logits ``[rows, new tokens, vocab]``
        (``[rows, 1, vocab]`` for a graph built with last-position logits only).

        ``query_seqlens`` (graphs built with that input): valid new tokens per row, default every token up to the
        row's length. ``total_sequence_length`` defaults to the longest row after the call.
        """
        rows = input_ids.shape[0]
        single_token = rows == 1 and input_ids.shape[1] == 1
        session = self.session if single_token or self._twin is None else self._twin
        total = int(seqlens_k.max()) + 1 if total_sequence_length is None else int(total_sequence_length)
        if self.placement.device and input_ids.shape[1] == 1 and total_sequence_length is None:
            # What the captured graphs were given: the CUDA kernel splits attention by this length, so a decode
            # step computes the same whether it replays a graph or runs here.
            total = self.kv.capacity
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        if self.takes_query_seqlens:
            if query_seqlens is None:
                query_seqlens = np.minimum(input_ids.shape[1], np.asarray(seqlens_k) + 1)
            binding.bind_cpu_input("query_seqlens", np.ascontiguousarray(query_seqlens, dtype=np.int32))
        binding.bind_output("logits")  # on the host: only the logits leave the session, never the cache
        self.kv.bind(binding, start_row, start_row + rows)
        session.run_with_iobinding(binding, self._eager_options)
        return binding.get_outputs()[0].numpy()

    def close(self) -> None:
        """Drop the sessions and the KV cache."""
        self.session = self._twin = self._graphs = None
        self.kv.close()


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

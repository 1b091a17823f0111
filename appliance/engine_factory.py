"""The default runtimes: ONNX Runtime and TensorRT engines, ONNX Runtime decoders, chosen per machine.

``[engine] kind`` picks the runtime (``appliance.engines.runtime_choice``); the factories here turn the choice and
the model's ``[engine]`` table into an engine: execution providers and their options (TensorRT EP caches in
``cache_dir``), shape buckets, bound buffers and CUDA graphs. Every engine made here carries its ``choice`` (kind,
device, reason) for logs, ``appliance models``, ``appliance doctor`` and the v2 metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from appliance.config import Config
from appliance.engine_registry import DecoderRegistry, EngineRegistry
from appliance.engines.base import Decoder, Engine
from appliance.engines.buckets import Buckets, batch_buckets, powers_of_two
from appliance.engines.generation import GenerationLimits
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder, Placement
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions
from appliance.engines.runtime_choice import (PORTABLE_GRAPH, PROVIDER_NAMES, Machine, RuntimeChoice,
                                             choose_decoder_runtime, choose_runtime, probe_machine)
from appliance.model_spec import ModelSpec

log = logging.getLogger("appliance.engines")

MachineProbe = Callable[[], Machine]


def sequence_buckets(spec: ModelSpec, on_gpu: bool) -> Buckets:
    """An embedding model's sequence buckets: ``[engine] sequence_buckets``, else on a GPU powers of two from 16
    up to ``max_seq_length`` (fixed shapes for the graphs), else none (the CPU runs the batch's own length)."""
    if spec.task != "embed":
        return Buckets(())
    if spec.engine.sequence_buckets:
        return Buckets.of(spec.engine.sequence_buckets)
    return Buckets(powers_of_two(spec.tokenizer.max_seq_length, 16)) if on_gpu else Buckets(())


def uses_io_binding(spec: ModelSpec, choice: RuntimeChoice) -> bool:
    """``[engine] io_binding``; ``"auto"`` binds on a GPU only."""
    setting = spec.engine.io_binding
    return choice.on_gpu if setting == "auto" else bool(setting) and spec.batching.max_batch_size > 0


def _warm_shapes(spec: ModelSpec, batches: Buckets, sequences: Buckets) -> list[dict[str, tuple[int, ...]]]:
    """The bucket shapes captured at thread start: for an embedding model every batch x sequence bucket (empty for
    other models: the engine derives them from the model's fixed dimensions)."""
    if spec.task != "embed" or not sequences:
        return []
    return [{"input_ids": (rows, length), "attention_mask": (rows, length)}
            for rows in batches.sizes for length in sequences.sizes]


def _tensorrt_ep_options(spec: ModelSpec, config: Config, batches: Buckets, sequences: Buckets) -> dict[str, str]:
    """The TensorRT execution provider's engine and timing caches (in ``cache_dir``), FP16, and profile shapes
    from the buckets. Its CUDA graph option keeps one graph per session, so it is on only for a single shape."""
    cache = config.paths.cache() / "tensorrt-ep" / spec.name / str(spec.version)
    options = {"device_id": str(spec.engine.device_id), "trt_engine_cache_enable": "1",
               "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "1",
               "trt_timing_cache_path": str(cache), "trt_fp16_enable": "1"}
    if spec.task == "embed" and batches and sequences:
        def shape(rows: int, length: int) -> str:
            return f"input_ids:{rows}x{length},attention_mask:{rows}x{length}"

        options["trt_profile_min_shapes"] = shape(batches.sizes[0], sequences.sizes[0])
        options["trt_profile_opt_shapes"] = shape(batches.sizes[len(batches.sizes) // 2], sequences.sizes[-1] // 2
                                                  if len(sequences.sizes) > 1 else sequences.sizes[0])
        options["trt_profile_max_shapes"] = shape(batches.largest, sequences.largest)
    if len(batches.sizes) * max(len(sequences.sizes), 1) == 1 and spec.engine.cuda_graphs:
        options["trt_cuda_graph_enable"] = "1"
    return options


def ort_options(spec: ModelSpec, config: Config, choice: RuntimeChoice | None = None) -> OrtOptions:
    """Session options: the model's ``[engine]`` table over the server's ``[onnxruntime]`` section, and the
    choice's providers, buckets and graphs."""
    defaults, engine = config.onnxruntime, spec.engine
    options = OrtOptions(
        providers=engine.providers or defaults.providers,
        intra_op_threads=engine.intra_op_threads if engine.intra_op_threads >= 0 else defaults.intra_op_threads,
        inter_op_threads=engine.inter_op_threads if engine.inter_op_threads >= 0 else defaults.inter_op_threads,
        graph_optimization_level=engine.graph_optimization_level or defaults.graph_optimization_level,
        optimized_model_dir=config.paths.cache() / "ort" if defaults.optimized_model_cache else None,
    )
    if choice is None:
        return options
    options.providers = [PROVIDER_NAMES[p] for p in choice.providers]
    batches = batch_buckets(engine.batch_buckets, spec.batching.max_batch_size)
    sequences = sequence_buckets(spec, choice.on_gpu)
    options.batch_buckets = batches
    options.io_binding = uses_io_binding(spec, choice) and bool(batches)
    options.cuda_graphs = engine.cuda_graphs and options.io_binding
    options.warm_shapes = _warm_shapes(spec, batches, sequences) if options.io_binding else []
    options.max_graphs = max(len(batches.sizes) * max(len(sequences.sizes), 1), 1)
    if "CUDAExecutionProvider" in choice.providers:
        options.provider_options["CUDAExecutionProvider"] = {"device_id": str(engine.device_id)}
    if "TensorrtExecutionProvider" in choice.providers:
        options.provider_options["TensorrtExecutionProvider"] = _tensorrt_ep_options(spec, config, batches, sequences)
    return options


def _onnxruntime(spec: ModelSpec, config: Config, choice: RuntimeChoice) -> Engine:
    model = spec.model_file
    portable = spec.path / PORTABLE_GRAPH
    if choice.providers[0] == "TensorrtExecutionProvider" and portable.is_file():
        model = portable  # all of it on TensorRT, none left to other providers for want of a fused-op importer
    engine = OnnxRuntimeEngine(model, ort_options(spec, config, choice))
    engine.choice = choice
    return engine


def _tensorrt(spec: ModelSpec, config: Config, choice: RuntimeChoice) -> Engine:
    from appliance.engines.tensorrt_engine import TensorRTEngine

    assert choice.plan is not None
    batches = batch_buckets(spec.engine.batch_buckets, spec.batching.max_batch_size)
    sequences = sequence_buckets(spec, on_gpu=True)
    engine = TensorRTEngine(choice.plan, batch_buckets=batches, warm_shapes=_warm_shapes(spec, batches, sequences),
                            cuda_graphs=spec.engine.cuda_graphs, device_id=spec.engine.device_id)
    engine.choice = choice
    return engine


def choose(spec: ModelSpec, config: Config, machine: MachineProbe = probe_machine) -> RuntimeChoice:
    """The runtime for ``spec`` on this machine (logged)."""
    preference = spec.engine.providers or config.onnxruntime.providers
    choice = choose_runtime(spec.engine.kind, spec.path, preference, machine())
    log.info("model %s version %s: %s", spec.name, spec.version, choice.summary)
    return choice


def choose_runtime_quietly(spec: ModelSpec, config: Config, machine: MachineProbe = probe_machine) -> RuntimeChoice:
    """What ``spec`` would run on here, without logging or loading (``appliance models``, ``appliance doctor``)."""
    if spec.task == "generate":
        return choose_decoder(spec, config, machine)
    preference = spec.engine.providers or config.onnxruntime.providers
    return choose_runtime(spec.engine.kind, spec.path, preference, machine())


def chosen_engine(machine: MachineProbe = probe_machine) -> Callable[[ModelSpec, Config], Engine]:
    """An engine factory for kinds ``onnxruntime``, ``tensorrt`` and ``auto``: chooses, then makes the engine."""
    def make(spec: ModelSpec, config: Config) -> Engine:
        choice = choose(spec, config, machine)
        return _tensorrt(spec, config, choice) if choice.kind == "tensorrt" else _onnxruntime(spec, config, choice)

    return make


def onnxruntime_engine(spec: ModelSpec, config: Config) -> Engine:
    """An ONNX Runtime engine for a tensor or embedding model, on this machine's best execution provider."""
    return chosen_engine()(spec, config)


def choose_decoder(spec: ModelSpec, config: Config, machine: MachineProbe = probe_machine) -> RuntimeChoice:
    """Where ``spec``'s decoder runs on this machine: its CUDA graph on the GPU, or its CPU graph."""
    preference = spec.engine.providers or config.onnxruntime.providers
    return choose_decoder_runtime(spec.path, spec.engine.cuda_file, preference, machine())


def chosen_decoder(machine: MachineProbe = probe_machine) -> Callable[..., Decoder]:
    """A decoder factory for kinds ``onnxruntime`` and ``auto``: chooses the device, then makes the decoder with a
    KV cache of ``limits.slots`` rows x ``limits.capacity`` positions."""
    def make(spec: ModelSpec, config: Config, generation: Mapping[str, Any], limits: GenerationLimits) -> Decoder:
        choice = choose_decoder(spec, config, machine)
        log.info("model %s version %s: %s", spec.name, spec.version, choice.summary)
        threads = spec.engine.intra_op_threads
        threads = config.onnxruntime.intra_op_threads if threads < 0 else threads
        if choice.on_gpu:
            decoder = OnnxRuntimeDecoder(spec.path / spec.engine.cuda_file, generation, rows=limits.slots,
                                         max_capacity=limits.capacity, threads=threads,
                                         placement=Placement.cuda(spec.engine.device_id,
                                                                  cuda_graphs=spec.engine.cuda_graphs))
        else:
            decoder = OnnxRuntimeDecoder(spec.model_file, generation, rows=limits.slots, max_capacity=limits.capacity,
                                         threads=threads, spin=spec.generation.spin_threads,
                                         dense_batches=spec.generation.dense_batches,
                                         split_weights=spec.generation.split_weights)
        decoder.choice = choice
        return decoder

    return make


def onnxruntime_decoder(spec: ModelSpec, config: Config, generation: Mapping[str, Any],
                        limits: GenerationLimits) -> Decoder:
    """An ONNX Runtime decoder on this machine's GPU where the version has a CUDA graph, else on the CPU."""
    return chosen_decoder()(spec, config, generation, limits)


def default_engines(machine: MachineProbe = probe_machine) -> EngineRegistry:
    """The engine kinds this server runs; ``machine`` probes the GPU, TensorRT and execution providers."""
    make = chosen_engine(machine)
    return EngineRegistry({"onnxruntime": make, "tensorrt": make, "auto": make})


def default_decoders(machine: MachineProbe = probe_machine) -> DecoderRegistry:
    """The decoder kinds this server runs; ``machine`` probes the GPU and execution providers."""
    make = chosen_decoder(machine)
    return DecoderRegistry({"onnxruntime": make, "auto": make})


def create_engine(spec: ModelSpec, config: Config) -> Engine:
    """The default engine factory: the engine of ``spec``'s kind from :func:`default_engines`."""
    return default_engines()(spec, config)

"""The default runtimes: ONNX Runtime engines and decoders, with the server's defaults filled in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance.config import Config
from appliance.engine_registry import DecoderRegistry, EngineRegistry
from appliance.engines.base import Decoder, Engine
from appliance.engines.generation import GenerationLimits
from appliance.engines.onnxruntime_decoder import OnnxRuntimeDecoder
from appliance.engines.onnxruntime_engine import OnnxRuntimeEngine, OrtOptions
from appliance.model_spec import ModelSpec


def ort_options(spec: ModelSpec, config: Config) -> OrtOptions:
    """Session options: the model's ``[engine]`` table over the server's ``[onnxruntime]`` section."""
    defaults, engine = config.onnxruntime, spec.engine
    return OrtOptions(
        providers=engine.providers or defaults.providers,
        intra_op_threads=engine.intra_op_threads if engine.intra_op_threads >= 0 else defaults.intra_op_threads,
        inter_op_threads=engine.inter_op_threads if engine.inter_op_threads >= 0 else defaults.inter_op_threads,
        graph_optimization_level=engine.graph_optimization_level or defaults.graph_optimization_level,
        optimized_model_dir=config.paths.cache() / "ort" if defaults.optimized_model_cache else None,
    )


def onnxruntime_engine(spec: ModelSpec, config: Config) -> Engine:
    """An ONNX Runtime engine for a tensor or embedding model."""
    return OnnxRuntimeEngine(spec.model_file, ort_options(spec, config))


def onnxruntime_decoder(spec: ModelSpec, config: Config, generation: Mapping[str, Any],
                        limits: GenerationLimits) -> Decoder:
    """An ONNX Runtime decoder with a KV cache of ``limits.slots`` rows x ``limits.capacity`` positions."""
    threads = spec.engine.intra_op_threads
    threads = config.onnxruntime.intra_op_threads if threads < 0 else threads
    return OnnxRuntimeDecoder(spec.model_file, generation, rows=limits.slots, max_capacity=limits.capacity,
                              threads=threads, spin=spec.generation.spin_threads,
                              dense_batches=spec.generation.dense_batches)


def default_engines() -> EngineRegistry:
    """The engine kinds this server runs."""
    return EngineRegistry({"onnxruntime": onnxruntime_engine})


def default_decoders() -> DecoderRegistry:
    """The decoder kinds this server runs."""
    return DecoderRegistry({"onnxruntime": onnxruntime_decoder})


def create_engine(spec: ModelSpec, config: Config) -> Engine:
    """The default engine factory: the engine of ``spec``'s kind from :func:`default_engines`."""
    return default_engines()(spec, config)

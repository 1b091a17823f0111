"""Builds the engine a model version asks for, with the server's defaults filled in."""

from __future__ import annotations

from appliance.config import Config
from appliance.engines.base import Engine
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


def create_engine(spec: ModelSpec, config: Config) -> Engine:
    """The default engine factory."""
    if spec.engine.kind == "onnxruntime":
        return OnnxRuntimeEngine(spec.model_file, ort_options(spec, config))
    raise ValueError(f"engine kind {spec.engine.kind!r} is not supported")

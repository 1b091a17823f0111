"""The model version class for each task of ``model.toml``."""

from __future__ import annotations

from collections.abc import Mapping

from appliance.config import Config, ConfigError
from appliance.engine_registry import Runtimes
from appliance.model_spec import ModelSpec
from appliance.models.base import ModelVersion
from appliance.models.embedding import EmbeddingModel
from appliance.models.generative import GenerativeModel
from appliance.models.tensor import TensorModel
from appliance.telemetry import VersionMetrics

MODEL_CLASSES: Mapping[str, type[ModelVersion]] = {
    "tensor": TensorModel,
    "embed": EmbeddingModel,
    "generate": GenerativeModel,
}


def model_for(spec: ModelSpec, config: Config, metrics: VersionMetrics, runtimes: Runtimes) -> ModelVersion:
    """A new (unloaded) version of the class for ``spec.task``."""
    model_class = MODEL_CLASSES.get(spec.task)
    if model_class is None:
        raise ConfigError(f"{spec.path / 'model.toml'}: task {spec.task!r} has no model class; the tasks are "
                          f"{sorted(MODEL_CLASSES)}")
    return model_class(spec, config, metrics, runtimes)

"""The base type of a loaded model version, under the name callers import it by.

The classes themselves live in ``appliance.models``: one per task, made by ``appliance.models.model_for``.
"""

from appliance.engine_registry import EngineFactory
from appliance.models.base import ModelVersion, folder_digest
from appliance.models.served_tensors import ServedTensor

__all__ = ["EngineFactory", "ModelVersion", "ServedTensor", "folder_digest"]

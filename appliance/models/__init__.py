"""Model versions by task: :class:`TensorModel`, :class:`EmbeddingModel` and :class:`GenerativeModel` on the
:class:`ModelVersion` base, made by :func:`model_for`."""

from appliance.models.base import ModelVersion, folder_digest
from appliance.models.embedding import EmbeddingModel
from appliance.models.factory import MODEL_CLASSES, model_for
from appliance.models.generative import GenerativeModel
from appliance.models.served_tensors import ServedTensor
from appliance.models.tensor import TensorModel

__all__ = ["MODEL_CLASSES", "EmbeddingModel", "GenerativeModel", "ModelVersion", "ServedTensor", "TensorModel",
           "folder_digest", "model_for"]

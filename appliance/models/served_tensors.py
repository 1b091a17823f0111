"""The tensors a model version serves, as clients see them, and the checks of a request's inputs against them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.config import ConfigError
from appliance.engines.tensors import NUMPY_TO_V2, TensorSpec, numpy_dtype
from appliance.errors import BadRequest
from appliance.model_spec import TensorSection


@dataclass(frozen=True, slots=True)
class ServedTensor:
    """A tensor as clients see it; ``dims`` leave out the batch dimension when the model batches."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    max_dims: tuple[int, ...] = ()
    dtype: np.dtype = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", numpy_dtype(self.datatype))

    def fits(self, dims: tuple[int, ...]) -> bool:
        """Whether concrete dimensions (batch dimension removed) match ``dims``."""
        if len(dims) != len(self.dims):
            return False
        for want, got in zip(self.dims, dims):
            if want != -1 and want != got:
                return False
        return True

    def over_limit(self, dims: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The first (axis, size, limit) where ``dims`` exceed ``max_dims``, if any."""
        for axis, (got, limit) in enumerate(zip(dims, self.max_dims)):
            if got > limit:
                return axis, got, limit
        return None


def served_tensors(model_tensors: list[TensorSpec], declared: list[TensorSection], kind: str, *,
                   max_batch_size: int, model_toml: Path) -> list[ServedTensor]:
    """The ``kind`` (``"inputs"`` or ``"outputs"``) a model serves: the engine's tensors, narrowed by the
    ``[[inputs]]`` / ``[[outputs]]`` of ``model.toml``; a :class:`ConfigError` where the two disagree."""
    batching = max_batch_size > 0
    if batching:
        for tensor in model_tensors:
            if not tensor.shape or tensor.shape[0] != -1:
                raise ConfigError(
                    f"{model_toml}: max_batch_size = {max_batch_size} but {kind[:-1]} {tensor.name} has shape "
                    f"{list(tensor.shape)}; its first dimension must be variable, or set max_batch_size = 0"
                )
    served = {t.name: ServedTensor(t.name, t.datatype, t.shape[1:] if batching else t.shape) for t in model_tensors}
    if not declared:
        return list(served.values())
    declared_names = {d.name for d in declared}
    if declared_names != set(served):
        raise ConfigError(
            f"{model_toml}: [[{kind}]] names {sorted(declared_names)} do not match the model's {sorted(served)}"
        )
    result = []
    for section in declared:
        model_tensor = served[section.name]
        if section.datatype != model_tensor.datatype:
            raise ConfigError(
                f"{model_toml}: {kind} {section.name} is declared {section.datatype} but the model has "
                f"{model_tensor.datatype}"
            )
        dims = tuple(section.dims) if section.dims else model_tensor.dims
        narrows = len(dims) == len(model_tensor.dims) and all(
            have in (-1, want) for have, want in zip(model_tensor.dims, dims)
        )
        if not narrows:
            raise ConfigError(
                f"{model_toml}: {kind} {section.name} dims {list(dims)} do not fit the model's {list(model_tensor.dims)}"
            )
        result.append(ServedTensor(section.name, section.datatype, dims, tuple(section.max_dims)))
    return result


def check_inputs(inputs: Mapping[str, np.ndarray], expected: Mapping[str, ServedTensor], *, model: str,
                 max_batch_size: int) -> None:
    """Raise :class:`BadRequest` naming the input and the expected and received names, shape or dtype."""
    if len(inputs) != len(expected) or any(name not in expected for name in inputs):
        _raise_for_names(inputs, expected, model)
    batching = max_batch_size > 0
    rows = None
    for name, array in inputs.items():
        tensor = expected[name]
        if array.dtype != tensor.dtype:
            received = NUMPY_TO_V2.get(array.dtype, str(array.dtype))
            raise BadRequest(f"input {name!r}: expected datatype {tensor.datatype}, received {received}")
        shape = array.shape
        dims = shape[1:] if batching else shape
        if (batching and not (shape and 1 <= shape[0] <= max_batch_size)) or not tensor.fits(dims):
            raise BadRequest(
                f"input {name!r}: expected shape {_describe_shape(tensor, max_batch_size)}, received {list(shape)}"
            )
        if tensor.max_dims and (excess := tensor.over_limit(dims)) is not None:
            axis, size, limit = excess
            raise BadRequest(
                f"input {name!r}: dimension {axis + int(batching)} is {size}, over the model's limit of {limit}"
            )
        if batching:
            if rows is not None and shape[0] != rows:
                raise BadRequest(
                    f"input {name!r} has batch size {shape[0]} but other inputs have {rows}; "
                    "every input needs the same first dimension"
                )
            rows = shape[0]


def _raise_for_names(inputs: Mapping[str, np.ndarray], expected: Mapping[str, ServedTensor], model: str) -> None:
    unknown = [name for name in inputs if name not in expected]
    if unknown:
        raise BadRequest(f"unknown input {unknown[0]!r} for model {model}; its inputs are {sorted(expected)}")
    missing = [name for name in expected if name not in inputs]
    raise BadRequest(f"missing input {missing[0]!r} for model {model}; it needs {sorted(expected)}")


def _describe_shape(tensor: ServedTensor, max_batch_size: int) -> str:
    dims = [str(d) for d in tensor.dims]
    limits = f" (limits {list(tensor.max_dims)})" if tensor.max_dims else ""
    if max_batch_size > 0:
        return f"[{','.join(['-1', *dims])}] with batch size 1 to {max_batch_size}{limits}"
    return f"[{','.join(dims)}]{limits}"

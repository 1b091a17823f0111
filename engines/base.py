"""The Engine contract: what every model runtime offers to the schedulers.

An engine knows nothing of HTTP or asyncio. ``run`` blocks and is only ever called from a scheduler's worker
thread; an engine instance is used by one thread at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from appliance.engines.tensors import TensorSpec


@runtime_checkable
class Engine(Protocol):
    """A loaded model that maps named input arrays to named output arrays."""

    @property
    def inputs(self) -> list[TensorSpec]:
        """The model's inputs, as the model declares them (batch dimension included)."""
        ...

    @property
    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, as the model declares them (batch dimension included)."""
        ...

    @property
    def description(self) -> str:
        """A one-line summary for logs: runtime, providers, threads."""
        ...

    def load(self) -> None:
        """Create the runtime session. Blocking; may take seconds."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once. Blocking."""
        ...

    def close(self) -> None:
        """Release the runtime session."""
        ...

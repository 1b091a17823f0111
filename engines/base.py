"""The runtime contracts the schedulers drive: :class:`Engine` for tensor models, :class:`Decoder` for generation.

Neither knows anything of HTTP or asyncio. Their methods block and are only ever called from a scheduler's worker
thread; an instance is used by one thread at a time.
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


@runtime_checkable
class Decoder(Protocol):
    """A loaded decoder graph and its KV cache of ``rows`` sequences, one row each.

    A row's tokens sit at positions ``[0, length)`` of the row. The cache may hold fewer positions than a row may
    ever need (``capacity`` up to ``max_capacity``): the scheduler asks for room before each call.
    """

    @property
    def rows(self) -> int:
        """Sequences the KV cache holds at once."""
        ...

    @property
    def capacity(self) -> int:
        """Positions each row holds now."""
        ...

    @property
    def max_capacity(self) -> int:
        """The most positions a row may grow to."""
        ...

    @property
    def description(self) -> str:
        """A one-line summary for logs: runtime, rows, positions."""
        ...

    def ensure(self, positions: int) -> None:
        """Grow the cache so that every row holds at least ``positions`` tokens (at most ``max_capacity``);
        the tokens already in it are kept."""
        ...

    def shrink(self) -> None:
        """Give back memory grown for long sequences, keeping each row's first ``capacity`` (as it is after)
        positions: the scheduler starts new prompts from what free rows hold. Only called while no row holds a
        sequence."""
        ...

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        """Copy positions ``[0, positions)`` of row ``source`` into each of the rows ``targets`` (a prompt
        prefilled once for several samples)."""
        ...

    def warm(self) -> None:
        """Prepare what belongs to the thread that runs the steps (a GPU decoder's CUDA graphs, which ONNX Runtime
        keeps per thread); the scheduler's step thread calls it once, before its first step."""
        ...

    def decode_range(self, start: int, stop: int) -> tuple[int, int]:
        """The rows a decode step shared by rows ``[start, stop)`` runs over: the same range, or a wider one the
        decoder has a captured graph for (the scheduler fills the rows it adds as it does idle rows in range)."""
        ...

    def greedy_tokens(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray | None:
        """A decode step like :meth:`run` that returns each row's greedy next token (``[rows]`` int64) instead of
        the logits, where the decoder computes it beside them (a GPU's logits then never leave the device);
        ``None`` where it does not (nothing ran: call :meth:`run`)."""
        ...

    def prefill_rows(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray,
                     query_seqlens: np.ndarray) -> np.ndarray | None:
        """Prompt chunks of several rows in one call: row ``r`` appends its first ``query_seqlens[r]`` ids of
        ``input_ids`` (right-padded to the widest chunk; 0 leaves the row as it is) and ``seqlens_k[r]`` is its
        length after the call minus 1. Returns the logits of each row's last appended token ``[rows, vocab]``
        (rows with no chunk: anything), or ``None`` where the decoder has no such call (nothing ran)."""
        ...

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        """One step over rows ``start_row .. start_row + len(input_ids)``.

        ``input_ids`` ``[rows, new tokens]`` are appended to each row; ``seqlens_k[r]`` is row ``r``'s length
        after the call minus 1. Returns the logits of each row's last new position, ``[rows, vocab]``.
        """
        ...

    def close(self) -> None:
        """Release the session and the cache."""
        ...

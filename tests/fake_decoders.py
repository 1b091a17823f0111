"""A base for the tests' fake decoders: a fixed cache of ``rows`` x ``capacity`` positions that needs no growing,
copying, warming or buckets. A subclass gives ``run`` (the logits it wants the scheduler to see)."""

from __future__ import annotations

import numpy as np


class FixedCacheDecoder:
    """The :class:`~appliance.engines.base.Decoder` contract around a subclass's ``run``."""

    description = "fake decoder (tests)"

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows, self.capacity, self.max_capacity = rows, capacity, capacity

    def ensure(self, positions: int) -> None:
        """The capacity is fixed; the scheduler never asks for more."""
        assert positions <= self.max_capacity

    def shrink(self) -> None:
        """The capacity is fixed."""

    def copy_row(self, source: int, targets: list[int], positions: int) -> None:
        """No cache to copy."""

    def warm(self) -> None:
        """Nothing to capture."""

    def decode_range(self, start: int, stop: int) -> tuple[int, int]:
        return start, stop

    def greedy_tokens(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> None:
        return None

    def prefill_rows(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray,
                     query_seqlens: np.ndarray) -> None:
        return None

    def run(self, start_row: int, input_ids: np.ndarray, seqlens_k: np.ndarray) -> np.ndarray:
        raise NotImplementedError("a fake decoder gives its own logits")

    def close(self) -> None:
        """Nothing held."""

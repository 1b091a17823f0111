"""Shape buckets: the fixed batch sizes (and, for token models, sequence lengths) an engine runs at.

A CUDA graph replays fixed shapes at fixed addresses, so a bucketed engine pads each batch up to the next bucket
(rows of zeros, which never mix with the real rows), runs at that shape and slices the real rows back out. A batch
larger than every bucket runs eagerly at its own shape.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def powers_of_two(largest: int, smallest: int = 1) -> tuple[int, ...]:
    """``smallest, 2*smallest, 4*smallest, ...`` below ``largest``, then ``largest`` itself."""
    if largest < 1:
        return ()
    sizes = []
    size = max(smallest, 1)
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return tuple(sizes)


@dataclass(frozen=True, slots=True)
class Buckets:
    """Sorted sizes; :meth:`fit` gives the smallest that holds a size, or ``None`` above the largest."""

    sizes: tuple[int, ...]

    @classmethod
    def of(cls, sizes: Sequence[int]) -> Buckets:
        """Buckets from any order of positive sizes (duplicates dropped)."""
        cleaned = tuple(sorted({int(size) for size in sizes}))
        if cleaned and cleaned[0] < 1:
            raise ValueError(f"bucket sizes must be positive; got {list(sizes)}")
        return cls(cleaned)

    def fit(self, size: int) -> int | None:
        """The smallest bucket ``>= size``; ``None`` when ``size`` is larger than every bucket."""
        index = bisect.bisect_left(self.sizes, size)
        return self.sizes[index] if index < len(self.sizes) else None

    @property
    def largest(self) -> int:
        """The largest bucket (0 when there are none)."""
        return self.sizes[-1] if self.sizes else 0

    def __bool__(self) -> bool:
        return bool(self.sizes)


def batch_buckets(declared: Sequence[int], max_batch_size: int) -> Buckets:
    """The batch buckets of a model: ``[engine] batch_buckets`` when given, else powers of two up to the max batch
    (a model without a batch dimension has none)."""
    if max_batch_size <= 0:
        return Buckets(())
    return Buckets.of(declared) if declared else Buckets(powers_of_two(max_batch_size))


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with zero rows appended along the first dimension up to ``rows`` (itself when it has them)."""
    missing = rows - array.shape[0]
    if missing <= 0:
        return array
    padded = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
    padded[: array.shape[0]] = array
    return padded


def rows_of(inputs: Mapping[str, np.ndarray]) -> int:
    """The batch size of a request: the first dimension shared by every input."""
    sizes = {value.shape[0] if value.ndim else 1 for value in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def shape_key(inputs: Mapping[str, np.ndarray | tuple[int, ...]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A hashable key of the input names and shapes (what one graph or one set of bound buffers is for); takes
    arrays or shapes."""
    return tuple(sorted((name, tuple(getattr(value, "shape", value))) for name, value in inputs.items()))

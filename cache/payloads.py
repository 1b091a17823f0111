"""What the response cache stores for each kind of answer, independent of the wire format it is sent in.

Embeddings and tensors are kept as raw arrays, and a generation as the text pieces it was streamed in, so that
one entry serves JSON, base64, binary, msgpack or a server-sent-event stream alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

FORMAT = 1


def _array(array: np.ndarray) -> list:
    if array.dtype == object:
        items = [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel()]
        return ["O", list(array.shape), items]
    array = np.ascontiguousarray(array)
    return [array.dtype.str, list(array.shape), array.tobytes()]


def _from_array(item: list) -> np.ndarray:
    dtype, shape, data = item
    if dtype == "O":
        return np.array(data, dtype=object).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def encode_tensors(outputs: dict[str, np.ndarray]) -> bytes:
    """A tensor model's outputs, in order."""
    return msgpack.packb([FORMAT, [[name, *_array(array)] for name, array in outputs.items()]])


def decode_tensors(payload: bytes) -> dict[str, np.ndarray]:
    """The outputs stored by :func:`encode_tensors` (read-only arrays over the payload)."""
    _, items = msgpack.unpackb(payload)
    return {item[0]: _from_array(item[1:]) for item in items}


def encode_embeddings(vectors: np.ndarray, prompt_tokens: int) -> bytes:
    """Embedding vectors and the tokens read to make them."""
    return msgpack.packb([FORMAT, _array(np.asarray(vectors, dtype=np.float32)), prompt_tokens])


def decode_embeddings(payload: bytes) -> tuple[np.ndarray, int]:
    """The vectors and token count stored by :func:`encode_embeddings`."""
    _, vectors, prompt_tokens = msgpack.unpackb(payload)
    return _from_array(vectors), prompt_tokens


@dataclass
class StoredGeneration:
    """A finished generation: the pieces of text as they were sent, with their logprob entries."""

    pieces: list[tuple[str, list[dict]]] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def encode(self) -> bytes:
        """The payload to store."""
        return msgpack.packb([FORMAT, [list(p) for p in self.pieces], self.finish_reason, self.prompt_tokens,
                              self.completion_tokens])

    @classmethod
    def decode(cls, payload: bytes) -> StoredGeneration:
        """Read a payload written by :meth:`encode`."""
        _, pieces, finish_reason, prompt_tokens, completion_tokens = msgpack.unpackb(payload)
        return cls([(text, logprobs) for text, logprobs in pieces], finish_reason, prompt_tokens,
                   completion_tokens)

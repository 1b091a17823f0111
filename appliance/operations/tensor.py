"""Tensor requests (KServe v2 infer): named arrays in, named arrays out, on the model's dynamic batcher (or, for
an embedding model, its token-budget scheduler)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from appliance.cache.payloads import decode_tensors, encode_tensors
from appliance.cloud import Cloud
from appliance.errors import BadRequest
from appliance.model_version import ModelVersion
from appliance.models import EmbeddingModel, GenerativeModel, TensorModel
from appliance.operations.base import CloudDone, LocalDone
from appliance.placement import Placement
from appliance.types import Result, Route, Tally, TensorRequest, Usage


class TensorOperation:
    """The ``tensor`` operation."""

    task = "tensor"

    def __init__(self, deadline: Callable[[float | None, ModelVersion], float | None]) -> None:
        self._deadline = deadline

    def route(self, placement: Placement, alias: str, request: TensorRequest) -> Route:
        """v2 requests name their model: no router alias stands for a tensor model."""
        return placement.named(alias)

    def places(self, request: TensorRequest) -> int:
        """One place: a tensor request's rows are checked against the model's batch size, not counted here."""
        return 1

    def check(self, served: ModelVersion, request: TensorRequest) -> None:
        """The model's inputs, datatypes and shapes, and the outputs asked for."""
        if isinstance(served, GenerativeModel):
            raise BadRequest(f"model {served.name!r} generates text: use POST /v1/chat/completions or "
                             "/v1/completions")
        served.check_inputs(request.inputs)
        if request.outputs is not None:
            known = {t.name for t in served.outputs}
            unknown = [name for name in request.outputs if name not in known]
            if unknown:
                raise BadRequest(
                    f"unknown output {unknown[0]!r} for model {served.name}; its outputs are {sorted(known)}"
                )
        if isinstance(served, EmbeddingModel):
            _check_token_tensors(served, request.inputs)

    def cache_key(self, served: ModelVersion, request: TensorRequest) -> tuple[Callable[[], Any], bool]:
        """Inputs and outputs asked for; deterministic when the model is proved batch-invariant (or, for an
        embedding model, the request runs in the reproducible mode)."""
        return (lambda: _canonical(request)), served.deterministic(request.caller.reproducible)

    def cached(self, served: ModelVersion, request: TensorRequest, payload: bytes) -> tuple[Result, Tally]:
        """The stored output arrays."""
        outputs = decode_tensors(payload)
        return Result(served.name, served.version, outputs, _datatypes(served, outputs), Usage()), Tally()

    async def run(self, served: ModelVersion, request: TensorRequest, done: LocalDone) -> Result:
        """Queue on the model's batcher (engine calls run in its worker threads)."""
        deadline = self._deadline(request.deadline, served)
        metrics = served.metrics
        metrics.started()
        try:
            if isinstance(served, EmbeddingModel):
                outputs, tally = await _embed_tensors(served, request, deadline)
            else:
                assert isinstance(served, TensorModel) and served.batcher is not None
                # Submitting is synchronous: no await between resolve() and here, so a swap cannot slip in between.
                outcome = await served.batcher.submit(request.inputs, deadline)
                outputs = outcome.outputs
                rows = next(iter(request.inputs.values())).shape[0] if served.max_batch_size > 0 else 1
                share = rows / max(rows, outcome.batch_size or rows)  # the batch's time is shared by its rows
                tally = Tally(compute_s=outcome.compute_s * share, service_s=outcome.compute_s,
                              queue_s=outcome.queue_s, batch_size=outcome.batch_size)
        finally:
            metrics.finished()
        metrics.queue_duration.observe(tally.queue_s)
        if request.outputs is not None:
            outputs = {name: outputs[name] for name in request.outputs}
        done(tally, lambda: encode_tensors(outputs))
        usage = Usage(queue_s=tally.queue_s, compute_s=tally.compute_s, batch_size=tally.batch_size)
        return Result(served.name, served.version, outputs, _datatypes(served, outputs), usage)

    async def cloud(self, cloud: Cloud, route: Route, request: TensorRequest, done: CloudDone) -> Result:
        """The request's body, as it came, to a ``kserve`` upstream."""
        result, cost = await cloud.infer(route, request)
        done(Tally(cost=cost))
        return result


def _datatypes(served: ModelVersion, outputs: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: served.output_datatypes[name] for name in outputs}


def _check_token_tensors(served: EmbeddingModel, inputs: dict[str, np.ndarray]) -> None:
    """An embedding model's ``input_ids`` and ``attention_mask``: the same shape, ids inside the vocabulary."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape != mask.shape:
        raise BadRequest(f"input_ids has shape {list(ids.shape)} but attention_mask has {list(mask.shape)}; "
                         "they need the same shape")
    vocab = served.text.vocab_size
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise BadRequest(f"input_ids has token id {bad}, outside the vocabulary of model {served.name} "
                         f"(0 to {vocab - 1})")


async def _embed_tensors(served: EmbeddingModel, request: TensorRequest,
                         deadline: float | None) -> tuple[dict[str, np.ndarray], Tally]:
    """A v2 tensor request to an embedding model: its rows go through the token-budget scheduler."""
    assert served.embedder is not None  # started
    ids, mask = request.inputs["input_ids"], request.inputs["attention_mask"]
    sequences = [row[row_mask.astype(bool)].tolist() for row, row_mask in zip(ids, mask)]
    if any(not sequence for sequence in sequences):
        raise BadRequest("every row of attention_mask needs at least one 1")
    outcome = await served.embedder.submit(sequences, deadline,
                                           reproducible=served.reproducible(request.caller.reproducible))
    tally = Tally(compute_s=outcome.compute_s, service_s=outcome.compute_s, queue_s=outcome.queue_s,
                  batch_size=outcome.batches)
    return {served.outputs[0].name: outcome.embeddings}, tally


def _canonical(request: TensorRequest) -> bytes:
    """The inputs (name, dtype, shape, bytes) and the outputs asked for: all that changes a tensor answer.

    Packed here in one msgpack call, not by the cache's generic encoder (a few times slower): only lists of
    known types, whose msgpack bytes are unique without sorting."""
    inputs = []
    for name in sorted(request.inputs):
        array = request.inputs[name]
        if array.dtype == object:
            data: object = [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel()]
        else:
            data = np.ascontiguousarray(array).tobytes()
        inputs.append([name, array.dtype.str, [int(n) for n in array.shape], data])
    outputs = None if request.outputs is None else [str(name) for name in request.outputs]
    return msgpack.packb([inputs, outputs], use_bin_type=True)

"""What the data plane asks of every operation, and how an operation tells it that its work is done."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from appliance.cloud import Cloud
from appliance.model_version import ModelVersion
from appliance.placement import Placement
from appliance.types import Route, Tally

RequestT = TypeVar("RequestT")
AnswerT = TypeVar("AnswerT")


# Called once when a local run is done: its tally, and the cache payload when the answer is complete (else None).
LocalDone = Callable[[Tally, Callable[[], bytes] | None], None]
# Called once when a cloud call is done, with its tally (tokens and price).
CloudDone = Callable[[Tally], None]


class Operation(Protocol, Generic[RequestT, AnswerT]):
    """One kind of request (tensor, embed, generate), as the data plane's steps see it."""

    task: str  # the kind of request, which picks the kind of upstream (appliance.placement.TASK_KINDS)

    def route(self, placement: Placement, alias: str, request: RequestT) -> Route:
        """Where a request that names a router alias goes."""
        ...

    def check(self, served: ModelVersion, request: RequestT) -> None:
        """Raise :class:`~appliance.errors.BadRequest` when the model cannot take the request."""
        ...

    def places(self, request: RequestT) -> int:
        """The places the request takes at a model's admission gate: the sequences or rows it runs."""
        ...

    def cache_key(self, served: ModelVersion, request: RequestT) -> tuple[Callable[[], Any], bool] | None:
        """The request's canonical form and whether the model answers it deterministically; None: not cached."""
        ...

    def cached(self, served: ModelVersion, request: RequestT, payload: bytes) -> tuple[AnswerT, Tally]:
        """The answer stored in the response cache."""
        ...

    async def run(self, served: ModelVersion, request: RequestT, done: LocalDone) -> AnswerT:
        """Run on the local model; call ``done`` once the work is over (for a stream: when it closes)."""
        ...

    async def cloud(self, cloud: Cloud, route: Route, request: RequestT, done: CloudDone) -> AnswerT:
        """Run on the cloud upstream the route names; call ``done`` once the call is over."""
        ...

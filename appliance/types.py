"""The core types of the request path: one place each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Usage:
    """What a request consumed."""

    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0


@dataclass(slots=True)
class Request:
    """A parsed request, whatever protocol it came in by.

    ``deadline`` is on the ``time.monotonic`` clock; ``None`` means the model's default timeout applies.
    ``outputs`` names the outputs wanted (``None``: all).
    """

    id: str
    task: str  # tensor (embed and generate come with their APIs)
    model: str
    version: int | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    deadline: float | None = None
    cache_control: str | None = None  # the request's Cache-Control header


@dataclass(slots=True)
class Result:
    """The answer to a :class:`Request`."""

    id: str
    model: str
    version: int
    outputs: dict[str, np.ndarray]
    usage: Usage


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as the server derived it from the key (never from anything else the client sends)."""

    tenant: str
    key_id: str
    key_name: str
    models: tuple[str, ...]
    cloud: bool
    cache_scope: str | None  # None: this caller's requests are never cached
    admin: bool
    workflow: str = ""
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0
    lane: str = "interactive"  # default admission lane

    def may_use(self, *names: str) -> bool:
        """Whether any of ``names`` (a model's name or aliases) is in the key's list; an empty list allows all."""
        return not self.models or any(name in self.models for name in names)


@dataclass(slots=True)
class Trace:
    """What the access log, the request metrics and the limits need to know about a request once it is answered."""

    model: str = ""
    version: str = ""
    usage: Usage | None = None
    principal: Principal | None = None
    cache: str = ""  # hit, miss or bypass when the request went through the response cache
    input_tokens: int = 0  # read and written: charged to the key's tokens-per-minute budget and the ledger
    output_tokens: int = 0
    place: str = "local"  # where it ran: local, cloud or cache
    route: str = ""  # why it went where it went, for x-appliance-route and the access log
    lane: str = ""
    workflow: str = ""
    local_only: bool = False  # the caller asked (x-appliance-data: local-only) that its data stay here
    cost: float = 0.0
    cost_avoided: float = 0.0
    compute_s: float = 0.0  # this request's share of engine time, for the ledger
    arrived: float = 0.0  # time.monotonic() when the request reached the server: lane waits count from here
    routed_by: str = ""  # the router alias the request named, once the key was found to allow it


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request runs and why, in words a log reader understands."""

    place: str  # local or cloud
    model: str  # the local model, or the upstream's name for it
    reason: str
    kind: str  # named, complexity, overflow, failover
    upstream: str = ""


@dataclass(slots=True)
class EmbedRequest:
    """An embeddings request: texts, or token id sequences used as given (special tokens included by the caller)."""

    id: str
    model: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None
    truncate: bool = False
    deadline: float | None = None
    cache_control: str | None = None


@dataclass(slots=True)
class EmbedResponse:
    """Embeddings in input order, the model that made them and the tokens it read."""

    model: str
    version: int
    embeddings: np.ndarray
    prompt_tokens: int
    usage: Usage

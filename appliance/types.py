"""The core types of the request path: one place each.

A handler turns the wire format into one typed request per operation (:class:`TensorRequest`,
:class:`EmbedRequest`, :class:`GenerateRequest`), each carrying the :class:`Caller` the middleware derived and the
:class:`Trace` the data plane fills in for the access log and the response headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.tracing import NO_SPANS, Spans

if TYPE_CHECKING:
    from appliance.engines.generation import SamplingParams
    from appliance.tools import ToolSet

MAX_EMBED_INPUTS = 2048  # texts (or token id arrays) per embeddings request; an embedding model's queue holds two


@dataclass(slots=True)
class Usage:
    """What a request consumed."""

    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0


@dataclass(slots=True)
class Tally:
    """What one request consumed, told to the data plane once the work is done."""

    input_tokens: int = 0
    output_tokens: int = 0
    compute_s: float = 0.0  # this request's share of engine time (a batch's time is shared by its rows)
    service_s: float | None = None  # how long it held the model, for the gate's estimate; None: nothing learned
    queue_s: float = 0.0
    batch_size: int = 0
    cost: float = 0.0  # a cloud call's price


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
    token_input: bool = True  # may send token ids as embeddings input (a key must opt in; the operator may)
    retention: bool = True  # False: the key's requests and answers are never kept (local-only-no-retention)

    def may_use(self, *names: str) -> bool:
        """Whether any of ``names`` (a model's name or aliases) is in the key's list; an empty list allows all."""
        return not self.models or any(name in self.models for name in names)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request and under which policy, as the middleware derived it from the key and the headers.

    ``local_only`` is true when the key keeps data on the device or the request asked it to
    (``x-appliance-data: local-only``); nothing a client sends widens what the key allows. ``reproducible``: the
    request asked (``x-appliance-reproducible: true``) for an answer that does not depend on what runs beside it.
    """

    principal: Principal | None = None
    lane: str = "interactive"
    workflow: str = ""
    local_only: bool = True
    arrived: float = 0.0  # time.monotonic() when the request reached the server: lane waits count from here
    reproducible: bool = False
    retention: bool = True  # False: nothing of the request or its answer is kept once answered (no cache, no replay)


@dataclass(slots=True)
class Trace:
    """What the data plane tells the access log, the metrics and the response headers about a request.

    Written by the data plane alone, as each step learns its part; read by the middleware once the request is
    answered. ``spans`` is the request's trace spans (set by the middleware when tracing is on; else the shared
    no-op), into which the data plane opens a span per step.
    """

    model: str = ""  # the model that answered, or ``<upstream>:<model>`` for the cloud
    version: str = ""
    place: str = "local"  # local, cloud or cache
    route: str = ""  # why it went where it went, for x-appliance-route and the access log
    route_kind: str = ""  # named, complexity, overflow or failover (Route.kind)
    cache: str = ""  # hit, miss or bypass when the request went through the response cache
    usage: Usage | None = None
    spans: Spans = NO_SPANS


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request runs and why, in words a log reader understands."""

    place: str  # local or cloud
    model: str  # the local model, or the upstream's name for it
    reason: str
    kind: str  # named, complexity, overflow, failover
    upstream: str = ""
    score: float | None = None  # the complexity score of a routed request


@dataclass(frozen=True, slots=True)
class WireBody:
    """A request body as the client sent it, kept for a cloud upstream of the same protocol."""

    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class TensorRequest:
    """A KServe v2 infer request: named input arrays for one model version.

    ``deadline`` is on the ``time.monotonic`` clock; ``None`` means the model's default timeout applies.
    ``outputs`` names the outputs wanted (``None``: all).
    """

    model: str
    version: int | None
    inputs: dict[str, np.ndarray]
    caller: Caller = field(default_factory=Caller)
    trace: Trace = field(default_factory=Trace)
    id: str = ""
    outputs: list[str] | None = None
    deadline: float | None = None
    cache_control: str | None = None  # the request's Cache-Control header
    wire: WireBody | None = None


@dataclass(slots=True)
class Result:
    """The answer to a :class:`TensorRequest`: output arrays with their v2 datatypes, or, from a cloud upstream,
    its answer as it came (``relayed``)."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    usage: Usage
    relayed: Any = None  # an appliance.upstreams.UpstreamResult


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
    caller: Caller = field(default_factory=Caller)
    trace: Trace = field(default_factory=Trace)
    wire: dict[str, Any] | None = None  # the JSON body as it came, for a cloud upstream


@dataclass(slots=True)
class EmbedResponse:
    """Embeddings in input order, the model that made them and the tokens it read."""

    model: str
    version: int
    embeddings: np.ndarray
    prompt_tokens: int
    usage: Usage


@dataclass(slots=True)
class GenerateRequest:
    """A chat (``messages``) or completions (``prompt``) request.

    ``canonical`` is every field that changes the generated text: the response cache's view of the request.
    ``stream`` says whether the client reads the answer as it comes (a cloud upstream is then asked to stream).
    """

    model: str
    chat: bool
    params: SamplingParams
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    deadline: float | None = None
    cache_control: str | None = None
    canonical: dict[str, Any] | None = None
    caller: Caller = field(default_factory=Caller)
    trace: Trace = field(default_factory=Trace)
    wire: dict[str, Any] | None = None  # the JSON body as it came, for a cloud upstream
    response_format: tuple[str, Any, bool] | None = None  # constrained decoding: (kind, schema, strict)
    tools: ToolSet | None = None  # functions the model may (or must) call
    echo: bool = False  # completions: the answer's text begins with the prompt
    n: int = 1  # choices per prompt
    prompts: list[str | list[int]] | None = None  # completions given a list of several prompts (else ``prompt``)

    @property
    def prompt_list(self) -> list[str | list[int] | None]:
        """The completions prompts, one or several (``[None]`` for a chat request)."""
        return list(self.prompts) if self.prompts is not None else [self.prompt]

    @property
    def choice_count(self) -> int:
        """Choices in the answer: ``n`` for each prompt (choice ``i`` answers prompt ``i // n``)."""
        return self.n * len(self.prompt_list)

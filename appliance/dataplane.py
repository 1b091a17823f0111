"""The data plane: the one place that knows the order of the request path's steps.

Every operation (:class:`TensorRequest`, :class:`EmbedRequest`, :class:`GenerateRequest`) goes the same way:

1. **route**: the model the request names, or the one a router alias picks (or the cloud); a router's pick may
   be kept for a routing-quality replay (``appliance.routing_quality``);
2. **resolve**: the serving version, if the caller's key may use it (a model that is not ready fails over to the
   cloud where the caller's policy allows);
3. **cache lookup** under the caller's scope (never for a caller without retention), for deterministic requests;
4. **admit** at the model's gate in the caller's lane (saturated: overflow to the cloud where allowed);
5. **execute** on the local model's scheduler (an engine failure fails over to the cloud where allowed) or on
   the cloud upstream;
6. **account**: the trace, the cost, the token budget, the ledger and the cache store, when the work is done
   (for a generation: when its stream closes).

Handlers parse the wire format before and frame the answer after; they never see models, upstreams or the ledger.
Each step is a span in the request's trace (``trace.spans``; a shared no-op while tracing is off): ``route``
(with resolve), ``cache``, ``admit``, ``execute`` (until the work is done: a generation's stream closes) and
``account``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.accounting import Accounting
from appliance.cache.service import BYPASS, CacheDecision, ResponseCacheService
from appliance.cloud import Cloud
from appliance.errors import BadRequest, EngineFailed, Forbidden, ModelNotFound, ModelNotReady
from appliance.generation_stream import GenerationStream
from appliance.model_version import ModelVersion
from appliance.operations.base import Operation
from appliance.operations.embed import EmbedOperation
from appliance.operations.generate import GenerateOperation
from appliance.operations.tensor import TensorOperation
from appliance.placement import Placement, Ticket
from appliance.repository import ModelManager
from appliance.types import (Caller, EmbedRequest, EmbedResponse, GenerateRequest, Result, Route, TensorRequest,
                             Tally, Trace, Usage)

if TYPE_CHECKING:
    from appliance.routing_quality import RoutingQuality

Answer = TypeVar("Answer")
NAMED = "named in the request"
LOCAL = {"appliance.place": "local"}
CLOUD = {"appliance.place": "cloud"}


class DataPlane:
    """Runs requests through the steps of the request path."""

    def __init__(self, models: ModelManager, cache: ResponseCacheService | None = None,
                 placement: Placement | None = None, cloud: Cloud | None = None,
                 accounting: Accounting | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.models = models
        self.cache = cache
        self.placement = placement
        self.cloud = cloud or Cloud({})
        self.accounting = accounting or Accounting()
        self._clock = clock
        self.quality: RoutingQuality | None = None  # samples the router's small-tier routes for replays
        self._tensor = TensorOperation(self._deadline)
        self._embed = EmbedOperation(self._deadline)
        self._generate = GenerateOperation(self._deadline, clock)

    async def infer(self, request: TensorRequest) -> Result:
        """Run a tensor request on its model version."""
        return await self._serve(self._tensor, request, request.model, request.version)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """Embed texts or token sequences, in input order."""
        principal = request.caller.principal
        if request.token_ids is not None and principal is not None and not principal.token_input:
            raise BadRequest(f"key {principal.key_name!r} may send texts only, not token ids: token arrays are read as "
                             "the model's own ids, so another tokenizer's ids would be embedded as the wrong tokens. "
                             "Send the texts (LangChain: check_embedding_ctx_length=False), or create the key with "
                             "--token-input", param="input")
        return await self._serve(self._embed, request, request.model, None)

    async def generate(self, request: GenerateRequest) -> GenerationStream:
        """Generate text; the caller reads the stream and must close it."""
        return await self._serve(self._generate, request, request.model, None)

    # -- the steps, in their order ---------------------------------------------------------------------------------

    async def _serve(self, operation: Operation[Any, Answer], request: Any, model: str,
                     version: int | None) -> Answer:
        caller, trace = request.caller, request.trace
        spans = trace.spans
        with spans.step("route"):
            route, via_router = self._route(operation, request, model)
            served: ModelVersion | None = None
            if route.place == "local":
                served, route = self._resolve_or_failover(operation, request, route, version, via_router)
            if via_router and served is not None and self.quality is not None:  # allowed and checked for the key
                self.quality.offer(request, route)
        if served is not None:
            with spans.step("cache"):
                decision = await self._lookup(operation, served, request)
            if decision.payload is not None:
                return self._from_cache(operation, served, request, decision)
            with spans.step("admit"):
                admitted = (await self.placement.admit(served, caller, operation.task, operation.places(request))
                            if self.placement else None)
            if isinstance(admitted, Route):
                route = self._routed(trace, admitted)
            else:
                if decision.status != BYPASS or admitted is not None:  # it awaited: a swap may have happened
                    try:
                        served = self._resolve_again(operation, request, served, route.model, version, via_router)
                    except BaseException:
                        if admitted is not None:
                            admitted.release(None)
                        raise
                try:
                    return await self._run_local(operation, served, request, decision, admitted)
                except EngineFailed as exc:
                    route = self._failover(operation, route.model, caller, trace, exc)
        return await self._run_cloud(operation, request, route)

    def _route(self, operation: Operation[Any, Any], request: Any, model: str) -> tuple[Route, bool]:
        """Step 1: the named model, or where a router alias sends the request (if the key may use the alias)."""
        placement = self.placement
        if placement is None or not placement.router.is_router(model):
            route = placement.named(model) if placement is not None else Route("local", model, NAMED, "named")
            return self._routed(request.trace, route), False
        principal = request.caller.principal
        if principal is not None and principal.models and model not in principal.models:
            raise Forbidden(f"key {principal.key_name!r} may not use the router {model!r}; it may call "
                            f"{', '.join(principal.models)}", param="model")
        return self._routed(request.trace, operation.route(placement, model, request)), True

    @staticmethod
    def _routed(trace: Trace, route: Route) -> Route:
        trace.route, trace.route_kind = route.reason, route.kind
        return route

    def _resolve_or_failover(self, operation: Operation[Any, Any], request: Any, route: Route, version: int | None,
                             via_router: bool) -> tuple[ModelVersion | None, Route]:
        """Step 2: the serving version; a model that is not ready goes to the cloud where allowed."""
        try:
            return self._resolve(operation, request, route.model, version, via_router), route
        except ModelNotReady as exc:
            return None, self._failover(operation, route.model, request.caller, request.trace, exc)

    def _failover(self, operation: Operation[Any, Any], model: str, caller: Caller, trace: Trace,
                  exc: ModelNotReady | EngineFailed) -> Route:
        route = self.placement.failover(model, operation.task, caller, exc) if self.placement else None
        if route is None:
            raise exc
        return self._routed(trace, route)

    def resolve(self, caller: Caller, name: str, version: int | None = None, *,
                via_router: bool = False) -> ModelVersion:
        """The serving version of a model, name or alias, if the caller's key may use it.

        The key is checked before anything about the model is told or done: a model outside the key's list is 403
        whether it serves, loads or fails (and never fails over to the cloud). A model a router alias picked is
        allowed when the key allows that alias. The v2 metadata endpoints ask here too.
        """
        principal = caller.principal
        if principal is None or not principal.models or via_router or name in principal.models:
            return self.models.resolve(name, version)
        try:
            served: ModelVersion | None = self.models.resolve(name, version)
        except (ModelNotFound, ModelNotReady):
            served = None
        if served is None or not principal.may_use(served.name, *served.spec.aliases):
            raise Forbidden(f"key {principal.key_name!r} may not call model {name!r}; it may call "
                            f"{', '.join(principal.models)}", param="model")
        return served

    def _resolve(self, operation: Operation[Any, Any], request: Any, name: str, version: int | None,
                 via_router: bool) -> ModelVersion:
        """:meth:`resolve`, then checked for the request; the trace learns the model."""
        served = self.resolve(request.caller, name, version, via_router=via_router)
        trace = request.trace
        trace.model, trace.version, trace.place = served.name, str(served.version), "local"
        operation.check(served, request)
        return served

    def _resolve_again(self, operation: Operation[Any, Any], request: Any, checked: ModelVersion, name: str,
                       version: int | None, via_router: bool) -> ModelVersion:
        """After an await: the version serving now; checked for the request again only if it is another one."""
        if self.resolve(request.caller, name, version, via_router=via_router) is checked:
            return checked
        return self._resolve(operation, request, name, version, via_router)

    async def _lookup(self, operation: Operation[Any, Any], served: ModelVersion, request: Any) -> CacheDecision:
        """Step 3: the response cache, under the caller's scope."""
        principal = request.caller.principal
        key = operation.cache_key(served, request)
        if self.cache is None or principal is None or key is None or not request.caller.retention:
            return CacheDecision(BYPASS)
        canonical, deterministic = key
        decision = await self.cache.lookup(principal.cache_scope, served.name, served.version, served.build_hash,
                                           canonical, request.cache_control, deterministic)
        request.trace.cache = decision.status
        return decision

    def _from_cache(self, operation: Operation[Any, Answer], served: ModelVersion, request: Any,
                    decision: CacheDecision) -> Answer:
        assert decision.payload is not None
        answer, tally = operation.cached(served, request, decision.payload)
        trace = request.trace
        trace.place = "cache"
        trace.usage = Usage()
        with trace.spans.step("account"):
            avoided = self.accounting.local_cost(served.spec, tally)
            self.accounting.settle(request.caller, served.name, "cache", tally, 0.0, cost_avoided=avoided)
            trace.spans.settled(tally.input_tokens, tally.output_tokens, 0.0, avoided)
        return answer

    async def _run_local(self, operation: Operation[Any, Answer], served: ModelVersion, request: Any,
                         decision: CacheDecision, ticket: Ticket | None) -> Answer:
        """Step 5 (local) and, through ``done``, step 6."""
        settled = False
        spans = request.trace.spans
        execute = spans.step("execute", LOCAL)

        def done(tally: Tally, payload: Callable[[], bytes] | None) -> None:
            nonlocal settled
            settled = True
            execute.end()
            with spans.step("account"):
                if ticket is not None:
                    ticket.release(tally.service_s)
                request.trace.usage = Usage(tally.queue_s, tally.compute_s, tally.batch_size)
                cost = self.accounting.local_cost(served.spec, tally)
                self.accounting.settle(request.caller, served.name, "local", tally, cost)
                spans.settled(tally.input_tokens, tally.output_tokens, cost)
                if payload is not None and decision.store and self.cache is not None:
                    self.cache.remember(decision, served.name, served.version, served.build_hash, payload())

        try:
            return await operation.run(served, request, done)
        except BaseException as exc:
            execute.end(exc)  # already ended (and so kept as it was) when the work was done before the error
            raise
        finally:
            if not settled and ticket is not None:
                ticket.release(None)

    async def _run_cloud(self, operation: Operation[Any, Answer], request: Any, route: Route) -> Answer:
        """Step 5 (cloud) and, through ``done``, step 6."""
        trace = request.trace
        model = self.cloud.model_label(route)
        trace.model, trace.version, trace.place, trace.cache = model, "", "cloud", ""
        spans = trace.spans
        execute = spans.step("execute", CLOUD)

        def done(tally: Tally) -> None:
            execute.end()
            with spans.step("account"):
                self.accounting.settle(request.caller, model, "cloud", tally, tally.cost)
                spans.settled(tally.input_tokens, tally.output_tokens, tally.cost)

        try:
            return await operation.cloud(self.cloud, route, request, done)
        except BaseException as exc:
            execute.end(exc)
            raise

    def _deadline(self, deadline: float | None, served: ModelVersion) -> float | None:
        if deadline is None and served.default_timeout_s is not None:
            return self._clock() + served.default_timeout_s
        return deadline

"""The last step of every request: what it cost, charged to the caller's token budget and written to the ledger."""

from __future__ import annotations

from appliance.auth import RateLimiter
from appliance.ledger import CostLedger, UsageRecord
from appliance.model_spec import ModelSpec
from appliance.types import Caller, Tally


class Accounting:
    """Costs, token budgets and the cost ledger (``ledger`` is ``None`` when ``[ledger] enabled = false``)."""

    def __init__(self, ledger: CostLedger | None = None, limiter: RateLimiter | None = None,
                 device_rate_per_hour: float = 0.0) -> None:
        self.ledger = ledger
        self.limiter = limiter
        self.device_rate_per_hour = device_rate_per_hour

    def local_cost(self, spec: ModelSpec, tally: Tally) -> float:
        """A local request's cost: the model's ``[cost]`` rates, else compute time at the device's hourly rate."""
        rates = spec.cost
        cost = rates.per_request + rates.per_compute_second * tally.compute_s
        cost += (rates.per_million_input_tokens * tally.input_tokens
                 + rates.per_million_output_tokens * tally.output_tokens) / 1e6
        if not (rates.per_compute_second or rates.per_million_input_tokens or rates.per_million_output_tokens):
            cost += tally.compute_s * self.device_rate_per_hour / 3600.0
        return cost

    def settle(self, caller: Caller, model: str, place: str, tally: Tally, cost: float,
               cost_avoided: float = 0.0) -> None:
        """Charge the tokens (not for cache hits) and write the ledger row of an answered request."""
        principal = caller.principal
        if principal is None:
            return
        tokens = tally.input_tokens + tally.output_tokens
        if tokens and place != "cache" and principal.tokens_per_minute and self.limiter is not None:
            self.limiter.charge_tokens(principal, tokens)
        if self.ledger is not None:
            self.ledger.record(UsageRecord(
                tenant=principal.tenant, key_id=principal.key_id, model=model, place=place, workflow=caller.workflow,
                input_tokens=tally.input_tokens, output_tokens=tally.output_tokens, compute_s=tally.compute_s,
                cost=cost, cost_avoided=cost_avoided))

"""Complexity routing: ``model: "auto"`` goes to the small tier, the mid tier or a cloud upstream.

The score is computed on the device from the request alone (no outside service): prompt tokens, conversation
turns, the output length asked for, and cues for code, maths and multi-step reasoning. Each feature is scaled to
0..1 and weighted by ``[routing]``; thresholds there pick the tier.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from appliance.config import RoutingConfig
from appliance.errors import BadRequest, ModelNotReady
from appliance.model_version import ModelVersion
from appliance.repository import ModelManager
from appliance.types import Route

CODE = re.compile(r"```|\bdef \w+\(|\bclass \w+[:(]|\bfunction\b|#include|\bimport \w+|=>|\breturn\b|"
                  r"\b(?:python|javascript|typescript|rust|golang|java|c\+\+|sql|regex|compile[rs]?|stack trace|"
                  r"refactor|debug|code|bug)\b|[{};]\s*$", re.IGNORECASE | re.MULTILINE)
MATH = re.compile(r"\d{1,12}[ \t]{0,3}[-+*/^=<>][ \t]{0,3}\d|\\frac|\bsqrt\b|\b(?:integral|integrate|derivative|differentiate|"
                  r"equation|prove|proof|theorem|lemma|solve|probability|matrix|eigen\w*|polynomial|algebra|"
                  r"calculus|factorial|modulo|logarithm)\b", re.IGNORECASE)
REASONING = re.compile(r"\bstep[- ]by[- ]step\b|\bexplain (?:why|how)\b|\bcompare\b|\btrade-?offs?\b|\banaly[sz]e\b|"
                       r"\bpros and cons\b|\bjustify\b|\bplan\b|\bdesign\b|\bevaluate\b|\bthen\b|"
                       r"\bwhy\b|\bimplications?\b|\bstrateg\w*\b", re.IGNORECASE)
CUE_WINDOW = 4096  # cues are read from the first and last this many characters: bounded work per request


@dataclass(frozen=True)
class Features:
    """What the score is made of."""

    prompt_tokens: int
    turns: int
    output_tokens: int
    code: int
    math: int
    reasoning: int


def extract(text: str, turns: int, output_tokens: int, count_tokens: Callable[[str], int]) -> Features:
    """The features of a request's prompt text."""
    cues = text if len(text) <= 2 * CUE_WINDOW else text[:CUE_WINDOW] + "\n" + text[-CUE_WINDOW:]
    return Features(prompt_tokens=count_tokens(text), turns=turns, output_tokens=output_tokens,
                    code=len(CODE.findall(cues)), math=len(MATH.findall(cues)),
                    reasoning=len(REASONING.findall(cues)))


def score(features: Features, config: RoutingConfig) -> tuple[float, list[str]]:
    """The complexity score (0..1) and the features that contributed, in words."""
    parts = [
        ("prompt tokens", features.prompt_tokens, config.weight_prompt_tokens,
         min(1.0, features.prompt_tokens / config.prompt_tokens_scale)),
        ("turns", features.turns, config.weight_turns, min(1.0, max(0, features.turns - 1) / config.turns_scale)),
        ("output tokens", features.output_tokens, config.weight_output_tokens,
         min(1.0, features.output_tokens / config.output_tokens_scale)),
        ("code cues", features.code, config.weight_code, min(1.0, features.code / 2)),
        ("maths cues", features.math, config.weight_math, min(1.0, features.math / 2)),
        ("reasoning cues", features.reasoning, config.weight_reasoning, min(1.0, features.reasoning / 2)),
    ]
    total = min(1.0, sum(weight * value for _, _, weight, value in parts))
    notes = [f"{count} {name}" for name, count, weight, value in parts if weight * value >= 0.01]
    return total, notes


class Router:
    """Picks a local tier or the cloud for router aliases; names of real models pass through untouched."""

    def __init__(self, config: RoutingConfig, models: ModelManager) -> None:
        self.config = config
        self._models = models

    def is_router(self, name: str) -> bool:
        """Whether ``name`` asks for routing rather than naming a model."""
        return name in self.config.aliases

    def tier(self, task: str, tier: str) -> ModelVersion | None:
        """The serving model of a task and tier (``None`` if there is none)."""
        for model in self._models.serving():
            if model.spec.task == task and model.spec.tier == tier and model.ready:
                return model
        return None

    def route_generation(self, name: str, text: str, turns: int, max_tokens: int | None,
                         cloud_allowed: Callable[[], str | None]) -> Route:
        """Route a chat or completion request; ``cloud_allowed`` returns the usable upstream's name or None."""
        small, mid = self.tier("generate", "small"), self.tier("generate", "mid")
        if small is None and mid is None:
            raise ModelNotReady(f"{name!r} routes between the small and mid generation tiers, and neither is "
                                "serving; GET /v1/models lists the models")
        counter = (small or mid).text  # type: ignore[union-attr]
        count = (lambda t: len(counter.encode([t], add_special_tokens=False)[0])) if counter else (
            lambda t: len(t) // 4)
        value, notes = score(extract(text, turns, max_tokens or 0, count), self.config)
        why = f"score {value:.2f} ({', '.join(notes) or 'a short plain prompt'})"
        if value <= self.config.small_max_score and small is not None:
            return Route("local", small.name, f"{why} <= {self.config.small_max_score}: small tier", "complexity",
                         score=value)
        if value > self.config.mid_max_score and self.config.cloud_upstream:
            upstream = cloud_allowed()
            if upstream is not None:
                return Route("cloud", name, f"{why} > {self.config.mid_max_score}: cloud upstream {upstream}",
                             "complexity", upstream=upstream, score=value)
            target = mid or small
            assert target is not None
            return Route("local", target.name, f"{why} > {self.config.mid_max_score}, but the cloud is not allowed "
                         f"or not healthy: {target.spec.tier} tier", "complexity", score=value)
        target = mid or small
        assert target is not None
        return Route("local", target.name, f"{why}: {target.spec.tier} tier", "complexity", score=value)

    def route_embedding(self, name: str) -> Route:
        """``auto`` for embeddings: the small-tier embedding model, else the only one."""
        model = self.tier("embed", "small") or self.tier("embed", "mid")
        if model is None:
            models = [m for m in self._models.serving() if m.spec.task == "embed"]
            if len(models) != 1:
                raise BadRequest(f"{name!r} cannot pick an embedding model: name one (GET /v1/models)",
                                 param="model")
            model = models[0]
        return Route("local", model.name, f"embedding model {model.name}", "complexity")

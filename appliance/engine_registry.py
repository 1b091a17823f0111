"""Runtimes by ``model.toml``'s ``[engine] kind``: a registry of engine factories and one of decoder factories.

A new runtime is one module with a factory function, registered under its kind (see ``appliance.engine_factory``
for the defaults). A registry is itself a factory: it calls the one registered for the spec's kind, so model
classes take "a factory" and tests pass a plain function or a registry with a variant in it alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from appliance.config import Config, ConfigError
from appliance.engines.base import Decoder, Engine
from appliance.model_spec import ModelSpec

if TYPE_CHECKING:
    from appliance.engines.generation import GenerationLimits

EngineFactory = Callable[[ModelSpec, Config], Engine]
"""Makes an (unloaded) engine for a model version."""

DecoderFactory = Callable[[ModelSpec, Config, Mapping[str, Any], "GenerationLimits"], Decoder]
"""Makes a loaded decoder for a model version from its ``generation.json`` and the scheduler's limits."""

Factory = TypeVar("Factory", bound=Callable[..., Any])


class Registry(Generic[Factory]):
    """Factories by engine kind."""

    def __init__(self, what: str, factories: Mapping[str, Factory] | None = None) -> None:
        """``what`` names what the factories make, for error messages (``"engine"``, ``"decoder"``)."""
        self._what = what
        self._factories: dict[str, Factory] = dict(factories or {})

    @property
    def kinds(self) -> list[str]:
        """The registered kinds, sorted."""
        return sorted(self._factories)

    def register(self, kind: str, factory: Factory) -> None:
        """Make ``kind`` use ``factory`` (replacing any factory registered for it before)."""
        self._factories[kind] = factory

    def factory_for(self, spec: ModelSpec) -> Factory:
        """The factory for ``spec.engine.kind``; a :class:`ConfigError` naming the known kinds if there is none."""
        kind = spec.engine.kind
        factory = self._factories.get(kind)
        if factory is None:
            known = ", ".join(repr(k) for k in self.kinds) or "none"
            raise ConfigError(f"{spec.path / 'model.toml'}: [engine] kind = {kind!r} has no {self._what}; "
                              f"the {self._what} kinds are {known}")
        return factory


class EngineRegistry(Registry[EngineFactory]):
    """Engine factories by kind; calling the registry makes the engine the spec's kind names."""

    def __init__(self, factories: Mapping[str, EngineFactory] | None = None) -> None:
        super().__init__("engine", factories)

    def __call__(self, spec: ModelSpec, config: Config) -> Engine:
        """An engine of ``spec.engine.kind`` for ``spec``."""
        return self.factory_for(spec)(spec, config)


class DecoderRegistry(Registry[DecoderFactory]):
    """Decoder factories by kind; calling the registry makes the decoder the spec's kind names."""

    def __init__(self, factories: Mapping[str, DecoderFactory] | None = None) -> None:
        super().__init__("decoder", factories)

    def __call__(self, spec: ModelSpec, config: Config, generation: Mapping[str, Any],
                 limits: GenerationLimits) -> Decoder:
        """A decoder of ``spec.engine.kind`` for ``spec``."""
        return self.factory_for(spec)(spec, config, generation, limits)


@dataclass(frozen=True)
class Runtimes:
    """The factories model versions make their runtimes with: engines for tensor models, decoders for generation."""

    engines: EngineFactory
    decoders: DecoderFactory

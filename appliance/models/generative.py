"""Generative models: a decoder with a KV cache, a tokenizer and a chat template, under continuous batching."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from appliance.engines.runtime_choice import DECODER_CHOICE, RuntimeChoice
from appliance.config import Config
from appliance.cpu import cpu_description
from appliance.invariance_claim import measured_on_another_cpu
from appliance.engine_registry import Runtimes
from appliance.engines.base import Decoder
from appliance.engines.constraints import GrammarCompiler
from appliance.engines.generation import GenerationLimits, GenerationScheduler, check_decoder_fits
from appliance.engines.tokenizer import TextEncoder
from appliance.model_spec import ModelSpec
from appliance.models.base import ModelVersion
from appliance.telemetry import VersionMetrics

log = logging.getLogger("appliance.models.generative")


class GenerativeModel(ModelVersion):
    """A decoder made by the decoder factory, driven by :class:`GenerationScheduler`. It serves no tensors."""

    def __init__(self, spec: ModelSpec, config: Config, metrics: VersionMetrics, runtimes: Runtimes) -> None:
        super().__init__(spec, config, metrics, runtimes)
        self._decoder_factory = runtimes.decoders
        self.decoder: Decoder | None = None
        self.generation: dict[str, Any] = {}  # generation.json
        self.generation_limits: GenerationLimits | None = None
        self.text: TextEncoder | None = None
        self.chat_template: Any = None
        self.generator: GenerationScheduler | None = None  # once started
        self.grammar: GrammarCompiler | None = None  # structured output, once loaded
        self.template_takes_tools = False  # whether the chat template renders tool definitions itself

    @property
    def context_limit(self) -> int:
        """Tokens a sequence may hold: prompt plus output."""
        return self.generation_limits.capacity if self.generation_limits else 0

    @property
    def runtime(self) -> RuntimeChoice:
        """Where the decoder runs (what its factory chose)."""
        return getattr(self.decoder, "choice", DECODER_CHOICE)

    @property
    def kv_cache(self) -> dict[str, Any]:
        """The KV cache's size as the decoder reports it: bytes at most and now, and its element type (empty for a
        decoder that does not say)."""
        decoder = self.decoder
        if decoder is None or not hasattr(decoder, "kv_cache_bytes"):
            return {}
        return {"bytes": decoder.kv_cache_bytes(), "bytes_now": decoder.kv_cache_bytes(decoder.capacity),
                "dtype": str(getattr(decoder, "kv_dtype", ""))}

    @property
    def description(self) -> str:
        """The decoder and the prefill chunk."""
        if self.decoder is None or self.generation_limits is None:
            return "no decoder"
        return f"{self.decoder.description}, prefill chunk {self.generation_limits.prefill_chunk}"

    def reproducible(self, asked: bool) -> bool:
        """Asked for (or ``[generation] reproducible`` runs every sequence so), unless not needed."""
        # A model proved batch-invariant gives every request its lone answer already: the mode would only cost.
        return (asked or self.spec.generation.reproducible) and not self.spec.deterministic

    def _load(self) -> None:
        spec = self.spec
        elsewhere = measured_on_another_cpu(spec.path) if spec.deterministic else None
        if elsewhere is not None:
            log.warning("model %s version %s: deterministic was measured on %s, not on this CPU (%s); served as "
                        "not deterministic until rebuilt here (appliance build)", spec.name, spec.version,
                        elsewhere, " ".join(cpu_description()["vector_extensions"]))
            self.spec = spec = replace(spec, deterministic=False)
        self.generation = json.loads((spec.path / spec.generation.config).read_text())
        from appliance.build.gguf_tokenizer import compile_chat_template, template_takes_tools

        template = (spec.path / spec.generation.chat_template).read_text()
        self.chat_template = compile_chat_template(template)
        self.template_takes_tools = template_takes_tools(template)
        self.text = TextEncoder.from_file(spec.path / spec.tokenizer.file, spec.tokenizer.max_seq_length)
        self.grammar = GrammarCompiler((spec.path / spec.tokenizer.file).read_text(),
                                       [int(t) for t in self.generation.get("eos_token_ids", [])],
                                       int(self.generation.get("vocab_size", self.text.vocab_size)))
        self.generation_limits = GenerationLimits(
            slots=spec.generation.max_running,
            capacity=min(spec.generation.kv_capacity, int(self.generation["max_seq_len"])),
            prefill_chunk=spec.generation.prefill_chunk,
            max_waiting=spec.generation.max_waiting,
            prompt_cache=spec.generation.prompt_cache,
        )
        self.decoder = self._decoder_factory(spec, self._config, self.generation, self.generation_limits)
        check_decoder_fits(self.decoder, self.generation_limits, f"{self.name}/{self.version}")  # here, not at swap

    def _warmup(self) -> None:
        """A short prefill and one decode step on row 0 (its cache is rewritten by the first request)."""
        assert self.decoder is not None
        logits = self.decoder.run(0, np.ones((1, 8), np.int64), np.array([7], np.int32))
        self.decoder.run(0, np.array([[int(logits[0].argmax())]], np.int64), np.array([8], np.int32))

    def _create_scheduler(self) -> GenerationScheduler:
        assert self.decoder is not None and self.generation_limits is not None
        eos = [int(t) for t in self.generation.get("eos_token_ids", [])]
        self.generator = GenerationScheduler(self.decoder, self.generation_limits, eos,
                                             on_step=self.metrics.observe_generation,
                                             name=f"{self.name}/{self.version}")
        return self.generator

    def close(self) -> None:
        """Release the decoder."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None

"""Embedding models: an encoder with a tokenizer, its sequences batched under a padded-token budget."""

from __future__ import annotations

from appliance.config import ConfigError
from appliance.engine_factory import sequence_buckets
from appliance.engines.buckets import Buckets
from appliance.engines.token_batcher import TokenBudgetBatcher
from appliance.engines.tokenizer import TextEncoder
from appliance.model_spec import BatchingSection
from appliance.models.engine_model import EngineModel
from appliance.types import MAX_EMBED_INPUTS


class EmbeddingModel(EngineModel):
    """An encoder taking ``input_ids`` and ``attention_mask`` and returning one embedding per row; requests go
    through :class:`TokenBudgetBatcher`."""

    text: TextEncoder  # once loaded
    embedder: TokenBudgetBatcher | None = None  # once started

    def reproducible(self, asked: bool) -> bool:
        """Asked for (or ``[batching] reproducible`` runs every input so), unless not needed."""
        # A model proved batch-invariant gives every request its lone answer already: the mode would only cost.
        return (asked or self.spec.batching.reproducible) and not self.spec.deterministic

    def _load(self) -> None:
        super()._load()
        self.text = TextEncoder.from_file(self.spec.path / self.spec.tokenizer.file, self.spec.tokenizer.max_seq_length)
        names = sorted(t.name for t in self.inputs)
        if names != ["attention_mask", "input_ids"] or len(self.outputs) != 1:
            raise ConfigError(
                f"embedding model {self.name}: inputs must be input_ids and attention_mask and there must be one "
                f"output; found inputs {names} and outputs {[t.name for t in self.outputs]}"
            )

    def _sequence_buckets(self) -> Buckets:
        """Sequence buckets where the engine runs on bound buffers (``[engine] sequence_buckets``, or on a GPU
        powers of two up to ``max_seq_length``), else none."""
        bound = any(getattr(engine, "bound", None) is not None for engine in self.engines)
        return sequence_buckets(self.spec, self.runtime.on_gpu) if bound else Buckets(())

    def _create_scheduler(self) -> TokenBudgetBatcher:
        batching = self.spec.batching
        self.embedder = TokenBudgetBatcher(
            self.engines,
            output=self.outputs[0].name,
            max_batch_tokens=token_budget(batching, self.runtime.on_gpu),
            max_batch_size=max(batching.max_batch_size, 1),
            max_wait_s=batching.max_queue_delay_microseconds / 1e6,
            # Two of the largest requests the API takes fit, so that one never meets a queue it cannot enter.
            max_queue_items=batching.max_queue_size or max(self._config.batching.max_queue_size,
                                                           2 * MAX_EMBED_INPUTS),
            pad_id=self.text.pad_id,
            sequence_buckets=self._sequence_buckets(),
            on_batch=lambda items, padded, compute_s: self.metrics.observe_batch(items, compute_s),
            name=f"{self.name}/{self.version}",
        )
        return self.embedder


def token_budget(batching: BatchingSection, on_gpu: bool) -> int:
    """Padded tokens a batch may hold: ``gpu_max_batch_tokens`` where the engine runs on a GPU and it is set (a
    budget measured on a CPU would starve a GPU), else ``max_batch_tokens``."""
    if on_gpu and batching.gpu_max_batch_tokens:
        return batching.gpu_max_batch_tokens
    return batching.max_batch_tokens

"""Tensor models: named arrays in, named arrays out, through the dynamic batcher."""

from __future__ import annotations

from appliance.engines.batcher import DynamicBatcher
from appliance.models.engine_model import EngineModel


class TensorModel(EngineModel):
    """A model served over the KServe v2 tensor API; requests are batched by :class:`DynamicBatcher`."""

    batcher: DynamicBatcher | None = None  # once started

    def _create_scheduler(self) -> DynamicBatcher:
        batching = self.spec.batching
        self.batcher = DynamicBatcher(
            self.engines,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=batching.preferred_batch_size,
            max_queue_size=batching.max_queue_size or self._config.batching.max_queue_size,
            on_batch=self.metrics.observe_batch,
            name=f"{self.name}/{self.version}",
        )
        return self.batcher

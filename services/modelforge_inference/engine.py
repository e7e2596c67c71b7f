"""InferenceEngine: resolves refs, holds ONNX Runtime sessions in an LRU, batches, caches and runs predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from modelforge_inference.domain import (
    CacheMode,
    LoadedModel,
    ModelRef,
    ModelStatistics,
    Prediction,
    ResolvedModel,
    ServingConfig,
)


class InferenceEngine:
    """The transport-free core that both the InferenceService and the V2 (OIP) servicers call."""

    async def start(self) -> None:
        """Starts the compute pool and background work. Call once before anything else."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Drains queues, unloads every session and stops the compute pool."""
        raise NotImplementedError

    async def predict(
        self,
        ref: ModelRef,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        cache_mode: CacheMode = CacheMode.USE,
        time_remaining: float | None = None,
    ) -> Prediction:
        """Runs the version `ref` resolves to on `inputs` and returns the requested outputs (all when None).

        priority: 1 is the most urgent; 0 means the least urgent level. timeout: seconds the request may wait in
        the queue (can only lower the model's default). time_remaining: seconds left of the caller's deadline
        (grpc `context.time_remaining()`), applied to resolution, loading and queueing.
        Raises InvalidArgument kinds for bad inputs, NotFound for unknown refs, ResourceExhausted when the queue
        is full, DeadlineExceeded when the deadline passes in the queue.
        """
        raise NotImplementedError

    async def load(self, ref: ModelRef, *, time_remaining: float | None = None) -> LoadedModel:
        """Loads the version `ref` resolves to (with a warmup run) and returns it READY."""
        raise NotImplementedError

    async def unload(self, ref: ModelRef) -> list[LoadedModel]:
        """Unloads the version `ref` names (every loaded version of the model when ref has no selector), after
        the requests in flight on it finish. Raises ModelNotLoaded when nothing matches."""
        raise NotImplementedError

    def loaded(self) -> list[LoadedModel]:
        """Snapshots of every version held, ordered by name and version."""
        raise NotImplementedError

    async def statistics(self, ref: ModelRef | None = None) -> list[ModelStatistics]:
        """Counters per version: all versions, every version of ref.name (no selector), or the one ref names."""
        raise NotImplementedError

    async def describe(self, ref: ModelRef) -> tuple[ResolvedModel, ServingConfig]:
        """The version `ref` resolves to and how it is served (batching, cache, session), without loading it."""
        raise NotImplementedError

    def is_ready(self, ref: ModelRef) -> bool:
        """True when the version that ref names by number is loaded and READY (no registry call)."""
        raise NotImplementedError

    @property
    def cache_degraded(self) -> bool | None:
        """None without a prediction cache; True while Redis does not answer."""
        raise NotImplementedError

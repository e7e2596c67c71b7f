"""Requests that wait for a version's load are in flight: an eviction that comes before they run (another load
finishing at that moment, as happens when more versions are in use than the table holds) waits for them as it
waits for any request in flight. The engine with real ONNX Runtime sessions of real files; in place of the
registry's gRPC API, the resolver's interface over one fixed version."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelforge._refs import ModelRef
from modelforge_inference.domain import ModelState, ResolvedModel, Signature, TensorSpec
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.metrics import UnloadReason
from modelforge_inference.settings import InferenceSettings
from tests.fixtures.onnx_models import build_slow_load, write_model

SIZE = 512  # build_slow_load's fixed [512, 512]


class Registry:
    """Resolves every ref to the one version the test serves."""

    def __init__(self, model: ResolvedModel) -> None:
        self.model = model

    async def resolve(self, ref: ModelRef, *, timeout: float | None = None) -> ResolvedModel:
        await asyncio.sleep(0)
        return self.model

    def add_listener(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return lambda: None


class Files:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.asynccontextmanager
    async def pinned(self, model: ResolvedModel) -> AsyncIterator[Path]:
        yield self.path


async def test_requests_waiting_for_a_load_are_in_flight_and_served_by_a_version_evicted_before_they_ran(
    tmp_path: Path,
) -> None:
    x = TensorSpec("x", np.dtype(np.float32), (SIZE, SIZE))
    model = ResolvedModel("m", 1, "slow", 100, Signature(inputs=(x,), outputs=(TensorSpec("y", x.dtype, x.shape),)))
    files = Files(write_model(build_slow_load(), tmp_path / "slow.onnx"))
    engine = InferenceEngine(InferenceSettings(intra_op_threads=1), resolver=Registry(model), files=files)
    await engine.start()
    try:
        inputs = {"x": np.ones((SIZE, SIZE), np.float32)}
        waiting = [asyncio.ensure_future(engine.predict(ModelRef("m", version=1), inputs)) for _ in range(3)]
        async with asyncio.timeout(30):
            while not engine.loaded():
                await asyncio.sleep(0.001)
        (loading,) = engine.loaded()
        assert (loading.state, loading.in_flight) == (ModelState.LOADING, 3)

        # Evicted as its load ends, before the waiting requests run: what another load's _enforce_budget does when
        # that load ends at the same moment.
        slot = engine._slots[model.key]
        assert slot.loading is not None
        slot.loading.add_done_callback(lambda _: engine._begin_unload(slot, UnloadReason.EVICTED))

        predictions = await asyncio.gather(*waiting)
        assert all(p.outputs["y"].shape == (SIZE, SIZE) for p in predictions)
        async with asyncio.timeout(30):  # the eviction went through once they were served
            while engine.loaded():
                await asyncio.sleep(0.001)
    finally:
        await engine.aclose()

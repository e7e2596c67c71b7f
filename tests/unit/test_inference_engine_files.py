"""Which file a loaded version serves, when the registry's answer for a version number changes under the engine
(a model deleted and created again): the engine with real ONNX Runtime sessions of real files, and, in place of
the registry's gRPC API, a table of what the registry holds now (the resolver's interface)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelforge._refs import ModelRef
from modelforge_inference.domain import ResolvedModel, Signature, TensorSpec
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.errors import ModelUnloading
from modelforge_inference.registry_client import RegistryUnavailable
from modelforge_inference.settings import InferenceSettings
from tests.fixtures.onnx_models import build_identity, build_slow_load, write_model


class Registry:
    """What the registry holds now for m:1, as the resolver answers; `reachable` False answers UNAVAILABLE."""

    def __init__(self, current: ResolvedModel) -> None:
        self.current = current
        self.reachable = True

    async def resolve(self, ref: ModelRef, *, timeout: float | None = None) -> ResolvedModel:
        await asyncio.sleep(0)
        if not self.reachable:
            raise RegistryUnavailable("resolve", "unreachable in this test")
        return self.current

    def add_listener(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return lambda: None


class Files:
    """The local file cache: sha256 to a file on disk."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    @contextlib.asynccontextmanager
    async def pinned(self, model: ResolvedModel) -> AsyncIterator[Path]:
        yield self.paths[model.sha256]


def version(sha256: str) -> ResolvedModel:
    """m:1 as the registry describes the file `sha256` ("old": an identity of [batch, 4]; "new": [512, 512])."""
    shape = (-1, 4) if sha256 == "old" else (512, 512)
    x = TensorSpec("x", np.dtype(np.float32), shape)
    return ResolvedModel("m", 1, sha256, 100, Signature(inputs=(x,), outputs=(dataclasses.replace(x, name="y"),)))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    # "new": loading it takes most of a second (its warmup), the window in which an older request arrives.
    return Files(
        {
            "old": write_model(build_identity(), tmp_path / "old.onnx"),
            "new": write_model(build_slow_load(), tmp_path / "new.onnx"),
        }
    )


@pytest.mark.parametrize("reachable", [True, False])
async def test_a_request_resolved_before_the_version_was_replaced_leaves_the_new_files_load_alone(
    files: Files, reachable: bool
) -> None:
    registry = Registry(version("new"))  # m was deleted and created again: version 1 is another file now
    engine = InferenceEngine(InferenceSettings(intra_op_threads=1), resolver=registry, files=files)
    await engine.start()
    try:

        async def acquire(model: ResolvedModel) -> str:
            slot = await engine._acquire(model, engine._config(model), None)
            engine._release(slot)
            return slot.model.sha256

        fresh = asyncio.ensure_future(acquire(version("new")))
        async with asyncio.timeout(10):
            while not engine.loaded():  # the new file is loading
                await asyncio.sleep(0.001)
        registry.reachable = reachable
        with pytest.raises(ModelUnloading):  # resolved before the events: refused, and retried by its caller
            await acquire(version("old"))
        assert await fresh == "new"  # the load it met went on
        assert [(m.sha256, m.state.name) for m in engine.loaded()] == [("new", "READY")]
    finally:
        await engine.aclose()

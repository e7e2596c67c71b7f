"""Loaded versions follow the registry: archived or deleted versions are unloaded on their events, and on the
events the service missed while its watch on the registry was down, once the watch is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.registry.v1 import registry_pb2
from modelforge_registry.settings import RegistrySettings
from tests.fixtures.onnx_models import ModelFile, build_identity, model_bytes
from tests.fixtures.polling import eventually
from tests.fixtures.servers import RunningRegistry, registry_settings_for, running_registry
from tests.integration.inference.conftest import (
    RunningInference,
    error_reason,
    inference_settings_for,
    outputs,
    predict_request,
    ref,
    running_inference,
    upload,
)
from tests.integration.inference.test_resolver import Registry

READY = pb.LOADED_MODEL_STATE_READY


async def loaded(running: RunningInference) -> list[tuple[str, int]]:
    response = await running.stub.ListLoadedModels(pb.ListLoadedModelsRequest())
    return [(m.model, m.version) for m in response.loaded_models if m.state == READY]


async def wait_loaded(running: RunningInference, expected: list[tuple[str, int]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while (current := await loaded(running)) != expected:
            await asyncio.sleep(0.01)
    assert current == expected


async def load_three(running: RunningInference, add_one: ModelFile) -> None:
    """Versions 1 and 2 of "retired" and version 1 of "kept", all loaded."""
    await upload(running, "retired", add_one)
    await upload(running, "retired", add_one)
    await upload(running, "kept", add_one)
    for target in (ref("retired", version=1), ref("retired", version=2), ref("kept", version=1)):
        await running.stub.LoadModel(pb.LoadModelRequest(ref=target))
    await wait_loaded(running, [("kept", 1), ("retired", 1), ("retired", 2)])


async def test_archived_and_deleted_versions_are_unloaded_on_their_events(
    inference: RunningInference, add_one: ModelFile
):
    await load_three(inference, add_one)
    registry = inference.registry_stub

    await registry.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(model="retired", version=1))
    await registry.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(model="retired", version=2))

    await wait_loaded(inference, [("kept", 1)])
    # An archived version still answers when asked for by number; it is loaded again for that.
    response = await inference.stub.Predict(predict_request(ref("retired", version=1), add_one.sample(batch=1)))
    assert response.version == 1


async def test_a_deleted_version_keeps_its_statistics_by_number(inference: RunningInference, add_one: ModelFile):
    await upload(inference, "gone", add_one)
    await inference.stub.Predict(predict_request(ref("gone", version=1), add_one.sample(batch=1)))
    await inference.registry_stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(model="gone", version=1))
    await wait_loaded(inference, [])

    # Counted here, so answered here, though the registry no longer knows the version.
    response = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref("gone", version=1)))
    assert [(s.model, s.version, s.request_count) for s in response.model_statistics] == [("gone", 1, 1)]


async def test_a_model_created_again_under_a_deleted_name_starts_its_statistics_from_zero(
    inference: RunningInference, add_one: ModelFile
):
    cached = {"modelforge.io/cache": "true"}
    await upload(inference, "again", add_one, labels=cached)
    request = predict_request(ref("again", version=1), add_one.sample(batch=1))
    for _ in range(3):  # a miss, then two hits
        await inference.stub.Predict(request)
    await inference.registry_stub.DeleteModel(registry_pb2.DeleteModelRequest(name="again", force=True))
    await wait_loaded(inference, [])

    async def statistics(target: registry_pb2.ModelRef) -> list[tuple[int, int, int, int, int]]:
        response = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=target))
        return [
            (s.version, s.request_count, s.execution_count, s.cache_hit_count, s.cache_miss_count)
            for s in response.model_statistics
        ]

    async def retired() -> bool:  # once the unload is done, the counters of the deleted version are put aside
        return await statistics(ref("again", version=1)) == [(1, 3, 1, 2, 1)]

    await eventually(retired, "the deleted version's statistics")
    await upload(inference, "again", add_one, labels=cached)  # version 1 again, the same file even

    assert await statistics(ref("again", version=1)) == [(1, 0, 0, 0, 0)]
    assert await statistics(ref("again")) == []
    await inference.stub.Predict(request)  # a hit: the cache keys entries by the file, which is the same
    assert await statistics(ref("again", version=1)) == [(1, 1, 0, 1, 0)]
    assert await statistics(ref("again")) == [(1, 1, 0, 1, 0)]


async def test_statistics_by_name_are_empty_for_a_model_never_run_and_not_found_for_one_the_registry_lacks(
    inference: RunningInference, add_one: ModelFile
):
    await upload(inference, "idle", add_one)
    response = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref("idle")))
    assert list(response.model_statistics) == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref("ghost")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MODEL_NOT_FOUND"
    assert "ghost" in (caught.value.details() or "")


@pytest.fixture
def shared_settings(clean_db: str, tmp_path: Path) -> RegistrySettings:
    return registry_settings_for(clean_db, tmp_path / "registry", grace_seconds=0.5)


@pytest.fixture
async def watched(shared_settings: RegistrySettings) -> AsyncIterator[Registry]:
    """The registry replica inference talks to; the test stops and restarts it."""
    replica = Registry(shared_settings)
    await replica.start()
    try:
        yield replica
    finally:
        await replica.stop()


@pytest.fixture
async def other(shared_settings: RegistrySettings) -> AsyncIterator[RunningRegistry]:
    """A second replica on the same database and blob store, for the changes made while the first is down."""
    async with running_registry(shared_settings) as replica:
        yield replica


async def test_a_model_created_again_while_the_watch_was_down_is_served_from_its_new_file_once_it_is_back(
    watched: Registry, other: RunningRegistry, redis_url: str, tmp_path: Path, add_one: ModelFile
):
    settings = inference_settings_for(watched.address, tmp_path / "inference", redis_url)
    x = add_one.sample()
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(running_inference(settings, other))
        await upload(other, "m", add_one)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("m", version=1)))

        await watched.stop()
        await other.stub.DeleteModel(registry_pb2.DeleteModelRequest(name="m", force=True))
        identity = await upload(other, "m", model_bytes(build_identity()))  # version 1 again, another file
        await watched.start()

        async with asyncio.timeout(30):  # the old file's session is let go; version 1 is served from the new one
            while True:
                response = await running.stub.Predict(predict_request(ref("m", version=1), x))
                if response.sha256 == identity.sha256:
                    break
                await asyncio.sleep(0.02)
        assert response.version == 1
        np.testing.assert_array_equal(outputs(response)["y"], x["x"])
        assert [
            (m.version, m.sha256)
            for m in (await running.stub.ListLoadedModels(pb.ListLoadedModelsRequest())).loaded_models
        ] == [(1, identity.sha256)]


async def test_versions_retired_while_the_watch_was_down_are_unloaded_once_it_is_back(
    watched: Registry, other: RunningRegistry, redis_url: str, tmp_path: Path, add_one: ModelFile
):
    settings = inference_settings_for(watched.address, tmp_path / "inference", redis_url)
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(running_inference(settings, other))
        await load_three(running, add_one)

        await watched.stop()  # the service's event stream breaks; the changes below reach it as no event
        await other.stub.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(model="retired", version=1))
        await other.stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(model="retired", version=2))
        assert await loaded(running) == [("kept", 1), ("retired", 1), ("retired", 2)]
        await watched.start()

        await wait_loaded(running, [("kept", 1)])

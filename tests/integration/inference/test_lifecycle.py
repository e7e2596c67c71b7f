"""Sessions over real gRPC: single-flight lazy loading, LoadModel/UnloadModel, LRU eviction, requests in flight
during unloads, and an alias moved while traffic flows."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import pytest

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.registry.v1 import registry_pb2
from tests.fixtures.onnx_models import ModelFile, build_heavy, build_identity, model_bytes
from tests.integration.inference.conftest import (
    RunningInference,
    StartInference,
    failure,
    outputs,
    predict_request,
    ref,
    upload,
)

SLOW = model_bytes(build_heavy(depth=32))
BLOCKER = {"x": np.ones((4096, 512), dtype=np.float32)}


async def loaded(running: RunningInference) -> list[tuple[str, int, int]]:
    response = await running.stub.ListLoadedModels(pb.ListLoadedModelsRequest())
    return [(m.model, m.version, m.state) for m in response.loaded_models]


async def wait_loaded(running: RunningInference, expected: list[tuple[str, int, int]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while (current := await loaded(running)) != expected:
            await asyncio.sleep(0.005)
    assert current == expected


async def test_concurrent_first_requests_load_one_session(
    inference: RunningInference, mlp: ModelFile, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="modelforge.inference.engine")
    await upload(inference, "mlp", mlp)
    feeds = mlp.sample(batch=1)

    responses = await asyncio.gather(*(inference.stub.Predict(predict_request("mlp", feeds)) for _ in range(16)))

    assert {r.version for r in responses} == {1}
    assert [r.getMessage() for r in caplog.records].count(f"loaded mlp:1 in {0:.3f} s") <= 1
    assert sum(1 for r in caplog.records if r.getMessage().startswith("loaded mlp:1 ")) == 1
    assert await loaded(inference) == [("mlp", 1, pb.LOADED_MODEL_STATE_READY)]


async def test_load_model_then_list_and_statistics(inference: RunningInference, add_one: ModelFile):
    await upload(inference, "add-one", add_one)

    response = await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))

    model = response.loaded_model
    assert (model.model, model.version, model.state) == ("add-one", 1, pb.LOADED_MODEL_STATE_READY)
    assert model.sha256 == add_one.sha256 and model.memory_bytes > 0 and model.in_flight == 0
    await inference.stub.Predict(predict_request("add-one", add_one.sample(batch=3)))
    stats = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    (entry,) = stats.model_statistics
    assert (entry.model, entry.version, entry.request_count, entry.inference_count) == ("add-one", 1, 1, 3)
    assert stats.cache_status == pb.CACHE_STATUS_OK


async def test_unload_of_a_model_not_loaded_is_not_found(inference: RunningInference, add_one: ModelFile):
    await upload(inference, "add-one", add_one)

    code, reason, _ = await failure(inference.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("add-one"))))

    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_LOADED")


async def test_least_recently_used_version_is_evicted(start_inference: StartInference, add_one: ModelFile):
    async with start_inference(max_loaded_models=2) as running:
        for name in ("a", "b", "c"):
            await upload(running, name, add_one)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("a")))
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("b")))
        await running.stub.Predict(predict_request("a", add_one.sample()))  # a is now the most recent

        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("c")))

        ready = pb.LOADED_MODEL_STATE_READY
        await wait_loaded(running, [("a", 1, ready), ("c", 1, ready)])


async def test_unload_waits_for_requests_in_flight(start_inference: StartInference):
    async with start_inference(compute_threads=1) as running:
        await upload(running, "slow", SLOW)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("slow")))
        blocker = asyncio.ensure_future(running.stub.Predict(predict_request("slow", BLOCKER)))
        await wait_in_flight(running, "slow", 1)

        unload = asyncio.ensure_future(running.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("slow"))))

        await wait_loaded(running, [("slow", 1, pb.LOADED_MODEL_STATE_UNLOADING)])
        assert not unload.done()
        result = await blocker  # finishes on the session being unloaded
        assert outputs(result)["y"].shape == (4096, 512)
        response = await unload
        assert [(m.model, m.version) for m in response.unloaded_models] == [("slow", 1)]
        await wait_loaded(running, [])


async def test_eviction_waits_for_requests_in_flight(start_inference: StartInference, add_one: ModelFile):
    async with start_inference(compute_threads=1, max_loaded_models=1) as running:
        await upload(running, "slow", SLOW)
        await upload(running, "add-one", add_one)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("slow")))
        blocker = asyncio.ensure_future(running.stub.Predict(predict_request("slow", BLOCKER)))
        await wait_in_flight(running, "slow", 1)

        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))

        states = await loaded(running)
        assert ("slow", 1, pb.LOADED_MODEL_STATE_UNLOADING) in states or blocker.done()
        assert outputs(await blocker)["y"].shape == (4096, 512)
        await wait_loaded(running, [("add-one", 1, pb.LOADED_MODEL_STATE_READY)])


async def test_bad_serving_label_is_failed_precondition(inference: RunningInference, add_one: ModelFile):
    await upload(inference, "add-one", add_one, labels={"modelforge.io/max-batch-size": "lots"})

    code, reason, details = await failure(inference.stub.Predict(predict_request("add-one", add_one.sample())))

    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_SERVING_CONFIG")
    assert "modelforge.io/max-batch-size" in details


async def test_alias_moved_mid_traffic_serves_the_new_version_from_then_on(
    inference: RunningInference, add_one: ModelFile
):
    await upload(inference, "flip", add_one)  # version 1: y = x + 1
    await upload(inference, "flip", model_bytes(build_identity()))  # version 2: y = x
    registry = inference.registry_stub
    await registry.SetAlias(registry_pb2.SetAliasRequest(model="flip", alias="production", version=1))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = {1: x + 1, 2: x}
    seen: list[tuple[float, int]] = []  # (when the request started, version that answered)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def traffic() -> None:
        while not stop.is_set():
            started = loop.time()
            response = await inference.stub.Predict(predict_request(ref("flip", alias="production"), {"x": x}))
            np.testing.assert_array_equal(outputs(response)["y"], expected[response.version])
            seen.append((started, response.version))

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    async with asyncio.timeout(20):
        while len(seen) < 20:
            await asyncio.sleep(0.005)
        await registry.SetAlias(registry_pb2.SetAliasRequest(model="flip", alias="production", version=2))
        while not any(version == 2 for _, version in seen):
            await asyncio.sleep(0.005)
        switched = min(started for started, version in seen if version == 2)
        count = len(seen)
        while len(seen) < count + 20:
            await asyncio.sleep(0.005)
    stop.set()
    await asyncio.gather(*workers)

    assert seen[0][1] == 1
    later = [version for started, version in seen if started > switched]
    assert later and set(later) == {2}


async def wait_in_flight(running: RunningInference, model: str, count: int) -> None:
    async with asyncio.timeout(20):
        while True:
            response = await running.stub.ListLoadedModels(pb.ListLoadedModelsRequest(model=model))
            if sum(m.in_flight for m in response.loaded_models) == count:
                return
            await asyncio.sleep(0.005)

"""The prediction cache as Predict uses it: off unless the version enables it; hit, miss, bypass and refresh."""

from __future__ import annotations

import asyncio

import numpy as np
import redis.asyncio

from modelforge.inference.v1 import inference_pb2 as pb
from tests.fixtures.onnx_models import ModelFile
from tests.integration.inference.conftest import RunningInference, outputs, predict_request, ref, upload


async def cache_counts(running: RunningInference, model: str) -> tuple[int, int]:
    response = await running.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref(model)))
    (entry,) = response.model_statistics
    return entry.cache_hit_count, entry.cache_miss_count


async def test_cache_is_off_unless_the_version_enables_it(inference: RunningInference, add_one: ModelFile):
    await upload(inference, "plain", add_one)
    feeds = add_one.sample()

    first = await inference.stub.Predict(predict_request("plain", feeds))
    second = await inference.stub.Predict(predict_request("plain", feeds))

    assert not first.cache_hit and not second.cache_hit
    assert await cache_counts(inference, "plain") == (0, 0)


async def test_hit_miss_bypass_and_refresh(inference: RunningInference, multi_io: ModelFile):
    await upload(inference, "cached", multi_io, labels={"modelforge.io/cache": "true"})
    feeds = multi_io.sample(batch=2)

    miss = await inference.stub.Predict(predict_request("cached", feeds))
    hit = await inference.stub.Predict(predict_request("cached", feeds))
    bypass = await inference.stub.Predict(predict_request("cached", feeds, cache_mode=pb.CACHE_MODE_BYPASS))
    refresh = await inference.stub.Predict(predict_request("cached", feeds, cache_mode=pb.CACHE_MODE_REFRESH))
    only_one = await inference.stub.Predict(predict_request("cached", feeds, output_names=["id_sum"]))

    assert [r.cache_hit for r in (miss, hit, bypass, refresh, only_one)] == [False, True, False, False, False]
    for response in (hit, bypass, refresh):
        for name, array in outputs(miss).items():
            np.testing.assert_array_equal(outputs(response)[name], array)
    assert [t.name for t in only_one.outputs] == ["id_sum"]  # its own entry: the requested outputs are in the key
    assert await cache_counts(inference, "cached") == (1, 2)
    stats = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    assert stats.cache_status == pb.CACHE_STATUS_OK


async def test_a_miss_does_not_wait_for_the_cache_write(
    inference: RunningInference, add_one: ModelFile, redis_url: str
):
    await upload(inference, "cached", add_one, labels={"modelforge.io/cache": "true"})
    feeds = add_one.sample(batch=1)
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")  # Redis holds writes; reads answer
    try:
        miss = await inference.stub.Predict(predict_request("cached", feeds))
        repeat = await inference.stub.Predict(predict_request("cached", feeds))
        assert not await client.keys("modelforge:pred:*")  # the entry's write is still held
    finally:
        await client.execute_command("CLIENT", "UNPAUSE")

    assert (miss.cache_hit, repeat.cache_hit) == (False, True)
    np.testing.assert_array_equal(outputs(repeat)["y"], outputs(miss)["y"])
    async with asyncio.timeout(10):
        while not await client.keys("modelforge:pred:*"):
            await asyncio.sleep(0.01)
    await client.aclose()
    stats = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    assert stats.cache_status == pb.CACHE_STATUS_OK

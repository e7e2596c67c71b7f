"""The prediction cache as Predict uses it, over real gRPC: off unless the version enables it; hit, miss, bypass
and refresh; TTL expiry and the entry size limit; single flight of concurrent identical misses; Redis going away
and coming back.

Some tests hold a run in the batch queue on purpose: a version labelled to batch 2 rows with a queue delay of ten
minutes keeps a lone 1-row request queued until a second compatible request (the *filler*, other inputs, cache
bypassed) completes the batch. That gives the tests a point, decided by them rather than by a clock, at which the
model has not run yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge_inference.__main__ import CACHE_DEPENDENCY, CACHE_HEALTH_NAME
from modelforge_server import embedded
from tests.fixtures.onnx_models import ModelFile
from tests.fixtures.servers import RunningRegistry
from tests.integration.inference.conftest import (
    RunningInference,
    error_reason,
    eventually,
    inference_settings_for,
    outputs,
    predict_request,
    ref,
    running_inference,
    upload,
)

CACHED = {"modelforge.io/cache": "true"}
# Batches of 2 rows, and a lone request waits ten minutes for company: 1-row requests stay queued until a filler.
GATED = {**CACHED, "modelforge.io/max-batch-size": "2", "modelforge.io/max-queue-delay-us": "600000000"}
ENTRIES = "modelforge:pred:*"
CALL_TIMEOUT = 60.0  # the gRPC deadline of every call here: generous, it only bounds a hang


async def cache_counts(running: RunningInference, model: str) -> tuple[int, int]:
    response = await running.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref(model)))
    (entry,) = response.model_statistics
    return entry.cache_hit_count, entry.cache_miss_count


async def statistics(running: RunningInference, model: str, version: int | None = None) -> pb.ModelStatistics:
    """The version's counters; all zero before its first request reaches the engine."""
    request = pb.GetModelStatisticsRequest(ref=ref(model, version=version))
    response: pb.GetModelStatisticsResponse = await running.stub.GetModelStatistics(request)
    if not response.model_statistics:
        return pb.ModelStatistics()
    (entry,) = response.model_statistics
    return entry


async def cache_status(running: RunningInference) -> pb.CacheStatus.ValueType:
    response: pb.GetModelStatisticsResponse = await running.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    return response.cache_status


async def predict(
    running: RunningInference,
    model: str,
    feeds: Mapping[str, np.ndarray],
    *,
    version: int | None = None,
    deadline: float = CALL_TIMEOUT,
    **fields: Any,
) -> pb.PredictResponse:
    """Predict over the server's channel; `deadline` is the call's gRPC timeout, `fields` go into the request."""
    request = predict_request(ref(model, version=version), feeds, **fields)
    response: pb.PredictResponse = await running.stub.Predict(request, timeout=deadline)
    return response


def assert_adds_one(response: pb.PredictResponse, feeds: Mapping[str, np.ndarray]) -> None:
    """The add_one model's answer to feeds: y = x + 1, exactly (one float32 addition)."""
    assert [t.name for t in response.outputs] == ["y"]
    np.testing.assert_array_equal(outputs(response)["y"], feeds["x"] + np.float32(1))


# -- the basics ----------------------------------------------------------------------------------------------


async def test_cache_is_off_unless_the_version_enables_it(inference: RunningInference, add_one: ModelFile) -> None:
    await upload(inference, "plain", add_one)
    feeds = add_one.sample()

    first = await inference.stub.Predict(predict_request("plain", feeds))
    second = await inference.stub.Predict(predict_request("plain", feeds))

    assert not first.cache_hit and not second.cache_hit
    assert await cache_counts(inference, "plain") == (0, 0)


async def test_hit_miss_bypass_and_refresh(inference: RunningInference, multi_io: ModelFile) -> None:
    await upload(inference, "cached", multi_io, labels=CACHED)
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
    inference: RunningInference, add_one: ModelFile, client: redis.asyncio.Redis
) -> None:
    await upload(inference, "cached", add_one, labels=CACHED)
    feeds = add_one.sample(batch=1)
    await client.client_pause(10000, all=False)  # Redis holds writes; reads answer
    try:
        miss = await inference.stub.Predict(predict_request("cached", feeds))
        repeat = await inference.stub.Predict(predict_request("cached", feeds))
        assert not await client.keys(ENTRIES)  # the entry's write is still held
    finally:
        await client.client_unpause()

    assert (miss.cache_hit, repeat.cache_hit) == (False, True)
    np.testing.assert_array_equal(outputs(repeat)["y"], outputs(miss)["y"])

    async def stored() -> bool:
        return bool(await client.keys(ENTRIES))

    await eventually(stored, "the entry's write to reach Redis")
    stats = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    assert stats.cache_status == pb.CACHE_STATUS_OK


# -- what a version's labels set: TTL and the entry size limit ---------------------------------------------


async def test_entries_expire_after_the_versions_ttl(
    inference: RunningInference, add_one: ModelFile, client: redis.asyncio.Redis
) -> None:
    await upload(inference, "short-lived", add_one, labels={**CACHED, "modelforge.io/cache-ttl-seconds": "1"})
    feeds = add_one.sample()
    expired_before = (await client.info("stats"))["expired_keys"]

    first = await predict(inference, "short-lived", feeds)
    second = await predict(inference, "short-lived", feeds)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert_adds_one(second, feeds)

    async def expired() -> bool:
        # Redis counts the entry as expired only once it was written, so this cannot pass before the write.
        stats = await client.info("stats")
        return stats["expired_keys"] > expired_before and not await client.keys(ENTRIES)

    await eventually(expired, "Redis to expire the entry")
    await asyncio.sleep(0.05)  # the in-process copy expires at the same second, on another clock
    third = await predict(inference, "short-lived", feeds)

    assert not third.cache_hit  # neither Redis nor the in-process tier answers after the TTL
    assert_adds_one(third, feeds)
    stats = await statistics(inference, "short-lived")
    assert (stats.cache_hit_count, stats.cache_miss_count) == (1, 2)
    assert (stats.request_count, stats.execution_count) == (3, 2)


async def test_outputs_over_the_versions_max_entry_bytes_are_never_cached(
    inference: RunningInference, add_one: ModelFile, client: redis.asyncio.Redis
) -> None:
    # Both versions share one file, hence their keys; the small one goes first so that nothing is stored yet.
    await upload(inference, "sized", add_one, labels={**CACHED, "modelforge.io/cache-max-entry-bytes": "16"})
    await upload(inference, "sized", add_one, labels={**CACHED, "modelforge.io/cache-max-entry-bytes": "4096"})
    feeds = add_one.sample(batch=2)  # y: 2 x 4 float32, 32 bytes before any header

    small = [await predict(inference, "sized", feeds, version=1) for _ in range(2)]
    assert [r.cache_hit for r in small] == [False, False]
    assert not await client.keys(ENTRIES)  # refused before any write was started
    large = [await predict(inference, "sized", feeds, version=2) for _ in range(2)]
    assert [r.cache_hit for r in large] == [False, True]

    for response in (*small, *large):
        assert_adds_one(response, feeds)
    one, two = await statistics(inference, "sized", 1), await statistics(inference, "sized", 2)
    assert (one.cache_hit_count, one.cache_miss_count, one.execution_count) == (0, 2, 2)
    assert (two.cache_hit_count, two.cache_miss_count, two.execution_count) == (1, 1, 1)


# -- single flight -------------------------------------------------------------------------------------------


async def test_concurrent_identical_misses_of_a_cold_model_run_it_once(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await upload(inference, "shared", add_one, labels=GATED)  # not loaded: the first miss loads it
    feeds, filler = add_one.sample(batch=1, seed=1), add_one.sample(batch=1, seed=2)
    callers = [asyncio.ensure_future(predict(inference, "shared", feeds)) for _ in range(16)]
    try:

        async def all_missed() -> bool:
            return (await statistics(inference, "shared")).cache_miss_count == 16

        await eventually(all_missed, "all 16 callers to miss")  # the one run waits in the queue meanwhile
        assert not any(caller.done() for caller in callers)
        completing = await predict(inference, "shared", filler, cache_mode=pb.CACHE_MODE_BYPASS)
        responses = await asyncio.gather(*callers)
    finally:
        for caller in callers:
            caller.cancel()

    assert_adds_one(completing, filler)
    for response in responses:
        assert not response.cache_hit  # each looked, missed and got the shared run's outputs
        assert_adds_one(response, feeds)
    stats = await statistics(inference, "shared")
    # One run of 2 rows: the 16 callers' shared row and the filler's.
    assert (stats.execution_count, stats.inference_count, dict(stats.batch_sizes)) == (1, 2, {2: 1})
    assert (stats.request_count, stats.failure_count) == (17, 0)
    assert (stats.cache_hit_count, stats.cache_miss_count) == (0, 16)

    again = await predict(inference, "shared", feeds)
    assert again.cache_hit
    assert_adds_one(again, feeds)
    assert (await statistics(inference, "shared")).execution_count == 1


@pytest.mark.parametrize("limit", ["queue timeout", "call deadline"])
async def test_a_first_caller_with_a_short_timeout_does_not_fail_the_callers_sharing_its_run(
    inference: RunningInference, add_one: ModelFile, limit: str
) -> None:
    """Identical callers wait in the queue each with its own queue timeout and gRPC deadline: when the first
    caller's passes, it alone leaves with DEADLINE_EXCEEDED, and the callers after it still get their answer, from
    one run."""
    await upload(inference, "shared", add_one, labels=GATED)
    await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("shared")))
    feeds, filler = add_one.sample(batch=1, seed=1), add_one.sample(batch=1, seed=2)
    # The leader's limit is the window in which the followers must queue behind it: ample for 8 local calls.
    if limit == "queue timeout":
        leading = predict(inference, "shared", feeds, timeout=duration_pb2.Duration(seconds=3))
    else:
        leading = predict(inference, "shared", feeds, deadline=3.0)
    leader = asyncio.ensure_future(leading)
    followers: list[asyncio.Future[pb.PredictResponse]] = []
    completing: asyncio.Future[pb.PredictResponse] | None = None
    try:

        async def leader_missed() -> bool:
            return (await statistics(inference, "shared")).cache_miss_count == 1

        await eventually(leader_missed, "the first caller to miss")
        followers = [asyncio.ensure_future(predict(inference, "shared", feeds)) for _ in range(8)]

        async def followers_missed() -> bool:
            return (await statistics(inference, "shared")).cache_miss_count == 9

        await eventually(followers_missed, "the followers to miss")
        stats = await statistics(inference, "shared")
        in_time = stats.failure_count == 0 and not leader.done()
        assert in_time, "the first caller's limit passed before every follower had queued"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await leader
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if limit == "queue timeout":  # a call deadline is enforced by gRPC as well, whichever comes first
            assert error_reason(caught.value) == "QUEUE_TIMEOUT"
            assert "in the queue of shared:1" in (caught.value.details() or "")

        # The followers are still queued; one run, waiting in the queue for a companion, answers them all.
        completing = asyncio.ensure_future(
            predict(
                inference, "shared", filler, cache_mode=pb.CACHE_MODE_BYPASS, timeout=duration_pb2.Duration(seconds=30)
            )
        )
        results = await asyncio.gather(*followers, return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["PredictResponse"] * 8, results
        assert_adds_one(await completing, filler)
        assert (await statistics(inference, "shared")).execution_count == 1  # 2 rows: the followers' and the filler's
    finally:
        for call in (leader, *followers, *([completing] if completing is not None else [])):
            call.cancel()

    for response in results:
        assert isinstance(response, pb.PredictResponse)
        assert not response.cache_hit
        assert_adds_one(response, feeds)
    stats = await statistics(inference, "shared")
    assert (stats.execution_count, stats.inference_count) == (1, 2)  # the followers' row ran once, with the filler
    assert stats.request_count == 9
    # A leader that gRPC cancelled at its deadline, before the server's own timer failed it, counts as no failure.
    assert stats.failure_count in ((1,) if limit == "queue timeout" else (0, 1))
    assert (stats.cache_hit_count, stats.cache_miss_count) == (0, 9)
    assert (await predict(inference, "shared", feeds)).cache_hit


# -- Redis going away ----------------------------------------------------------------------------------------


@dataclass
class StoppableRedis:
    """A redis-server of the test's own, on a fixed port, that the test can stop and start again."""

    directory: Path
    port: int
    stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        _, self.stop = await asyncio.to_thread(embedded.start_redis, self.directory, self.port)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[StoppableRedis]:
    port = embedded.free_port()
    _, stop = await asyncio.to_thread(embedded.start_redis, tmp_path / "own-redis", port)
    server = StoppableRedis(tmp_path / "own-redis", port, stop)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)  # a no-op when already stopped


async def cache_health(running: RunningInference) -> int:
    request = health_pb2.HealthCheckRequest(service=CACHE_HEALTH_NAME)
    return (await health_pb2_grpc.HealthStub(running.channel).Check(request)).status


async def test_redis_down_predictions_answer_uncached_and_the_cache_recovers_by_itself(
    registry: RunningRegistry,
    own_redis: StoppableRedis,
    add_one: ModelFile,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = inference_settings_for(registry.address, tmp_path / "inference", own_redis.url)
    async with running_inference(settings, registry) as running:
        await upload(running, "resilient", add_one, labels=CACHED)
        known, fresh = add_one.sample(seed=1), add_one.sample(seed=2)
        assert [(await predict(running, "resilient", known)).cache_hit for _ in range(2)] == [False, True]
        client = redis.asyncio.Redis.from_url(own_redis.url)
        try:

            async def stored() -> bool:
                return bool(await client.keys(ENTRIES))

            await eventually(stored, "the entry's write to reach Redis")  # no write is under way from here on
        finally:
            await client.aclose()

        await asyncio.to_thread(own_redis.stop)
        during = await predict(running, "resilient", fresh)  # its lookup finds Redis gone
        assert not during.cache_hit
        assert_adds_one(during, fresh)
        assert await cache_status(running) == pb.CACHE_STATUS_DEGRADED
        known_during = await predict(running, "resilient", known)
        assert not known_during.cache_hit  # degraded, the in-process tier is off too
        assert_adds_one(known_during, known)
        assert await cache_status(running) == pb.CACHE_STATUS_DEGRADED

        async def reported_down() -> bool:
            return await cache_health(running) == health_pb2.HealthCheckResponse.NOT_SERVING

        await eventually(reported_down, "the health check to report the cache down")
        await own_redis.start()

        async def recovered() -> bool:
            return await cache_status(running) == pb.CACHE_STATUS_OK

        await eventually(recovered, "the cache to leave degraded mode")

        async def reported_up() -> bool:
            return await cache_health(running) == health_pb2.HealthCheckResponse.SERVING

        await eventually(reported_up, "the health check to report the cache back")
        after = [await predict(running, "resilient", fresh) for _ in range(2)]
        assert [r.cache_hit for r in after] == [False, True]  # nothing was stored while degraded
        assert (await predict(running, "resilient", known)).cache_hit
        for response in after:
            assert_adds_one(response, fresh)

        stats = await statistics(running, "resilient")
        # Lookups that found Redis down or were skipped count neither as hits nor as misses.
        assert (stats.cache_hit_count, stats.cache_miss_count) == (3, 2)
        assert (stats.request_count, stats.failure_count, stats.execution_count) == (7, 0, 4)
    # One outage is one warning and one recovery line for the operator, though the health check saw it too.
    about_redis = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.levelno >= logging.INFO
        and (r.name == "modelforge_inference.cache" or r.getMessage().startswith(f"dependency {CACHE_DEPENDENCY} "))
    ]
    assert [level for level, _ in about_redis] == [logging.WARNING, logging.INFO], about_redis
    assert about_redis[0][1].startswith("prediction cache degraded, predictions run uncached until Redis answers")
    assert about_redis[1][1] == "prediction cache recovered: Redis answers again"

"""The batch queue over real gRPC: priority order, a full queue, deadlines passing in the queue, cancelled calls.

Each test occupies the only compute thread with one long request on a slow model, queues more behind it, and
waits (polling ListLoadedModels' in-flight count) until they are all queued before letting things happen.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2

from modelforge.inference.v1 import inference_pb2
from tests.fixtures.onnx_models import build_heavy, model_bytes
from tests.integration.inference.conftest import RunningInference, StartInference, failure, predict_request, ref, upload

SLOW = model_bytes(build_heavy(depth=32))
BLOCKER = {"x": np.ones((4096, 512), dtype=np.float32)}  # most of a second on one thread
SMALL = {"x": np.ones((1, 512), dtype=np.float32)}
# Tens of milliseconds each: requests that run one after the other also answer far enough apart that the
# client sees them finish in the order they ran.
MEDIUM = {"x": np.ones((256, 512), dtype=np.float32)}


@pytest.fixture
async def single_thread(start_inference: StartInference):
    async with start_inference(compute_threads=1) as running:
        yield running


async def in_flight(running: RunningInference, model: str) -> int:
    response = await running.stub.ListLoadedModels(inference_pb2.ListLoadedModelsRequest(model=model))
    return sum(m.in_flight for m in response.loaded_models)


async def wait_in_flight(running: RunningInference, model: str, count: int, timeout: float = 20.0) -> None:
    """Polls until `count` requests of `model` are running or queued."""
    async with asyncio.timeout(timeout):
        while (current := await in_flight(running, model)) != count:
            await asyncio.sleep(0.005)
    assert current == count


async def statistics(running: RunningInference, model: str) -> inference_pb2.ModelStatistics:
    response = await running.stub.GetModelStatistics(inference_pb2.GetModelStatisticsRequest(ref=ref(model)))
    (stats,) = response.model_statistics
    return stats


async def start_blocker(running: RunningInference, model: str) -> asyncio.Task:
    await running.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref(model)))
    blocker = asyncio.ensure_future(running.stub.Predict(predict_request(model, BLOCKER)))
    await wait_in_flight(running, model, 1)
    return blocker


async def test_higher_priority_runs_first_and_each_level_in_order(single_thread: RunningInference):
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/priority-levels": "2"})
    blocker = await start_blocker(single_thread, "slow")
    finished: list[str] = []

    async def call(label: str, priority: int) -> None:
        await single_thread.stub.Predict(predict_request("slow", MEDIUM, priority=priority))
        finished.append(label)

    tasks = []
    for index, (label, priority) in enumerate([("low-1", 2), ("low-2", 0), ("high-1", 1), ("low-3", 2), ("high-2", 1)]):
        tasks.append(asyncio.create_task(call(label, priority)))
        await wait_in_flight(single_thread, "slow", 2 + index)  # queued in this order
    await blocker
    await asyncio.gather(*tasks)

    assert finished == ["high-1", "high-2", "low-1", "low-2", "low-3"]


async def test_full_queue_refuses_at_once(single_thread: RunningInference):
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/max-queue-size": "2"})
    blocker = await start_blocker(single_thread, "slow")
    queued = [asyncio.ensure_future(single_thread.stub.Predict(predict_request("slow", SMALL))) for _ in range(2)]
    await wait_in_flight(single_thread, "slow", 3)

    code, reason, details = await failure(single_thread.stub.Predict(predict_request("slow", SMALL)))

    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    assert "slow:1" in details
    await blocker
    await asyncio.gather(*queued)  # the queued ones still run


async def test_request_timeout_passing_in_queue_is_deadline_exceeded_and_never_runs(single_thread: RunningInference):
    await upload(single_thread, "slow", SLOW)
    blocker = await start_blocker(single_thread, "slow")
    request = predict_request("slow", SMALL, timeout=duration_pb2.Duration(nanos=50_000_000))

    code, reason, _ = await failure(single_thread.stub.Predict(request))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    await blocker
    stats = await statistics(single_thread, "slow")
    assert (stats.execution_count, stats.request_count, stats.failure_count) == (1, 1, 1)


async def test_grpc_deadline_passing_in_queue_drops_the_request(single_thread: RunningInference):
    await upload(single_thread, "slow", SLOW)
    blocker = await start_blocker(single_thread, "slow")

    code, _, _ = await failure(single_thread.stub.Predict(predict_request("slow", SMALL), timeout=0.1))

    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_in_flight(single_thread, "slow", 1)  # left the queue although the blocker still runs
    await blocker


async def test_model_default_queue_timeout_applies(single_thread: RunningInference):
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/queue-timeout-seconds": "0.05"})
    await single_thread.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref("slow")))
    # The blocker runs at once: the queue timeout only bounds waiting.
    blocker = asyncio.ensure_future(single_thread.stub.Predict(predict_request("slow", BLOCKER)))
    await wait_in_flight(single_thread, "slow", 1)

    code, reason, _ = await failure(single_thread.stub.Predict(predict_request("slow", SMALL)))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    await blocker


async def test_cancelled_call_leaves_the_queue_and_never_runs(single_thread: RunningInference):
    await upload(single_thread, "slow", SLOW)
    blocker = await start_blocker(single_thread, "slow")
    call = single_thread.stub.Predict(predict_request("slow", SMALL))
    waiting = asyncio.ensure_future(call)
    await wait_in_flight(single_thread, "slow", 2)

    call.cancel()

    await wait_in_flight(single_thread, "slow", 1)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await blocker
    stats = await statistics(single_thread, "slow")
    assert (stats.request_count, stats.execution_count) == (1, 1)

"""The batch queue over real gRPC: priority order, a full queue, deadlines passing in the queue, cancelled calls,
runs stopped when their caller leaves, and identical requests to a cached version, which run once while each
keeps its own place and deadline.

test_oip.py drives the same queue through the V2 protocol's priority and timeout parameters, with these helpers.

Each test occupies the only compute thread with one long request on a slow model, queues more behind it, and
waits (polling ListLoadedModels' in-flight count) until they are all queued before letting things happen.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.inference.v1 import inference_pb2
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb
from tests.fixtures.onnx_models import build_counter, build_heavy, model_bytes
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
BLOCKER = {"x": np.ones((4096, 512), dtype=np.float32)}  # most of a second on one thread
SMALL = {"x": np.ones((1, 512), dtype=np.float32)}
# Tens of milliseconds each: requests that run one after the other also answer far enough apart that the
# client sees them finish in the order they ran.
MEDIUM = {"x": np.ones((256, 512), dtype=np.float32)}


@pytest.fixture
async def single_thread(start_inference: StartInference) -> AsyncIterator[RunningInference]:
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
    request = inference_pb2.GetModelStatisticsRequest(ref=ref(model))
    response: inference_pb2.GetModelStatisticsResponse = await running.stub.GetModelStatistics(request)
    (stats,) = response.model_statistics
    return stats


def rejected(running: RunningInference, model: str, reason: str) -> float:
    """The server's modelforge_inference_rejected_requests_total for version 1 of `model` and `reason`."""
    value = running.server.metrics.registry.get_sample_value(
        "modelforge_inference_rejected_requests_total", {"model": model, "version": "1", "reason": reason}
    )
    return value or 0.0


def waited_ms(details: str) -> float:
    """How long a QUEUE_TIMEOUT error says the request waited in the queue."""
    match = re.search(r"waited ([0-9.]+) ms in the queue", details)
    assert match is not None, details
    return float(match.group(1))


async def start_blocker(running: RunningInference, model: str) -> asyncio.Future[Any]:
    """Loads `model` and starts a long Predict on it; returns once it holds the model's only compute thread."""
    await running.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref(model)))
    blocker: asyncio.Future[Any] = asyncio.ensure_future(running.stub.Predict(predict_request(model, BLOCKER)))
    await wait_in_flight(running, model, 1)
    return blocker


async def test_higher_priority_runs_first_and_each_level_in_order(single_thread: RunningInference) -> None:
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


async def test_full_queue_refuses_at_once(single_thread: RunningInference) -> None:
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/max-queue-size": "2"})
    blocker = await start_blocker(single_thread, "slow")
    queued = [asyncio.ensure_future(single_thread.stub.Predict(predict_request("slow", SMALL))) for _ in range(2)]
    await wait_in_flight(single_thread, "slow", 3)

    code, reason, details = await failure(single_thread.stub.Predict(predict_request("slow", SMALL)))

    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    assert "slow:1" in details
    await blocker
    await asyncio.gather(*queued)  # the queued ones still run


async def test_request_timeout_passing_in_queue_is_deadline_exceeded_and_never_runs(
    single_thread: RunningInference,
) -> None:
    await upload(single_thread, "slow", SLOW)
    blocker = await start_blocker(single_thread, "slow")
    request = predict_request("slow", SMALL, timeout=duration_pb2.Duration(nanos=50_000_000))

    code, reason, _ = await failure(single_thread.stub.Predict(request))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    await blocker
    stats = await statistics(single_thread, "slow")
    assert (stats.execution_count, stats.request_count, stats.failure_count) == (1, 1, 1)


async def test_grpc_deadline_passing_in_queue_drops_the_request(single_thread: RunningInference) -> None:
    await upload(single_thread, "slow", SLOW)
    blocker = await start_blocker(single_thread, "slow")

    code, _, _ = await failure(single_thread.stub.Predict(predict_request("slow", SMALL), timeout=0.1))

    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own deadline may answer first: no reason here
    await wait_in_flight(single_thread, "slow", 1)  # left the queue although the blocker still runs
    await blocker
    stats = await statistics(single_thread, "slow")
    assert (stats.request_count, stats.execution_count, stats.inference_count) == (1, 1, len(BLOCKER["x"]))
    # The server drops it at its own queue deadline, or gRPC's cancellation of the expired call reaches it first:
    # either way a failure, rejected for "deadline", and not a cancelled call.
    deadline, cancelled = rejected(single_thread, "slow", "deadline"), rejected(single_thread, "slow", "cancelled")
    assert (deadline, cancelled, stats.failure_count, stats.cancelled_count) == (1, 0, 1, 0)


async def test_model_default_queue_timeout_applies(single_thread: RunningInference) -> None:
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/queue-timeout-seconds": "0.05"})
    await single_thread.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref("slow")))
    # The blocker runs at once: the queue timeout only bounds waiting.
    blocker = asyncio.ensure_future(single_thread.stub.Predict(predict_request("slow", BLOCKER)))
    await wait_in_flight(single_thread, "slow", 1)

    code, reason, _ = await failure(single_thread.stub.Predict(predict_request("slow", SMALL)))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    await blocker


async def test_a_request_that_times_out_waiting_for_its_batch_to_fill_hears_of_the_batch_delay(
    inference: RunningInference,
) -> None:
    labels = {"modelforge.io/max-batch-size": "8", "modelforge.io/max-queue-delay-us": "2000000"}
    await upload(inference, "slow", SLOW, labels=labels)
    await inference.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref("slow")))
    # Alone on an idle server, the request waits for company until its own 50 ms run out.
    request = predict_request("slow", SMALL, timeout=duration_pb2.Duration(nanos=50_000_000))

    code, reason, details = await failure(inference.stub.Predict(request))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    assert "may wait up to 2000000 µs for others to share its batch" in details
    assert "modelforge.io/max-queue-delay-us" in details


async def test_request_timeout_longer_than_the_models_default_does_not_extend_it(
    single_thread: RunningInference,
) -> None:
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/queue-timeout-seconds": "0.05"})
    blocker = await start_blocker(single_thread, "slow")
    # Ten minutes: had it replaced the model's 50 ms, the request would run, and succeed, once the blocker ends.
    request = predict_request("slow", SMALL, timeout=duration_pb2.Duration(seconds=600))

    code, reason, details = await failure(single_thread.stub.Predict(request))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    assert "queue of slow:1" in details
    assert waited_ms(details) >= 40  # the model's 50 ms (a loop timer may fire up to a millisecond early)
    await blocker
    stats = await statistics(single_thread, "slow")
    assert (stats.execution_count, stats.request_count, stats.failure_count) == (1, 1, 1)
    assert stats.inference_count == len(BLOCKER["x"])
    assert rejected(single_thread, "slow", "deadline") == 1


async def test_cancelled_call_leaves_the_queue_and_never_runs(single_thread: RunningInference) -> None:
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
    assert (stats.request_count, stats.execution_count, stats.failure_count, stats.cancelled_count) == (1, 1, 0, 1)


# -- a run whose caller leaves stops ----------------------------------------------------------------------------

COUNTER = model_bytes(build_counter())
# About a minute of counting on the test machine: far past every wait below, yet a run that is not stopped still
# ends, so that a regression fails its test rather than hanging the suite.
LONG = {"x": np.zeros(4, dtype=np.float32), "steps": np.array([10**8])}
FEW = {"x": np.zeros(4, dtype=np.float32), "steps": np.array([3])}


def _v2_request(model: str, inputs: dict[str, np.ndarray]) -> oip_pb.ModelInferRequest:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return oip_pb.ModelInferRequest(
        model_name=model,
        inputs=[
            oip_pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatypes[array.dtype], shape=array.shape)
            for name, array in inputs.items()
        ],
        raw_input_contents=[array.tobytes() for array in inputs.values()],
    )


async def _one_then_wait(request: oip_pb.ModelInferRequest) -> AsyncIterator[oip_pb.ModelInferRequest]:
    """A V2 request stream that sends one request and stays open."""
    yield request
    await asyncio.Event().wait()


@pytest.mark.parametrize("leave", ["deadline", "cancel", "stream cancel", "v2 stream cancel"])
async def test_a_run_whose_caller_leaves_stops_and_frees_the_compute_thread(
    single_thread: RunningInference, leave: str
) -> None:
    await upload(single_thread, "counter", COUNTER)
    await single_thread.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref("counter")))
    request = predict_request("counter", LONG)
    if leave == "deadline":
        assert (await failure(single_thread.stub.Predict(request, timeout=0.5)))[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        if leave == "cancel":
            call: Any = single_thread.stub.Predict(request)
        elif leave == "stream cancel":
            call = single_thread.stub.PredictStream(
                inference_pb2.PredictStreamRequest(ref=request.ref, inputs=request.inputs)
            )
        else:
            call = single_thread.oip.ModelStreamInfer(_one_then_wait(_v2_request("counter", LONG)))
        waiting = asyncio.ensure_future(call if leave == "cancel" else call.read())
        await wait_in_flight(single_thread, "counter", 1)
        await asyncio.sleep(0.2)  # taken off the queue and counting on the compute thread
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await wait_in_flight(single_thread, "counter", 0)

    # The only compute thread is free: a request that would wait for a minute behind the first run answers.
    response = await single_thread.stub.Predict(predict_request("counter", FEW), timeout=20)
    assert outputs(response)["y"].tolist() == [3.0] * 4
    stats = await statistics(single_thread, "counter")
    assert stats.execution_count == 1  # the stopped run counts as no execution


# -- identical requests to a cached version: one run, each with its own priority and deadline --------------------

CACHED_LEVELS = {"modelforge.io/cache": "true", "modelforge.io/priority-levels": "2"}
OTHER = {"x": np.full((256, 512), 2.0, dtype=np.float32)}


async def test_an_identical_request_of_higher_priority_runs_the_shared_work_at_its_own_level(
    single_thread: RunningInference,
) -> None:
    await upload(single_thread, "slow", SLOW, labels=CACHED_LEVELS)
    blocker = await start_blocker(single_thread, "slow")
    finished: list[str] = []

    async def call(label: str, feeds: dict[str, np.ndarray], priority: int) -> None:
        await single_thread.stub.Predict(predict_request("slow", feeds, priority=priority))
        finished.append(label)

    tasks = []
    for index, (label, feeds, priority) in enumerate(
        [("low, identical", MEDIUM, 2), ("low, other", OTHER, 2), ("high, identical", MEDIUM, 1)]
    ):
        tasks.append(asyncio.create_task(call(label, feeds, priority)))
        await wait_in_flight(single_thread, "slow", 2 + index)  # queued in this order
    await blocker
    await asyncio.gather(*tasks)

    assert set(finished[:2]) == {"high, identical", "low, identical"}  # answered by one run, ahead of "low, other"
    assert finished[2] == "low, other"
    stats = await statistics(single_thread, "slow")
    assert (stats.execution_count, stats.request_count, stats.cache_miss_count) == (3, 4, 4)


async def test_an_identical_request_leaves_the_queue_at_its_own_timeout(single_thread: RunningInference) -> None:
    await upload(single_thread, "slow", SLOW, labels=CACHED_LEVELS)
    blocker = await start_blocker(single_thread, "slow")
    first = asyncio.ensure_future(single_thread.stub.Predict(predict_request("slow", MEDIUM)))
    await wait_in_flight(single_thread, "slow", 2)
    hasty = predict_request("slow", MEDIUM, timeout=duration_pb2.Duration(nanos=50_000_000))

    code, reason, details = await failure(single_thread.stub.Predict(hasty))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    assert "queue of slow:1" in details
    assert not blocker.done() and not first.done()  # it left while the identical request still waits
    await blocker
    response = await first
    assert not response.cache_hit
    stats = await statistics(single_thread, "slow")
    assert (stats.execution_count, stats.request_count, stats.failure_count) == (2, 2, 1)


async def test_stopping_the_server_stops_a_run_under_way(start_inference: StartInference) -> None:
    async with asyncio.timeout(20):  # the shutdown waits for running batches: without the stop, a minute
        async with start_inference(compute_threads=1) as running:
            await upload(running, "counter", COUNTER)
            await running.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref("counter")))
            call = asyncio.ensure_future(running.stub.Predict(predict_request("counter", LONG)))
            await wait_in_flight(running, "counter", 1)
            await asyncio.sleep(0.2)  # counting on the compute thread
            await running.server.stop(0.5)  # calls still in flight after the grace period are cancelled
            assert (await failure(call))[0] is grpc.StatusCode.UNAVAILABLE


async def test_a_tiny_model_whose_run_turns_long_does_not_hold_the_service(inference: RunningInference) -> None:
    # The counter's runs take microseconds for a few steps, so they run on the event loop; its step count is an
    # input. A request of 10**12 steps held the loop: health, and every model, until the run ended (hours).
    await upload(inference, "counter", model_bytes(build_counter()))
    short = predict_request("counter", {"x": np.zeros(1, np.float32), "steps": np.array([1])})
    for _ in range(50):
        await inference.stub.Predict(short)
    # About 100 s unstopped; this test's client shares the service's event loop, so a held loop shows as time.
    endless = predict_request("counter", {"x": np.zeros(1, np.float32), "steps": np.array([10**8])})
    started = time.monotonic()
    call = asyncio.ensure_future(inference.stub.Predict(endless, timeout=10))
    await asyncio.sleep(1.0)
    health = health_pb2_grpc.HealthStub(inference.channel)
    answered = await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    assert answered.status == health_pb2.HealthCheckResponse.SERVING
    assert outputs(await inference.stub.Predict(short, timeout=5))["y"][0] == 1.0
    assert time.monotonic() - started < 8  # the loop was free within INLINE_RUN_LIMIT
    code, _, _ = await failure(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # stopped at its deadline on a compute thread

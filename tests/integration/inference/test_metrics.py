"""The inference service's Prometheus endpoint after traffic: per model and version, counters move by exactly the
amount of work done."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.registry.v1 import registry_pb2
from modelforge_server.metrics import Endpoint
from tests.fixtures.metrics import Samples, scrape
from tests.fixtures.onnx_models import ModelFile, build_heavy, model_bytes
from tests.fixtures.polling import eventually
from tests.integration.inference.conftest import RunningInference, failure, predict_request, ref, upload


def value(samples: Samples, name: str, model: str, version: int = 1, **labels: str) -> float:
    key = tuple(sorted({"model": model, "version": str(version), **labels}.items()))
    return samples.get((name, key), 0.0)


@pytest.fixture
def endpoint(inference: RunningInference) -> Iterator[Endpoint]:
    """The server's metrics served on a free port, as `app.serve` serves them on MODELFORGE_METRICS_PORT."""
    served = inference.server.metrics.serve("127.0.0.1", 0)
    yield served
    served.close()


async def test_ten_predictions_move_the_counters_by_ten(
    inference: RunningInference, endpoint: Endpoint, mlp: ModelFile
):
    await upload(inference, "mlp", mlp)
    await inference.stub.Predict(predict_request("mlp", mlp.sample(batch=1)))  # loads the model
    before = await asyncio.to_thread(scrape, endpoint.port)

    await asyncio.gather(
        *(inference.stub.Predict(predict_request("mlp", mlp.sample(batch=2, seed=i))) for i in range(10))
    )

    after = await asyncio.to_thread(scrape, endpoint.port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, "mlp", **labels) - value(before, name, "mlp", **labels)

    assert moved("modelforge_inference_requests_total") == 10
    assert moved("modelforge_inference_items_total") == 20
    executions = moved("modelforge_inference_executions_total")
    assert 1 <= executions <= 10
    assert value(after, "modelforge_inference_batch_size_count", "mlp") == value(
        after, "modelforge_inference_executions_total", "mlp"
    )
    assert value(after, "modelforge_inference_compute_duration_seconds_count", "mlp") == value(
        after, "modelforge_inference_executions_total", "mlp"
    )
    assert moved("modelforge_inference_batch_size_sum") == 20
    assert moved("modelforge_inference_queue_duration_seconds_count") == 10
    assert moved("modelforge_inference_failed_requests_total") == 0
    assert value(after, "modelforge_inference_model_loads_total", "mlp", result="ok") == 1
    assert value(after, "modelforge_inference_model_load_duration_seconds_count", "mlp") == 1
    assert value(after, "modelforge_inference_queue_depth", "mlp") == 0
    assert value(after, "modelforge_inference_model_memory_bytes", "mlp") > 0
    assert after[("modelforge_inference_loaded_models", (("state", "ready"),))] == 1
    rpcs = (
        ("grpc_code", "OK"),
        ("grpc_method", "Predict"),
        ("grpc_service", "modelforge.inference.v1.InferenceService"),
    )
    assert after[("modelforge_rpc_requests_total", rpcs)] - before[("modelforge_rpc_requests_total", rpcs)] == 10


async def test_cache_hits_misses_rejections_and_unloads_are_counted(
    inference: RunningInference, endpoint: Endpoint, add_one: ModelFile
):
    await upload(inference, "cached", add_one, labels={"modelforge.io/cache": "true"})
    feeds = add_one.sample(batch=1)
    for _ in range(3):
        await inference.stub.Predict(predict_request("cached", feeds))
    bad = predict_request("cached", {"x": feeds["x"].astype("float64")})
    code, _, _ = await failure(inference.stub.Predict(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await inference.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("cached")))

    samples = await asyncio.to_thread(scrape, endpoint.port)

    assert value(samples, "modelforge_inference_cache_misses_total", "cached") == 1
    assert value(samples, "modelforge_inference_cache_hits_total", "cached") == 2
    assert value(samples, "modelforge_inference_requests_total", "cached") == 4
    assert value(samples, "modelforge_inference_failed_requests_total", "cached") == 1
    assert value(samples, "modelforge_inference_rejected_requests_total", "cached", reason="invalid") == 1
    assert value(samples, "modelforge_inference_executions_total", "cached") == 1
    assert value(samples, "modelforge_inference_model_unloads_total", "cached", reason="requested") == 1
    assert samples[("modelforge_inference_loaded_models", (("state", "ready"),))] == 0


async def test_requests_whose_callers_went_away_count_among_the_requests(
    inference: RunningInference, endpoint: Endpoint
):
    await upload(inference, "slow", model_bytes(build_heavy(depth=1024)))  # seconds of work: cut short when cancelled
    await inference.stub.Predict(predict_request("slow", {"x": np.ones((1, 512), np.float32)}))  # loads it
    calls = [
        inference.stub.Predict(predict_request("slow", {"x": np.full((256, 512), i, np.float32)})) for i in range(3)
    ]

    async def in_flight() -> bool:
        # Every call resolved to the version and is held by it, queued or running: counted from there on, answered
        # or not. A call that had only reached the service (modelforge_rpc_in_flight) may still be resolving its
        # ref, when an event of the push just made asks the registry again: cancelled then, it never resolved to
        # the version and counts for none.
        listed = await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest(model="slow"))
        return [m.in_flight for m in listed.loaded_models] == [3]

    await eventually(in_flight, "three Predict calls held by the version")
    for call in calls:
        call.cancel()

    def counted(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, "slow", **labels)

    async def all_cancelled() -> bool:
        samples = await asyncio.to_thread(scrape, endpoint.port)
        return counted(samples, "modelforge_inference_rejected_requests_total", reason="cancelled") == 3

    await eventually(all_cancelled, "three cancelled requests")
    samples = await asyncio.to_thread(scrape, endpoint.port)
    assert counted(samples, "modelforge_inference_requests_total") == 4
    assert counted(samples, "modelforge_inference_failed_requests_total") == 0


async def test_a_deleted_model_leaves_the_metrics_and_keeps_its_statistics_by_number(
    inference: RunningInference, endpoint: Endpoint, add_one: ModelFile
):
    await upload(inference, "gone", add_one)
    await upload(inference, "kept", add_one)
    for name in ("gone", "kept"):
        await inference.stub.Predict(predict_request(name, add_one.sample(batch=1)))

    def exported(samples: Samples, model: str) -> list[str]:
        return [name for name, labels in samples if ("model", model) in labels]

    assert exported(await asyncio.to_thread(scrape, endpoint.port), "gone")
    await inference.registry_stub.DeleteModel(registry_pb2.DeleteModelRequest(name="gone", force=True))

    async def dropped() -> bool:
        return not exported(await asyncio.to_thread(scrape, endpoint.port), "gone")

    await eventually(dropped, "the deleted model's series to leave /metrics")
    samples = await asyncio.to_thread(scrape, endpoint.port)
    assert value(samples, "modelforge_inference_requests_total", "kept") == 1
    response = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref("gone", version=1)))
    assert [(s.model, s.version, s.request_count) for s in response.model_statistics] == [("gone", 1, 1)]
    listed = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    assert [s.model for s in listed.model_statistics] == ["kept"]

"""A request whose deadline passes while its model loads fails DEADLINE_EXCEEDED with reason LOAD_TIMEOUT; the
load goes on, and later requests are served by it, not by a second load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge_inference.domain import ModelRef
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.errors import LoadTimeout
from modelforge_inference.files import ModelFileCache
from modelforge_inference.resolver import ModelResolver
from modelforge_inference.settings import InferenceSettings
from modelforge_server import status
from tests.fixtures.onnx_models import build_slow_load, model_bytes
from tests.fixtures.servers import upload_model
from tests.integration.inference import test_resolver as harness
from tests.integration.inference.conftest import RunningInference, failure, outputs, predict_request, upload

# The registry fixtures of the resolver tests: an in-process registry, a stub and an admin stub.
restartable_registry = harness.restartable_registry
stub = harness.stub
admin = harness.admin
resolver = harness.resolver

# Its load ends with a warmup run of 512 MatMuls of 512 x 512: seconds, where resolving it and fetching its small
# file take milliseconds (0.7 s for half as many MatMuls here, on one thread).
SLOWER_LOAD = model_bytes(build_slow_load(depth=512))
X = {"x": np.ones((512, 512), dtype=np.float32)}
DEADLINE = 0.5  # seconds: past the resolution and the download, well before the end of the load


async def test_a_deadline_that_passes_while_the_model_loads_is_load_timeout_and_the_load_goes_on(
    resolver: ModelResolver, admin, stub, tmp_path: Path
) -> None:
    """Driven on the engine, as the servicer drives it: over gRPC, the caller's own deadline, which passes at the
    same moment, answers first and carries no reason (the test below)."""
    await upload_model(admin, "slow", SLOWER_LOAD)
    files = await asyncio.to_thread(ModelFileCache, stub, tmp_path / "models", 1 << 30)
    engine = InferenceEngine(InferenceSettings(intra_op_threads=1), resolver=resolver, files=files)
    await engine.start()
    try:
        with pytest.raises(LoadTimeout) as caught:
            await engine.predict(ModelRef("slow"), X, time_remaining=DEADLINE)
        assert status.code_for(caught.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert caught.value.reason == "LOAD_TIMEOUT"
        assert str(caught.value) == "the deadline passed while slow:1 was loading; it keeps loading, so retry shortly"
        assert caught.value.metadata == {"model": "slow", "version": "1"}
        assert [(m.name, m.state.name) for m in engine.loaded()] == [("slow", "LOADING")]

        prediction = await engine.predict(ModelRef("slow"), X)  # served by the load under way
        assert prediction.version == 1 and prediction.outputs["y"].shape == (512, 512)
    finally:
        await engine.aclose()
        files.close()


async def test_over_grpc_a_request_that_times_out_on_a_load_leaves_it_to_serve_the_next_ones(
    inference: RunningInference,
) -> None:
    await upload(inference, "slow", SLOWER_LOAD)
    code, reason, _ = await failure(inference.stub.Predict(predict_request("slow", X), timeout=DEADLINE))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason in ("LOAD_TIMEOUT", "")  # "": the caller's own deadline, at the same moment, answered first
    listed = await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())
    assert [(m.model, m.state) for m in listed.loaded_models] == [("slow", pb.LOADED_MODEL_STATE_LOADING)]

    # The request's timeout bounds its wait in the queue, not for the load (see PredictRequest.timeout): a request
    # with a short one that comes while the version loads waits for the load, and is answered.
    short = duration_pb2.Duration(nanos=50_000_000)
    response = await inference.stub.Predict(predict_request("slow", X, timeout=short))
    assert outputs(response)["y"].shape == (512, 512)
    loads = inference.server.metrics.registry.get_sample_value
    assert loads("modelforge_inference_model_loads_total", {"model": "slow", "version": "1", "result": "ok"}) == 1

"""Dynamic batching over real gRPC: 64 concurrent callers with mixed shapes get what unbatched runs give."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.oip.v2 import grpc_service_pb2 as pb_oip
from tests.fixtures.onnx_models import ModelFile, build_gram, build_identity, build_nonzero, model_bytes
from tests.integration.inference.conftest import RunningInference, outputs, predict_request, ref, upload

BATCHING = {"modelforge.io/max-batch-size": "16", "modelforge.io/max-queue-delay-us": "20000"}
IDENTITY = model_bytes(build_identity(TensorProto.FLOAT, ["batch", "n"]))


def run_alone(data: bytes | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


async def statistics(running: RunningInference, model: str) -> pb.ModelStatistics:
    response = await running.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref(model)))
    (entry,) = response.model_statistics
    return entry


@pytest.mark.parametrize("fixture", ["mlp", "multi_io", "string_model", "identity"])
async def test_batched_equals_unbatched_under_64_concurrent_callers(
    inference: RunningInference, fixture: str, request: pytest.FixtureRequest
):
    if fixture == "identity":
        data: bytes | str = IDENTITY
        requests = [
            {"x": np.random.default_rng(i).standard_normal((1 + i % 3, (2, 3, 5)[i // 8 % 3])).astype(np.float32)}
            for i in range(64)
        ]  # three widths, in runs of eight: only requests of one width, one after another, may share a batch
    else:
        model: ModelFile = request.getfixturevalue(fixture)
        data = str(model.path)
        requests = [model.sample(batch=1 + i % 4, seed=i) for i in range(64)]
    await upload(inference, "batched", IDENTITY if fixture == "identity" else model, labels=BATCHING)
    await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("batched")))

    responses = await asyncio.gather(*(inference.stub.Predict(predict_request("batched", f)) for f in requests))

    for feeds, response in zip(requests, responses, strict=True):
        got, want = outputs(response), run_alone(data, feeds)
        assert list(got) == list(want)
        for name, expected in want.items():
            if expected.dtype == object:
                assert [x.decode() for x in got[name].reshape(-1)] == list(expected.reshape(-1))
            else:
                # GEMM kernels may block rows differently by batch size: equal up to float rounding
                np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-7)
                assert got[name].shape == expected.shape
    stats = await statistics(inference, "batched")
    assert stats.request_count == 64
    assert stats.inference_count == sum(next(iter(f.values())).shape[0] for f in requests)
    assert stats.execution_count < 64  # requests were merged
    assert max(stats.batch_sizes) <= 16


async def test_model_with_a_fixed_leading_dimension_is_never_merged(inference: RunningInference, fixed_shape):
    await upload(inference, "fixed", fixed_shape, labels=BATCHING)
    x = np.ones((1, 4), dtype=np.float32)

    responses = await asyncio.gather(*(inference.stub.Predict(predict_request("fixed", {"x": x})) for _ in range(8)))

    assert all(np.array_equal(outputs(r)["y"], 2 * x) for r in responses)
    stats = await statistics(inference, "fixed")
    assert (stats.execution_count, dict(stats.batch_sizes)) == (8, {1: 8})


async def test_a_model_whose_output_rows_are_not_the_input_rows_is_never_merged(inference: RunningInference):
    # NonZero answers as many rows as there are hits: merged requests of equal total rows would be split back
    # wrongly (each caller getting another's positions), so the model runs request by request.
    await upload(inference, "nonzero", model_bytes(build_nonzero()), labels=BATCHING)
    for requests, expected in [
        ([np.array([1 + i, 2 + i], np.float32) for i in range(8)], [0, 1]),  # 16 rows in, 16 hits out
        ([np.array([0, 5 + i], np.float32) for i in range(8)], [1]),
    ]:
        calls = (inference.stub.Predict(predict_request("nonzero", {"x": x})) for x in requests)
        responses = await asyncio.gather(*calls)
        assert [outputs(r)["idx"].tolist() for r in responses] == [expected] * 8

    stats = await statistics(inference, "nonzero")
    # Not batchable, it has no batch dimension (V2: max_batch_size 0): each request counts as one inference.
    assert (stats.execution_count, stats.request_count, dict(stats.batch_sizes)) == (16, 16, {1: 16})


async def test_a_model_whose_batch_dimension_recurs_in_an_output_is_never_merged(inference: RunningInference):
    # gram = x @ x.T is [batch, batch]: a merged run would answer each caller a row of products with the other
    # callers' inputs, of the merged run's length.
    data = model_bytes(build_gram())
    await upload(inference, "gram", data, labels=BATCHING)
    requests = [np.random.default_rng(i).standard_normal((1 + i % 2, 4)).astype(np.float32) for i in range(16)]

    responses = await asyncio.gather(*(inference.stub.Predict(predict_request("gram", {"x": x})) for x in requests))

    for x, response in zip(requests, responses, strict=True):
        np.testing.assert_allclose(outputs(response)["gram"], run_alone(data, {"x": x})["gram"], rtol=1e-6)
    stats = await statistics(inference, "gram")
    assert (stats.execution_count, stats.request_count) == (16, 16)


async def test_a_merged_run_whose_outputs_have_no_row_per_input_row_stops_the_merging(
    inference: RunningInference, caplog: pytest.LogCaptureFixture
):
    # The output's first dimension is unnamed, so the signature does not tell; the first merged run whose outputs
    # do not add up does: its requests run alone, and so does every later one, whose rows might add up by chance.
    await upload(inference, "unnamed", model_bytes(build_nonzero(None)), labels=BATCHING)
    config = pb_oip.ModelConfigRequest(name="unnamed")
    assert (await inference.oip.ModelConfig(config)).config.HasField("dynamic_batching")
    with_zeros = [np.array([0, 1 + i], np.float32) for i in range(8)]  # 16 rows in, 8 hits out
    without = [np.array([1 + i, 2 + i], np.float32) for i in range(8)]  # 16 rows in, 16 hits out
    for requests, expected in [(with_zeros, [1]), (without, [0, 1]), (without, [0, 1])]:
        calls = (inference.stub.Predict(predict_request("unnamed", {"x": x})) for x in requests)
        responses = await asyncio.gather(*calls)
        assert [outputs(r)["idx"].tolist() for r in responses] == [expected] * 8

    warned = [r.getMessage() for r in caplog.records if "do not hold one row per input row" in r.getMessage()]
    assert len(warned) == 1, warned
    # V2 ModelConfig says so: each request may still carry up to max_batch_size rows, but none are merged.
    after = (await inference.oip.ModelConfig(config)).config
    assert (after.max_batch_size, after.HasField("dynamic_batching")) == (16, False)
    stats = await statistics(inference, "unnamed")
    assert (stats.request_count, stats.execution_count) == (24, 24)  # every request ran alone, the first 8 too


async def test_a_request_of_zero_rows_is_merged_and_counts_no_inference(inference: RunningInference):
    await upload(inference, "batched", IDENTITY, labels=BATCHING)
    await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("batched")))
    requests = [{"x": np.full((rows, 4), index, np.float32)} for index, rows in enumerate((2, 0, 3, 0))]

    responses = await asyncio.gather(*(inference.stub.Predict(predict_request("batched", f)) for f in requests))

    for feeds, response in zip(requests, responses, strict=True):
        np.testing.assert_array_equal(outputs(response)["y"], feeds["x"])
    stats = await statistics(inference, "batched")
    assert (stats.request_count, stats.inference_count) == (4, 5)
    assert sum(size * count for size, count in stats.batch_sizes.items()) == 5

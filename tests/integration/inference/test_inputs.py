"""Every kind of bad Predict request gets INVALID_ARGUMENT (or NOT_FOUND) with the input named, and the server
keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf import duration_pb2
from onnx import TensorProto, helper

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb2
from modelforge.registry.v1 import registry_pb2
from tests.fixtures.onnx_models import ModelFile, model_bytes
from tests.integration.inference.conftest import (
    RunningInference,
    failure,
    outputs,
    predict_request,
    ref,
    upload,
)
from tests.integration.inference.test_oip import infer_request, outputs_of, run_onnxruntime

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def reshape_to_2x2() -> onnx.ModelProto:
    """x float32 [n] -> y [2, 2]: passes any signature check, but ONNX Runtime refuses every n but 4."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [onnx.numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def filled(value: float = 1.0) -> onnx.ModelProto:
    """shape int64 [1] -> y float32 of that many elements: the request says how much the run allocates."""
    fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [value])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["y"], value=fill)],
        "filled",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
async def served(inference: RunningInference, mlp: ModelFile, multi_io: ModelFile, string_model: ModelFile):
    await upload(inference, "mlp", mlp)
    await upload(inference, "multi-io", multi_io)
    await upload(inference, "strings", string_model)
    await upload(inference, "reshape", model_bytes(reshape_to_2x2()))
    await upload(inference, "filled", model_bytes(filled()))
    return inference


def tensor(name: str, dtype: int, shape: list[int], raw: bytes = b"", strings: list[bytes] | None = None):
    return tensor_pb2.Tensor(name=name, dtype=dtype, shape=shape, raw_data=raw, string_data=strings or [])


F32 = tensor_pb2.DATA_TYPE_FLOAT32
MLP_INPUT = np.zeros((2, 64), dtype=np.float32)


CASES = {
    "missing input": ("multi-io", [tensors.to_tensor(np.zeros((1, 4), np.float32), "features")], "ids", "missing"),
    "unknown input": (
        "mlp",
        [tensors.to_tensor(MLP_INPUT, "input"), tensors.to_tensor(MLP_INPUT, "extra")],
        "extra",
        "no such input",
    ),
    "wrong dtype": ("mlp", [tensors.to_tensor(MLP_INPUT.astype(np.float64), "input")], "input", "dtype"),
    "wrong rank": ("mlp", [tensors.to_tensor(np.zeros(64, np.float32), "input")], "input", "rank 2"),
    "wrong fixed dimension": ("mlp", [tensors.to_tensor(np.zeros((2, 63), np.float32), "input")], "input", "64"),
    "byte length": ("mlp", [tensor("input", F32, [2, 64], b"\0" * 100)], "input", "512 bytes"),
    "dtype unset": ("mlp", [tensor("input", tensor_pb2.DATA_TYPE_UNSPECIFIED, [2, 64], b"\0" * 512)], "input", "dtype"),
    "negative dimension": ("mlp", [tensor("input", F32, [-2, 64])], "input", "negative"),
    "given twice": (
        "mlp",
        [tensors.to_tensor(MLP_INPUT, "input"), tensors.to_tensor(MLP_INPUT, "input")],
        "input",
        "twice",
    ),
    "number for a string input": ("strings", [tensors.to_tensor(np.zeros(2, np.float32), "text")], "text", "string"),
    "string that is not UTF-8": (
        "strings",
        [tensor("text", tensor_pb2.DATA_TYPE_STRING, [1], strings=[b"\xff\xfe"])],
        "text",
        "UTF-8",
    ),
    "strings in raw_data": ("strings", [tensor("text", tensor_pb2.DATA_TYPE_STRING, [1], b"abc")], "text", "string"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_invalid_argument_naming_it(served: RunningInference, case: str):
    model, inputs, culprit, words = CASES[case]
    request = inference_pb2.PredictRequest(ref=ref(model), inputs=inputs)

    code, reason, details = await failure(served.stub.Predict(request))

    assert code == INVALID, details
    assert reason == "INVALID_INPUT"
    assert repr(culprit) in details
    assert words in details


async def test_request_over_the_size_limit_is_invalid_argument(start_inference, mlp: ModelFile):
    async with start_inference(max_request_bytes=1024) as running:
        await upload(running, "mlp", mlp)
        request = predict_request("mlp", {"input": np.zeros((8, 64), np.float32)})  # 2048 bytes

        code, reason, details = await failure(running.stub.Predict(request))

        assert (code, reason) == (INVALID, "REQUEST_TOO_LARGE")
        assert "MODELFORGE_MAX_REQUEST_BYTES" in details


async def test_request_a_little_over_the_size_limit_is_refused_by_the_service_not_the_transport(
    start_inference, mlp: ModelFile
):
    # max_message_bytes equal to max_request_bytes: the receive limit still leaves room above the request limit.
    limit = 64 * 1024
    async with start_inference(max_request_bytes=limit, max_message_bytes=limit, chunk_bytes=limit // 2) as running:
        await upload(running, "mlp", mlp)
        over = predict_request("mlp", {"input": np.zeros((288, 64), np.float32)})  # 73728 bytes of input

        code, reason, details = await failure(running.stub.Predict(over))

        assert (code, reason) == (INVALID, "REQUEST_TOO_LARGE"), details
        assert f"add up to {288 * 64 * 4} bytes, more than this server's limit of {limit}" in details
        assert "MODELFORGE_MAX_REQUEST_BYTES" in details
        # Past the limit plus its headroom (1 MiB here), the transport refuses the message before the service.
        huge = predict_request("mlp", {"input": np.zeros((5000, 64), np.float32)})  # 1280000 bytes of input
        code, _, details = await failure(running.stub.Predict(huge))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


async def test_outputs_too_large_for_one_answer_are_refused_counted_as_failures_and_streamed(start_inference):
    limit = 256 * 1024
    async with start_inference(max_message_bytes=limit, chunk_bytes=limit // 4) as running:
        await upload(running, "filled", model_bytes(filled()))
        big = {"shape": np.array([limit // 4], np.int64)}  # `limit` bytes of output: over it with the answer's fields
        small = {"shape": np.array([16], np.int64)}

        code, reason, details = await failure(running.stub.Predict(predict_request("filled", big)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE"), details
        assert f"more than the {limit} one answer may carry" in details
        assert "PredictStream" in details and "MODELFORGE_MAX_MESSAGE_BYTES" in details

        code, reason, details = await failure(running.oip.ModelInfer(infer_request("filled", big)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE"), details

        async def requests() -> AsyncIterator[oip_pb2.ModelInferRequest]:
            yield infer_request("filled", big, id="big")
            yield infer_request("filled", small, id="small")

        # On a V2 stream the refusal is answered in-band and the stream goes on.
        answers = [answer async for answer in running.oip.ModelStreamInfer(requests())]
        assert [answer.infer_response.id for answer in answers] == ["big", "small"]
        assert "MODELFORGE_MAX_MESSAGE_BYTES" in answers[0].error_message
        assert answers[1].error_message == ""
        np.testing.assert_array_equal(outputs_of(answers[1].infer_response)["y"], np.ones(16, np.float32))

        # PredictStream sends the same output in chunks.
        received = bytearray()
        async for message in running.stub.PredictStream(
            inference_pb2.PredictStreamRequest(
                ref=ref("filled"), inputs=[tensors.to_tensor(array, name) for name, array in big.items()]
            )
        ):
            if message.WhichOneof("content") == "chunk":
                received += message.chunk.data
        np.testing.assert_array_equal(np.frombuffer(received, np.float32), np.ones(limit // 4, np.float32))

        statistics = await running.stub.GetModelStatistics(inference_pb2.GetModelStatisticsRequest(ref=ref("filled")))
        (stats,) = statistics.model_statistics
        assert (stats.failure_count, stats.request_count) == (3, 2)  # the refused three ran, but answered nothing


async def test_outputs_the_signature_shows_too_large_are_refused_before_the_model_runs(
    start_inference, image_generator: ModelFile
):
    limit = 2 * 1024 * 1024
    async with start_inference(max_message_bytes=limit, chunk_bytes=limit // 4) as running:
        await upload(running, "painter", image_generator)
        latent = {"latent": np.zeros((1, 16), np.float32)}  # [1, 3, 512, 512] float32: 3 MiB, known from the shapes

        code, reason, details = await failure(running.stub.Predict(predict_request("painter", latent)))

        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE"), details
        assert f"come to at least {3 * 512 * 512 * 4} bytes as its signature declares them" in details
        statistics = await running.stub.GetModelStatistics(inference_pb2.GetModelStatisticsRequest(ref=ref("painter")))
        (stats,) = statistics.model_statistics
        assert (stats.failure_count, stats.execution_count) == (1, 0)  # refused without a run


async def test_an_output_too_large_for_the_answer_is_answered_when_it_is_asked_for_as_its_top_classes(
    start_inference, image_generator: ModelFile
):
    limit = 2 * 1024 * 1024
    async with start_inference(max_message_bytes=limit, chunk_bytes=limit // 4) as running:
        await upload(running, "painter", image_generator)
        latent = {"latent": np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)}
        request = infer_request("painter", latent)
        output = request.outputs.add(name="image")
        output.parameters["classification"].int64_param = 3

        answer = await running.oip.ModelInfer(request)  # its 3 MiB image is never sent, its top 3 elements are

        image = run_onnxruntime(image_generator, latent)["image"].reshape(-1)
        top = np.argsort(-image, kind="stable")[:3]
        assert outputs_of(answer)["image"].tolist() == [f"{image[i]:f}:{i}".encode() for i in top]
        del request.outputs[:]
        code, reason, _ = await failure(running.oip.ModelInfer(request))  # the image itself does not fit
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE")


async def test_unknown_output_is_invalid_argument(served: RunningInference):
    request = predict_request("mlp", {"input": MLP_INPUT}, output_names=["nope"])

    code, reason, details = await failure(served.stub.Predict(request))

    assert (code, reason) == (INVALID, "UNKNOWN_OUTPUT")
    assert "'nope'" in details and "'output'" in details


async def test_onnxruntime_refusing_the_input_is_invalid_argument(served: RunningInference):
    request = predict_request("reshape", {"x": np.zeros(5, np.float32)})

    code, reason, details = await failure(served.stub.Predict(request))

    assert (code, reason) == (INVALID, "MODEL_RUN_FAILED")
    assert "reshape:1" in details
    # Its warmup (one zero) failed too, and nothing has run since: the message says the model may be at fault.
    assert "has completed no run on any input since it loaded" in details
    good = await served.stub.Predict(predict_request("reshape", {"x": np.arange(4, dtype=np.float32)}))
    assert outputs(good)["y"].shape == (2, 2)
    code, reason, details = await failure(served.stub.Predict(request))
    assert (code, reason) == (INVALID, "MODEL_RUN_FAILED")
    assert "since it loaded" not in details
    statistics = await served.stub.GetModelStatistics(inference_pb2.GetModelStatisticsRequest(ref=ref("reshape")))
    (stats,) = statistics.model_statistics
    # As Triton counts: the failed runs are failures, not executions or inferences.
    assert (stats.request_count, stats.failure_count) == (1, 2)
    assert (stats.execution_count, stats.inference_count, dict(stats.batch_sizes)) == (1, 1, {1: 1})


async def test_requests_refused_as_their_tensors_are_decoded_count_as_failures(served: RunningInference):
    await served.stub.Predict(predict_request("mlp", {"input": MLP_INPUT}))
    short = predict_request("mlp", {"input": MLP_INPUT})
    short.inputs[0].raw_data = short.inputs[0].raw_data[:-4]  # a byte short of its shape

    code, reason, details = await failure(served.stub.Predict(short))
    assert (code, reason) == (INVALID, "INVALID_INPUT"), details
    stream = inference_pb2.PredictStreamRequest(ref=short.ref, inputs=short.inputs)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in served.stub.PredictStream(stream):
            pass
    assert refused.value.code() == INVALID

    statistics = await served.stub.GetModelStatistics(inference_pb2.GetModelStatisticsRequest(ref=ref("mlp")))
    (stats,) = statistics.model_statistics
    assert (stats.request_count, stats.failure_count) == (1, 2)


async def test_a_run_that_cannot_allocate_is_resource_exhausted(served: RunningInference):
    request = predict_request("filled", {"shape": np.array([1 << 40], np.int64)})  # 4 TiB of float32

    code, reason, details = await failure(served.stub.Predict(request))

    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_RUN_OUT_OF_MEMORY")
    assert "filled:1 ran out of memory" in details and "fewer or smaller items" in details
    good = await served.stub.Predict(predict_request("filled", {"shape": np.array([3], np.int64)}))
    np.testing.assert_array_equal(outputs(good)["y"], np.ones(3, np.float32))


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (registry_pb2.ModelRef(), INVALID),
        (registry_pb2.ModelRef(name="Not A Name"), INVALID),
        (registry_pb2.ModelRef(name="mlp", alias="NOPE!"), INVALID),
        (registry_pb2.ModelRef(name="nope"), grpc.StatusCode.NOT_FOUND),
        (registry_pb2.ModelRef(name="mlp", version=99), grpc.StatusCode.NOT_FOUND),
        (registry_pb2.ModelRef(name="mlp", alias="missing"), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_refs(served: RunningInference, target: registry_pb2.ModelRef, code: grpc.StatusCode):
    got, _, details = await failure(served.stub.Predict(predict_request(target, {"input": MLP_INPUT})))

    assert got == code, details


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"priority": -1}, "INVALID_PRIORITY"),
        ({"cache_mode": 42}, "INVALID_ARGUMENT"),
        ({}, "INVALID_INPUT"),
        ({"timeout": duration_pb2.Duration(seconds=-1)}, "INVALID_TIMEOUT"),
        ({"timeout": duration_pb2.Duration(seconds=1, nanos=-5)}, "INVALID_ARGUMENT"),
        ({"timeout": duration_pb2.Duration(nanos=1_000_000_000)}, "INVALID_ARGUMENT"),
        ({"timeout": duration_pb2.Duration(seconds=315_576_000_001)}, "INVALID_ARGUMENT"),
    ],
    ids=[
        "negative priority",
        "unknown cache mode",
        "no inputs",
        "negative timeout",
        "timeout of mixed signs",
        "timeout nanos of a second",
        "timeout past Duration's range",
    ],
)
async def test_bad_request_fields_are_invalid_argument(served: RunningInference, fields: dict, reason: str):
    inputs = {} if not fields else {"input": MLP_INPUT}
    code, got, details = await failure(served.stub.Predict(predict_request("mlp", inputs, **fields)))

    assert (code, got) == (INVALID, reason), details


async def test_server_keeps_serving_after_bad_inputs(served: RunningInference):
    for case in CASES.values():
        model, inputs, _, _ = case
        await failure(served.stub.Predict(inference_pb2.PredictRequest(ref=ref(model), inputs=inputs)))

    response = await served.stub.Predict(predict_request("mlp", {"input": MLP_INPUT}))

    assert outputs(response)["output"].shape == (2, 8)

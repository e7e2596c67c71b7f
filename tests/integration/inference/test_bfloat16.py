"""bfloat16 through both APIs: inputs and outputs travel as uint16 bit patterns and reach ONNX Runtime as
bfloat16, on a graph built here that returns its input unchanged and cast to float32."""

from __future__ import annotations

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb
from tests.fixtures.onnx_models import build_identity, model_bytes
from tests.integration.inference.conftest import RunningInference, upload

VALUES = np.array([[1.0, -2.5, 0.15625], [32768.0, -0.0, 7.0]], dtype=np.float32)
BITS = (VALUES.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16
BF16 = tensor_pb2.DATA_TYPE_BFLOAT16


def bfloat16_model() -> bytes:
    """x bfloat16 [n, 3] -> same bfloat16 [n, 3] (Identity), wide float32 [n, 3] (Cast)."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["same"]),
            helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT),
        ],
        "bfloat16_identity",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 3])],
        [
            helper.make_tensor_value_info("same", TensorProto.BFLOAT16, ["n", 3]),
            helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["n", 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("batching", ["0", "8"])
async def test_predict_takes_and_returns_bfloat16(inference: RunningInference, batching: str):
    await upload(inference, "bf16", bfloat16_model(), labels={"modelforge.io/max-batch-size": batching})
    request = pb.PredictRequest(
        ref={"name": "bf16"}, inputs=[tensors.to_tensor(BITS, "x", dtype=BF16)], output_names=["same", "wide"]
    )

    response = await inference.stub.Predict(request)

    same, wide = response.outputs
    assert (same.name, same.dtype, list(same.shape)) == ("same", BF16, [2, 3])
    np.testing.assert_array_equal(tensors.to_numpy(same), BITS)
    assert wide.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(tensors.to_numpy(wide), VALUES)

    streamed = [
        m
        async for m in inference.stub.PredictStream(
            pb.PredictStreamRequest(ref={"name": "bf16"}, inputs=request.inputs)
        )
    ]
    header = {o.name: o.dtype for o in streamed[0].header.outputs}
    assert header == {"same": BF16, "wide": tensor_pb2.DATA_TYPE_FLOAT32}


async def test_v2_infer_takes_and_returns_bf16(inference: RunningInference):
    await upload(inference, "bf16", bfloat16_model())
    metadata = await inference.oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="bf16"))
    assert [(t.name, t.datatype) for t in metadata.inputs] == [("x", "BF16")]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("same", "BF16"), ("wide", "FP32")]
    request = oip_pb.ModelInferRequest(
        model_name="bf16",
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="x", datatype="BF16", shape=[2, 3])],
        raw_input_contents=[BITS.tobytes()],
    )

    response = await inference.oip.ModelInfer(request)

    same, wide = response.outputs
    assert (same.name, same.datatype, list(same.shape)) == ("same", "BF16", [2, 3])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<u2").reshape(2, 3), BITS)
    assert (wide.name, wide.datatype) == ("wide", "FP32")
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 3), VALUES)


async def test_a_uint16_input_refuses_bfloat16_through_both_apis(inference: RunningInference):
    await upload(inference, "u16", model_bytes(build_identity(TensorProto.UINT16)))
    bits = np.zeros((1, 4), np.uint16)
    predict = pb.PredictRequest(ref={"name": "u16"}, inputs=[tensors.to_tensor(bits, "x", dtype=BF16)])
    infer = oip_pb.ModelInferRequest(
        model_name="u16",
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="x", datatype="BF16", shape=[1, 4])],
        raw_input_contents=[bits.tobytes()],
    )

    for call in (inference.stub.Predict(predict), inference.oip.ModelInfer(infer)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected dtype uint16, got bfloat16" in (caught.value.details() or "")

    # The same bits declared UINT16 are what the input takes.
    predict.inputs[0].dtype = tensor_pb2.DATA_TYPE_UINT16
    infer.inputs[0].datatype = "UINT16"
    assert list((await inference.stub.Predict(predict)).outputs[0].shape) == [1, 4]
    assert list((await inference.oip.ModelInfer(infer)).outputs[0].shape) == [1, 4]

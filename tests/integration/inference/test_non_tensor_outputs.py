"""Models with outputs that are not tensors: their tensor outputs are served, the others refused by name; a model
whose inputs are not all tensors fails to load.

The common case is a scikit-learn classifier converted by skl2onnx with its default ZipMap: ``output_label`` is an
int64 tensor, ``output_probability`` a sequence of maps. The registry stores such an output with dtype UNSPECIFIED;
the inference service leaves it out of the signature and never asks ONNX Runtime for it.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from modelforge.inference.v1 import inference_pb2
from modelforge.oip.v2 import grpc_service_pb2 as pb
from modelforge_registry.settings import RegistrySettings
from tests.fixtures.onnx_models import (
    build_sequence_input,
    build_sequence_output,
    build_string_and_bfloat16,
    model_bytes,
)
from tests.fixtures.servers import registry_settings_for
from tests.integration.inference.conftest import RunningInference, failure, outputs, predict_request, ref, upload

# Two clusters around (0.5, 0.5) and (2.5, 2.5): any fit separates them, so sklearn's labels are stable.
FEATURES = np.array(
    [[0, 0], [0, 1], [1, 0], [1, 1], [2, 2], [2, 3], [3, 2], [3, 3], [0.2, 0.4], [2.8, 2.6]], dtype=np.float32
)
TARGETS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1], dtype=np.int64)
QUERY = np.array([[0.1, 0.3], [2.9, 3.1], [1.0, 1.2], [2.1, 1.9], [-1.0, 0.0]], dtype=np.float32)


@pytest.fixture
def registry_settings(clean_db: str, tmp_path: Path) -> RegistrySettings:
    """These tests' registry stores models the inference service cannot serve (MODELFORGE_RUNTIME_CHECK=false): what
    an inference replica does with such a version is under test here."""
    return registry_settings_for(clean_db, tmp_path / "registry", runtime_check=False)


@pytest.fixture(scope="module")
def classifier() -> tuple[LogisticRegression, bytes]:
    """A fitted LogisticRegression and its skl2onnx conversion with the default ZipMap output."""
    fitted = LogisticRegression().fit(FEATURES, TARGETS)
    converted = to_onnx(fitted, FEATURES[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    assert isinstance(converted, onnx.ModelProto)
    assert [output.name for output in converted.graph.output] == ["output_label", "output_probability"]
    assert converted.graph.output[1].type.WhichOneof("value") == "sequence_type"  # the ZipMap
    return fitted, converted.SerializeToString()


def onnxruntime_label(data: bytes, features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    label, _probabilities = session.run(None, {"X": features})
    return np.asarray(label)


async def test_predict_serves_the_label_of_a_zipmap_classifier(
    inference: RunningInference, classifier: tuple[LogisticRegression, bytes]
):
    fitted, data = classifier
    await upload(inference, "iris-like", data)

    response = await inference.stub.Predict(predict_request("iris-like", {"X": QUERY}))

    got = outputs(response)
    assert list(got) == ["output_label"]
    assert got["output_label"].dtype == np.int64
    np.testing.assert_array_equal(got["output_label"], onnxruntime_label(data, QUERY))
    np.testing.assert_array_equal(got["output_label"], fitted.predict(QUERY))


async def test_predict_naming_the_zipmap_output_is_invalid_argument(
    inference: RunningInference, classifier: tuple[LogisticRegression, bytes]
):
    await upload(inference, "iris-like", classifier[1])

    request = predict_request("iris-like", {"X": QUERY}, output_names=["output_probability"])
    code, reason, details = await failure(inference.stub.Predict(request))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "UNKNOWN_OUTPUT"
    assert "'output_probability'" in details
    assert "sequence or map" in details
    assert "'output_label'" in details  # what can be asked for instead


async def test_predict_naming_the_label_next_to_the_zipmap_output_is_still_refused(
    inference: RunningInference, classifier: tuple[LogisticRegression, bytes]
):
    await upload(inference, "iris-like", classifier[1])

    request = predict_request("iris-like", {"X": QUERY}, output_names=["output_label", "output_probability"])
    code, reason, details = await failure(inference.stub.Predict(request))

    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_OUTPUT")
    assert "output 'output_probability' is a sequence or map" in details


async def test_v2_model_infer_serves_the_label_and_refuses_the_zipmap_output(
    inference: RunningInference, classifier: tuple[LogisticRegression, bytes]
):
    fitted, data = classifier
    await upload(inference, "iris-like", data)
    tensor = pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=QUERY.shape)
    request = pb.ModelInferRequest(model_name="iris-like", inputs=[tensor], raw_input_contents=[QUERY.tobytes()])

    response = await inference.oip.ModelInfer(request)

    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [("output_label", "INT64", [5])]
    label = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    np.testing.assert_array_equal(label, onnxruntime_label(data, QUERY))
    np.testing.assert_array_equal(label, fitted.predict(QUERY))

    request.outputs.add(name="output_probability")
    code, reason, details = await failure(inference.oip.ModelInfer(request))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_OUTPUT")
    assert "output 'output_probability' is a sequence or map" in details


async def test_v2_metadata_lists_the_tensor_outputs_only(
    inference: RunningInference, classifier: tuple[LogisticRegression, bytes]
):
    await upload(inference, "iris-like", classifier[1])

    metadata = await inference.oip.ModelMetadata(pb.ModelMetadataRequest(name="iris-like"))

    assert [(t.name, t.datatype) for t in metadata.outputs] == [("output_label", "INT64")]
    assert [(t.name, t.datatype) for t in metadata.inputs] == [("X", "FP32")]


async def test_model_without_tensor_outputs_fails_to_load_with_failed_precondition(inference: RunningInference):
    await upload(inference, "sequence-only", model_bytes(build_sequence_output()))
    features = np.zeros((1, 2), dtype=np.float32)

    code, reason, details = await failure(inference.stub.Predict(predict_request("sequence-only", {"x": features})))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    assert "no output that is a tensor" in details
    assert "'items'" in details

    load = inference_pb2.LoadModelRequest(ref=ref("sequence-only"))
    code, reason, _details = await failure(inference.stub.LoadModel(load))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")


async def test_model_with_a_sequence_input_fails_to_load_with_failed_precondition(inference: RunningInference):
    await upload(inference, "sequence-input", model_bytes(build_sequence_input()))

    load = inference_pb2.LoadModelRequest(ref=ref("sequence-input"))
    code, reason, details = await failure(inference.stub.LoadModel(load))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    assert "'items' (seq(tensor(float)))" in details and "not tensors" in details

    # A prediction feeding it is told the same, not that the model has no such input.
    x = np.ones((1, 2), np.float32)
    for call in (
        inference.stub.Predict(predict_request("sequence-input", {"items": x})),
        inference.oip.ModelInfer(
            pb.ModelInferRequest(
                model_name="sequence-input",
                inputs=[pb.ModelInferRequest.InferInputTensor(name="items", datatype="FP32", shape=[1, 2])],
                raw_input_contents=[x.tobytes()],
            )
        ),
    ):
        code, reason, details = await failure(call)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
        assert "'items'" in details and "not tensors ModelForge serves" in details


async def test_a_model_no_request_can_feed_is_listed_failed_with_why_once_asked_for(inference: RunningInference):
    """A prediction refuses such a version from its signature, before any load; ListLoadedModels and V2
    RepositoryIndex then list it FAILED with the reason, as they list a version whose load failed."""
    await upload(inference, "sequence-input", model_bytes(build_sequence_input()))
    x = np.ones((1, 2), np.float32)
    code, reason, _ = await failure(inference.stub.Predict(predict_request("sequence-input", {"items": x})))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")

    (entry,) = (await inference.stub.ListLoadedModels(inference_pb2.ListLoadedModelsRequest())).loaded_models
    assert (entry.model, entry.version, entry.state) == ("sequence-input", 1, inference_pb2.LOADED_MODEL_STATE_FAILED)
    assert "not tensors ModelForge serves" in entry.reason
    index = await inference.oip.RepositoryIndex(pb.RepositoryIndexRequest())
    [listed] = [model for model in index.models if model.name == "sequence-input"]
    assert (listed.version, listed.state) == ("1", "UNAVAILABLE")
    assert "not tensors ModelForge serves" in listed.reason


async def test_a_model_with_string_inputs_and_bfloat16_outputs_fails_to_load_with_failed_precondition(
    inference: RunningInference,
):
    await upload(inference, "text-and-bf16", model_bytes(build_string_and_bfloat16()))
    load = inference_pb2.LoadModelRequest(ref=ref("text-and-bf16"))
    code, reason, details = await failure(inference.stub.LoadModel(load))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    assert "a model with string inputs and bfloat16 outputs cannot be served" in details

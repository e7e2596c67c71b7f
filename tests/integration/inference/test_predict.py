"""Predict over real gRPC: outputs equal ONNX Runtime's own, for every kind of fixture model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import duration_pb2

from modelforge.inference.v1 import inference_pb2
from modelforge.registry.v1 import registry_pb2
from tests.fixtures.onnx_models import ModelFile
from tests.integration.inference.conftest import RunningInference, outputs, predict_request, ref, upload


def reference(model: ModelFile, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("fixture", ["mlp", "cnn", "multi_io", "string_model"])
async def test_outputs_equal_onnxruntime(inference: RunningInference, fixture: str, request: pytest.FixtureRequest):
    model: ModelFile = request.getfixturevalue(fixture)
    name = fixture.replace("_", "-")
    version = await upload(inference, name, model)
    feeds = model.sample(batch=3, seed=7)

    response = await inference.stub.Predict(predict_request(name, feeds))

    assert (response.model, response.version, response.sha256) == (name, version.version, model.sha256)
    assert not response.cache_hit
    got = outputs(response)
    want = reference(model, feeds)
    assert list(got) == list(want)
    for key, expected in want.items():
        if expected.dtype == object:
            assert [x.decode() for x in got[key].reshape(-1)] == list(expected.reshape(-1))
        else:
            assert got[key].dtype == expected.dtype
            np.testing.assert_array_equal(got[key], expected)
    assert response.timings.total.ToTimedelta() >= response.timings.compute.ToTimedelta()


async def test_requested_outputs_only(inference: RunningInference, multi_io: ModelFile):
    await upload(inference, "multi-io", multi_io)
    feeds = multi_io.sample(batch=2)

    response = await inference.stub.Predict(predict_request("multi-io", feeds, output_names=["id_sum"]))

    assert [t.name for t in response.outputs] == ["id_sum"]
    np.testing.assert_array_equal(outputs(response)["id_sum"], reference(multi_io, feeds)["id_sum"])


async def test_version_alias_and_latest_select_their_versions(inference: RunningInference, add_one: ModelFile):
    first = await upload(inference, "pick", add_one)
    second = await upload(inference, "pick", add_one, labels={"note": "second"})
    await inference.registry_stub.SetAlias(
        registry_pb2.SetAliasRequest(model="pick", alias="production", version=first.version)
    )
    feeds = add_one.sample(batch=1)

    by_number = await inference.stub.Predict(predict_request(ref("pick", version=2), feeds))
    by_alias = await inference.stub.Predict(predict_request(ref("pick", alias="production"), feeds))
    latest = await inference.stub.Predict(predict_request("pick", feeds))

    assert (by_number.version, by_alias.version, latest.version) == (second.version, first.version, second.version)


async def test_priority_and_timeout_fields_are_accepted(inference: RunningInference, add_one: ModelFile):
    await upload(inference, "add-one", add_one)
    feeds = add_one.sample(batch=2)
    timeout = duration_pb2.Duration(seconds=5)
    request = predict_request("add-one", feeds, priority=1, timeout=timeout, cache_mode=inference_pb2.CACHE_MODE_BYPASS)

    response = await inference.stub.Predict(request)

    np.testing.assert_array_equal(outputs(response)["y"], feeds["x"] + 1)

"""The test models themselves: each loads in ONNX Runtime and computes what it claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import DecodeError

from modelforge import tensors
from modelforge._refs import validate_model_name
from tests.fixtures import onnx_models
from tests.fixtures.onnx_models import ModelFile

# fixture name -> {output name: (shape for a batch of 3, numpy dtype)}
EXPECTED: dict[str, dict[str, tuple[tuple[int, ...], type]]] = {
    "mlp": {"output": ((3, 8), np.float32)},
    "cnn": {"logits": ((3, 10), np.float32)},
    "multi_io": {"scores": ((3, 3), np.float32), "id_sum": ((3, 1), np.int64)},
    "string_model": {"label_id": ((3,), np.int64), "label": ((3,), np.object_)},
    "image_generator": {"image": ((3, 3, 512, 512), np.float32)},
    "add_one": {"y": ((3, 4), np.float32)},
    "fixed_shape": {"y": ((1, 4), np.float32)},
    "heavy": {"y": ((3, 512), np.float32)},
}


def session(source: ModelFile | onnx.ModelProto) -> ort.InferenceSession:
    data = source.data if isinstance(source, ModelFile) else onnx_models.model_bytes(source)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(model: ModelFile, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_model_runs_with_expected_outputs(fixture: str, request: pytest.FixtureRequest) -> None:
    model: ModelFile = request.getfixturevalue(fixture)
    assert model.path.read_bytes() == model.data
    assert model.size < 1_000_000
    assert validate_model_name(model.name) == model.name
    onnx.checker.check_model(str(model.path), full_check=True)
    outputs = run(model, model.sample(3))
    got = {name: (value.shape, value.dtype) for name, value in outputs.items()}
    assert got == {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in EXPECTED[fixture].items()}


@pytest.mark.parametrize("fixture", ["mlp", "cnn", "multi_io", "string_model", "image_generator", "add_one", "heavy"])
def test_batched_models_have_a_dynamic_leading_dimension(fixture: str, request: pytest.FixtureRequest) -> None:
    model: ModelFile = request.getfixturevalue(fixture)
    graph = onnx.load_from_string(model.data).graph
    for value in [*graph.input, *graph.output]:
        spec = tensors.spec_from_value_info(value)
        assert spec.shape[0] == -1
        assert spec.dim_names[0] == "batch"


def test_fixed_shape_has_no_dynamic_dimension(fixed_shape: ModelFile) -> None:
    graph = onnx.load_from_string(fixed_shape.data).graph
    specs = [tensors.spec_from_value_info(v) for v in [*graph.input, *graph.output]]
    assert [list(s.shape) for s in specs] == [[1, 4], [1, 4]]
    x = fixed_shape.sample()["x"]
    np.testing.assert_array_equal(run(fixed_shape, {"x": x})["y"], 2 * x)


def test_builders_are_deterministic() -> None:
    for build in (
        onnx_models.build_mlp,
        onnx_models.build_cnn,
        onnx_models.build_multi_io,
        onnx_models.build_string_model,
        onnx_models.build_image_generator,
        onnx_models.build_heavy,
    ):
        assert onnx_models.model_bytes(build()) == onnx_models.model_bytes(build())
    assert onnx_models.model_bytes(onnx_models.build_mlp(seed=1)) != onnx_models.model_bytes(onnx_models.build_mlp())


def test_mlp_matches_numpy(mlp: ModelFile) -> None:
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(mlp.data).graph.initializer}
    x = mlp.sample(5)["input"]
    h = np.maximum(x @ weights["w0"] + weights["b0"], 0)
    h = np.maximum(h @ weights["w1"] + weights["b1"], 0)
    expected = h @ weights["w2"] + weights["b2"]
    np.testing.assert_allclose(run(mlp, {"input": x})["output"], expected, rtol=1e-4, atol=1e-5)


def test_add_one_and_multi_io_compute_what_they_claim(add_one: ModelFile, multi_io: ModelFile) -> None:
    x = add_one.sample(4)["x"]
    np.testing.assert_array_equal(run(add_one, {"x": x})["y"], x + 1)
    feeds = multi_io.sample(4)
    np.testing.assert_array_equal(run(multi_io, feeds)["id_sum"], feeds["ids"].sum(axis=1, keepdims=True))


def test_string_model_maps_text_through_the_tensor_codec(string_model: ModelFile) -> None:
    """Bytes as clients send them -> Tensor -> str for ONNX Runtime -> str outputs -> Tensor -> bytes."""
    sent = tensors.to_tensor(np.array([b"dog", b"fish", "bird", b""], dtype=object), "text")
    outputs = run(string_model, {"text": tensors.to_numpy(sent, text=True)})
    np.testing.assert_array_equal(outputs["label_id"], [1, -1, 2, -1])
    back = tensors.to_numpy(tensors.to_tensor(outputs["label"], "label"))
    assert back.tolist() == [b"DOG", b"UNKNOWN", b"BIRD", b"UNKNOWN"]


def test_image_generator_output_is_3_mib_per_item(image_generator: ModelFile) -> None:
    image = run(image_generator, image_generator.sample(1))["image"]
    assert image.nbytes == 3 * 1024 * 1024
    assert float(image.min()) > 0.0 and float(image.max()) < 1.0


@pytest.mark.parametrize(
    "elem_type",
    [onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL, onnx.TensorProto.UINT8, onnx.TensorProto.STRING],
)
def test_identity_for_other_dtypes(elem_type: int) -> None:
    model = onnx_models.build_identity(elem_type, ["batch"])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    x = np.array(["a", "b"], dtype=object) if elem_type == onnx.TensorProto.STRING else np.ones(2, dtype)
    np.testing.assert_array_equal(session(model).run(None, {"x": x})[0], x)


def test_not_onnx_is_refused(not_onnx: ModelFile) -> None:
    with pytest.raises(DecodeError):
        onnx.load_from_string(not_onnx.data)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidProtobuf):
        ort.InferenceSession(not_onnx.data)


def test_truncated_onnx_is_refused(truncated_onnx: ModelFile, mlp: ModelFile) -> None:
    assert mlp.data.startswith(truncated_onnx.data)
    assert 0 < truncated_onnx.size < mlp.size
    with pytest.raises(DecodeError):
        onnx.load_from_string(truncated_onnx.data)


def test_external_data_escape_is_refused(external_data_escape: ModelFile) -> None:
    model = onnx.load_from_string(external_data_escape.data)  # parses: the escape is only a path in it
    [weight] = model.graph.initializer
    assert weight.data_location == onnx.TensorProto.EXTERNAL
    assert {e.key: e.value for e in weight.external_data}["location"] == "../../etc/passwd"
    with pytest.raises(onnx.checker.ValidationError, match="points outside the directory"):
        onnx.checker.check_model(str(external_data_escape.path))
    with pytest.raises(onnx.checker.ValidationError, match="points outside the directory"):
        onnx.load(str(external_data_escape.path))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="escapes model directory"):
        ort.InferenceSession(str(external_data_escape.path))


def test_external_data_inside_the_model_directory_is_valid(external_data_model: ModelFile, mlp: ModelFile) -> None:
    weights = external_data_model.path.with_name("weights.bin")
    assert sorted(p.name for p in external_data_model.path.parent.iterdir()) == ["model.onnx", "weights.bin"]
    assert weights.stat().st_size > external_data_model.size
    onnx.checker.check_model(str(external_data_model.path))
    x = mlp.sample(2)["input"]
    sess = ort.InferenceSession(str(external_data_model.path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], run(mlp, {"input": x})["output"])


def test_write_model_creates_directories(tmp_path: Path) -> None:
    path = onnx_models.write_model(onnx_models.build_add_one(), tmp_path / "a" / "b" / "m.onnx")
    assert onnx.load(str(path)).graph.name == "add_one"

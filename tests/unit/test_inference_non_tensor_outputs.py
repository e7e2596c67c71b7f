"""Outputs that are not tensors, without servers: left out of the signature and of every ONNX Runtime run,
refused by name when a request asks for one, and a model with no tensor output refused at load."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from modelforge.common.v1 import tensor_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_inference.domain import SessionConfig, Signature, TensorSpec
from modelforge_inference.errors import NonTensorOutput, UnknownOutput
from modelforge_inference.registry_client import resolved_model, signature
from modelforge_inference.sessions import ModelSession
from modelforge_inference.signature import check_outputs
from modelforge_server.errors import InvalidArgument
from tests.fixtures.onnx_models import build_sequence_output, write_model

# The registry's record of a skl2onnx classifier with its default ZipMap.
CLASSIFIER = registry_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="X", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[-1, 2], dim_names=["", ""])],
    outputs=[
        tensor_pb2.TensorSpec(name="output_label", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[-1], dim_names=[""]),
        tensor_pb2.TensorSpec(name="output_probability", dtype=tensor_pb2.DATA_TYPE_UNSPECIFIED),
    ],
)


def zipmap_model(tmp_path: Path) -> Path:
    """``x`` [batch, 2] float -> ``y`` = x (a tensor) and ``probabilities`` = ZipMap(x) (a sequence of maps)."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("ZipMap", ["x"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]),
        ],
        "zipmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_value_info(
                "probabilities",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
                ),
            ),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    return write_model(helper.make_model(graph, opset_imports=opsets, ir_version=8), tmp_path / "zipmap.onnx")


# -- the signature from the registry ---------------------------------------------------------------------------


def test_an_unspecified_output_is_left_out_of_the_signature_and_named_as_not_a_tensor() -> None:
    converted = signature(CLASSIFIER)

    assert [spec.name for spec in converted.inputs] == ["X"]
    assert converted.outputs == (
        TensorSpec("output_label", np.dtype(np.int64), (-1,), ("",), ort_type="tensor(int64)"),
    )
    assert converted.non_tensor_outputs == ("output_probability",)
    assert converted.batchable  # judged on the tensor outputs alone


def test_a_version_with_a_non_tensor_output_resolves() -> None:
    version = registry_pb2.ModelVersion(model="classifier", version=2, sha256="ab" * 32, signature=CLASSIFIER)

    model = resolved_model(version)

    assert [spec.name for spec in model.signature.outputs] == ["output_label"]
    assert model.signature.non_tensor_outputs == ("output_probability",)


def test_a_signature_of_tensors_only_names_no_non_tensor_output() -> None:
    tensors_only = registry_pb2.Signature(inputs=CLASSIFIER.inputs, outputs=CLASSIFIER.outputs[:1])

    assert signature(tensors_only).non_tensor_outputs == ()


# -- requested outputs ---------------------------------------------------------------------------------------

SIGNATURE = Signature(
    inputs=(TensorSpec("X", np.dtype(np.float32), (-1, 2)),),
    outputs=(TensorSpec("output_label", np.dtype(np.int64), (-1,)),),
    non_tensor_outputs=("output_probability",),
)


def test_without_named_outputs_every_tensor_output_is_chosen() -> None:
    assert check_outputs(SIGNATURE, None) == ("output_label",)
    assert check_outputs(SIGNATURE, ["output_label"]) == ("output_label",)


@pytest.mark.parametrize("names", [["output_probability"], ["output_label", "output_probability"]])
def test_naming_a_non_tensor_output_is_refused_naming_it_and_the_tensor_outputs(names: list[str]) -> None:
    with pytest.raises(NonTensorOutput) as caught:
        check_outputs(SIGNATURE, names)

    assert isinstance(caught.value, InvalidArgument)
    assert caught.value.reason == "UNKNOWN_OUTPUT"  # the documented reason; the message tells the cases apart
    assert caught.value.field == "output_names"
    assert caught.value.metadata == {"output": "output_probability"}
    message = str(caught.value)
    assert "output 'output_probability' is a sequence or map" in message
    assert "ask for its tensor outputs instead: 'output_label'" in message


def test_a_name_the_graph_lacks_is_still_unknown() -> None:
    with pytest.raises(UnknownOutput):
        check_outputs(SIGNATURE, ["nope"])


def test_naming_the_output_of_a_model_without_tensor_outputs_says_it_cannot_be_served() -> None:
    nothing = Signature(inputs=SIGNATURE.inputs, outputs=(), non_tensor_outputs=("items",))

    with pytest.raises(NonTensorOutput, match="the model has no tensor output, so it cannot be served"):
        check_outputs(nothing, ["items"])


# -- the session ---------------------------------------------------------------------------------------------


def test_the_session_computes_the_tensor_outputs_only_and_logs_the_others_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = zipmap_model(tmp_path)
    with caplog.at_level(logging.INFO, logger="modelforge.inference.sessions"):
        session = ModelSession(path, SessionConfig())
    x = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)

    outputs = session.run({"x": x})
    session.warmup(Signature(inputs=(TensorSpec("x", np.dtype(np.float32), (-1, 2)),), outputs=()))

    assert session.output_names == ["y"]
    assert list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], x)
    notes = [record for record in caplog.records if "probabilities" in record.getMessage()]
    assert len(notes) == 1
    assert notes[0].levelno == logging.WARNING
    assert "'probabilities' (seq(map(int64,tensor(float))))" in notes[0].getMessage()
    assert "serving the tensor outputs 'y' only" in notes[0].getMessage()


def test_a_model_without_tensor_outputs_is_refused_at_load_naming_its_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no output that is a tensor ModelForge serves, only 'items' \(seq"):
        ModelSession(write_model(build_sequence_output(), tmp_path / "sequence.onnx"), SessionConfig())

"""The registry's ONNX checks and what it reads from a file, without servers."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from modelforge_registry import onnxfile
from modelforge_registry.domain import OperatorSet, TensorSpec
from modelforge_registry.errors import ExternalDataRefused, InvalidOnnx, NotServable
from tests.fixtures.onnx_models import (
    IR_VERSION,
    OPSET,
    PRODUCER,
    build_add_one,
    build_custom_op,
    build_external_data_escape,
    build_identity,
    build_mlp,
    build_sequence_input,
    build_sequence_output,
    build_string_and_bfloat16,
    build_string_model,
    not_onnx_bytes,
    truncated_onnx_bytes,
    write_model,
    write_with_external_data,
)
from tests.fixtures.polling import eventually


def test_symbolic_dims_read_as_minus_one_with_their_names(tmp_path: Path) -> None:
    model = build_identity(TensorProto.FLOAT16, ["batch", 3, "height", 0])
    model.graph.input[0].type.tensor_type.shape.dim.add()  # a dimension with neither a value nor a name
    signature, _ = onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    (x,) = signature.inputs
    assert x == TensorSpec(
        name="x", dtype="FLOAT16", shape=(-1, 3, -1, 0, -1), dim_names=("batch", "", "height", "", "")
    )
    assert signature.outputs == (
        TensorSpec(name="y", dtype="FLOAT16", shape=(-1, 3, -1, 0), dim_names=("batch", "", "height", "")),
    )


def test_initializers_listed_as_inputs_are_not_part_of_the_signature(tmp_path: Path) -> None:
    model = build_add_one()
    model.graph.input.append(helper.make_tensor_value_info("one", TensorProto.FLOAT, []))  # IR < 4 style
    signature, _ = onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert [spec.name for spec in signature.inputs] == ["x"]


def test_dtypes_map_to_our_names_and_unknown_ones_to_unspecified(tmp_path: Path) -> None:
    signature, _ = onnxfile.inspect_file(write_model(build_string_model(), tmp_path / "s.onnx"))
    assert "STRING" in {spec.dtype for spec in (*signature.inputs, *signature.outputs)}
    complex_model = build_identity(TensorProto.COMPLEX64, ["batch"])
    # ONNX Runtime has no complex tensors (the runtime check refuses such a model: see the test below)
    signature, _ = onnxfile.inspect_file(write_model(complex_model, tmp_path / "c.onnx"), runtime_check=False)
    assert [spec.dtype for spec in signature.inputs] == ["UNSPECIFIED"]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (build_identity(TensorProto.COMPLEX64, ["batch"]), "its input 'x' is no tensor of a type it serves"),
        (build_sequence_input(), "its input 'items' is no tensor of a type it serves"),
        (build_sequence_output(), "it has no output that is a tensor of a type it serves"),
        (build_string_and_bfloat16(), "ONNX Runtime takes string inputs only on the path that cannot return bfloat16"),
    ],
)
def test_a_model_no_request_could_be_served_on_is_refused_unless_the_runtime_check_is_off(
    tmp_path: Path, model: onnx.ModelProto, says: str
) -> None:
    path = write_model(model, tmp_path / "m.onnx")
    with pytest.raises(NotServable, match=f"^ModelForge cannot serve this model: {re.escape(says)}") as raised:
        onnxfile.inspect_file(path)
    assert raised.value.reason == "MODEL_NOT_SERVABLE" and "MODELFORGE_RUNTIME_CHECK=false" in str(raised.value)
    assert onnxfile.inspect_file(path, runtime_check=False)[0].inputs


def test_a_model_onnx_runtime_cannot_load_is_refused_unless_the_runtime_check_is_off(tmp_path: Path) -> None:
    graph = helper.make_graph(  # a complex64 output beside a float one: servable, were there kernels for it
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["c"], ["z"])],
        "complex_beside",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("z", TensorProto.COMPLEX64, [1]),
        ],
        [helper.make_tensor("c", TensorProto.COMPLEX64, [1], [1 + 0j])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = write_model(model, tmp_path / "c.onnx")
    with pytest.raises(InvalidOnnx, match="cannot load it: .*complex64") as raised:
        onnxfile.inspect_file(path)
    assert raised.value.reason == "INVALID_ONNX"
    custom = write_model(build_custom_op(), tmp_path / "custom.onnx")
    with pytest.raises(InvalidOnnx, match=r"FancyOp\(-1\) is not a registered function/op \(if the model is meant"):
        onnxfile.inspect_file(custom)
    assert onnxfile.inspect_file(custom, runtime_check=False)[0].inputs[0].name == "x"


def test_an_input_a_sparse_initializer_gives_a_default_for_is_no_input_of_the_signature(tmp_path: Path) -> None:
    default = helper.make_sparse_tensor(
        helper.make_tensor("b", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("i", TensorProto.INT64, [1], [0]),
        [2],
    )
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "sparse_default",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("b", 1, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        sparse_initializer=[default],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    signature, _ = onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert [spec.name for spec in signature.inputs] == ["x"]  # as ONNX Runtime serves it: `b` may not be fed


def test_facts_come_from_the_file(tmp_path: Path) -> None:
    model = build_mlp()
    helper.set_model_props(model, {"license": "apache-2.0", "origin": "tests"})
    _, info = onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert (info.ir_version, info.producer_name, info.producer_version) == (IR_VERSION, PRODUCER, "1")
    assert info.opset_imports == (OperatorSet(domain="", version=OPSET),)
    assert info.graph_name == model.graph.name
    assert info.doc_string == model.doc_string
    assert info.metadata_props == {"license": "apache-2.0", "origin": "tests"}


def test_external_data_beside_the_model_is_refused_as_a_separate_file(tmp_path: Path) -> None:
    path = write_with_external_data(build_mlp(), tmp_path / "m.onnx", location="weights.bin")
    with pytest.raises(ExternalDataRefused) as caught:
        onnxfile.inspect_file(path)
    assert "a separate file" in str(caught.value) and "'weights.bin'" in str(caught.value)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../up.bin", "C:\\weights.bin"])
def test_external_data_leaving_the_directory_is_named_as_such(tmp_path: Path, location: str) -> None:
    path = write_model(build_external_data_escape(location), tmp_path / "m.onnx")
    with pytest.raises(ExternalDataRefused) as caught:
        onnxfile.inspect_file(path)
    assert "outside the model's directory" in str(caught.value)
    assert caught.value.metadata == {"tensor": "w", "location": location}


def test_external_data_inside_a_subgraph_is_found(tmp_path: Path) -> None:
    weight = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../w.bin")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", 1, [1])],
        [weight],
    )
    plain = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["out"])],
        "plain",
        [],
        [helper.make_tensor_value_info("out", 1, [1])],
        [helper.make_tensor("c", 1, [1], [0.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=plain)],
        "conditional",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    with pytest.raises(ExternalDataRefused) as caught:
        onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert "outside the model's directory" in str(caught.value)


def test_external_data_in_a_list_of_sparse_tensors_is_found(tmp_path: Path) -> None:
    values = onnx.TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[1])
    values.data_location = TensorProto.EXTERNAL
    values.external_data.add(key="location", value="../w.bin")
    node = helper.make_node("Identity", ["x"], ["y"])
    listed = onnx.AttributeProto(name="listed", type=onnx.AttributeProto.SPARSE_TENSORS)
    listed.sparse_tensors.add(values=values, indices=helper.make_tensor("i", TensorProto.INT64, [1], [0]), dims=[2])
    node.attribute.append(listed)
    graph = helper.make_graph(
        [node],
        "listed_sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    with pytest.raises(ExternalDataRefused) as caught:  # not the checker's INVALID_ONNX, which looked at the path
        onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert caught.value.metadata == {"tensor": "v", "location": "../w.bin"}


@pytest.mark.parametrize(
    ("location", "escapes"),
    [
        ("weights.bin", False),
        ("./data/weights.bin", False),
        ("data/../weights.bin", False),
        ("", True),
        ("..", True),
        ("../weights.bin", True),
        ("data/../../weights.bin", True),
        ("..\\weights.bin", True),
        ("/abs/weights.bin", True),
        ("D:weights.bin", True),
    ],
)
def test_which_locations_escape_the_directory(location: str, escapes: bool) -> None:
    assert onnxfile.escapes_directory(location) is escapes


def test_bytes_that_are_not_onnx_are_refused_saying_why(tmp_path: Path) -> None:
    path = tmp_path / "not.onnx"
    path.write_bytes(not_onnx_bytes())
    with pytest.raises(InvalidOnnx) as caught:
        onnxfile.inspect_file(path)
    assert "cannot be parsed as an ONNX protobuf" in str(caught.value)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(truncated_onnx_bytes())
    with pytest.raises(InvalidOnnx) as caught:
        onnxfile.inspect_file(path)
    assert caught.value.reason == "INVALID_ONNX"


def test_a_protobuf_without_a_graph_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=IR_VERSION).SerializeToString())
    with pytest.raises(InvalidOnnx) as caught:
        onnxfile.inspect_file(path)
    assert "no graph" in str(caught.value)


def test_a_graph_the_checker_refuses_is_invalid(tmp_path: Path) -> None:
    model = build_add_one()
    model.graph.node[0].op_type = "NoSuchOperator"
    with pytest.raises(InvalidOnnx) as caught:
        onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert "onnx.checker refused it" in str(caught.value)


def test_an_opset_no_onnx_release_defines_is_refused(tmp_path: Path) -> None:
    model = build_add_one()
    model.opset_import[0].version = 99  # the checker lets it through; no runtime could load it
    with pytest.raises(InvalidOnnx) as caught:
        onnxfile.inspect_file(write_model(model, tmp_path / "m.onnx"))
    assert f"opset 99 of the ONNX domain, which does not exist (the newest is {onnx.defs.onnx_opset_version()})" in str(
        caught.value
    )


async def test_inspect_runs_off_the_event_loop_and_gives_the_same_answer(tmp_path: Path) -> None:
    path = write_model(build_add_one(), tmp_path / "m.onnx")
    inspections = onnxfile.Inspections(1 << 20)
    assert await inspections.inspect(path, path.stat().st_size) == onnxfile.inspect_file(path)
    await eventually(lambda: inspections.in_use == 0, "its share to be given back")


def test_a_long_library_message_is_cut_between_words_and_says_it_was_cut() -> None:
    message = "Please, install the locale " + "word " * 100
    quoted = onnxfile._first_line(RuntimeError(message + "\nsecond line"))
    assert quoted.endswith(" …") and len(quoted) <= onnxfile._LINE_CHARS + 2
    assert message.startswith(quoted.removesuffix(" …"))
    assert quoted.removesuffix(" …").endswith("word")  # whole words only
    assert onnxfile._first_line(RuntimeError("short\nsecond")) == "short"
    assert onnxfile._first_line(RuntimeError("x" * 400)) == "x" * onnxfile._LINE_CHARS + " …"
    exact = "w " * 149 + "xy zz"  # "xy" ends at the limit: kept whole
    assert onnxfile._first_line(RuntimeError(exact)) == exact[: onnxfile._LINE_CHARS] + " …"
    path = "Load model from /" + "a/" * 200 + "m.onnx failed"  # a long path: cut inside it, not before it
    quoted = onnxfile._first_line(RuntimeError(path))
    assert quoted == path[: onnxfile._LINE_CHARS] + " …"

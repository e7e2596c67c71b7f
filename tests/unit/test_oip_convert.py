"""Open Inference Protocol messages to and from numpy arrays and the inference domain."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from modelforge._refs import ModelRef
from modelforge.oip.v2 import grpc_service_pb2 as pb
from modelforge.oip.v2 import model_config_pb2 as config_pb
from modelforge_inference import oip_convert as convert
from modelforge_inference import wire
from modelforge_inference.domain import (
    BatchingConfig,
    CacheConfig,
    LoadedModel,
    ModelState,
    ModelStatistics,
    ResolvedModel,
    ServingConfig,
    Signature,
    TensorSpec,
)
from modelforge_inference.errors import InvalidInput
from modelforge_server.errors import InvalidArgument

Tensor = pb.ModelInferRequest.InferInputTensor


def _raw_request(*pairs: tuple[Tensor, bytes]) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="m", inputs=[t for t, _ in pairs], raw_input_contents=[raw for _, raw in pairs]
    )


def _length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# --- model references -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "version"), [("Bad Name", ""), ("Bad Name", "3"), ("mlp", "0"), ("mlp", "00")])
def test_a_model_or_version_none_could_be_named_so_is_not_found(name: str, version: str) -> None:
    """As Triton answers for a model or version it lacks: its clients tell a missing model by NOT_FOUND."""
    with pytest.raises(convert.NoSuchV2Model):
        convert.model_ref(name, version)
    with pytest.raises(convert.NoSuchV2Model):
        convert.named_ref(name, version)


@pytest.mark.parametrize(
    ("version", "expected"),
    [("", ModelRef("mlp")), ("3", ModelRef("mlp", version=3)), ("production", ModelRef("mlp", alias="production"))],
)
def test_model_version_is_a_number_an_alias_or_empty(version: str, expected: ModelRef) -> None:
    assert convert.model_ref("mlp", version) == expected


@pytest.mark.parametrize(
    ("name", "version", "at_fault"),
    [
        ("", "", "model_name"),
        ("mlp", "x y", "model_version"),
        ("mlp", "-2", "model_version"),
    ],
)
def test_bad_model_name_or_version_is_invalid_argument_naming_the_field(name: str, version: str, at_fault: str) -> None:
    with pytest.raises(convert.InvalidV2Request) as caught:
        convert.model_ref(name, version)
    assert caught.value.field == at_fault
    with pytest.raises(convert.InvalidV2Request) as caught:  # the metadata requests' fields are name and version
        convert.named_ref(name, version)
    assert caught.value.field == at_fault.removeprefix("model_")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("mlp", ModelRef("mlp")), ("mlp:2", ModelRef("mlp", version=2)), ("mlp@canary", ModelRef("mlp", alias="canary"))],
)
def test_repository_model_name_takes_the_string_forms(text: str, expected: ModelRef) -> None:
    assert convert.repository_model_ref(text) == expected


def test_repository_load_refuses_config_and_file_overrides() -> None:
    request = pb.RepositoryModelLoadRequest(model_name="mlp")
    request.parameters["config"].string_param = "{}"
    with pytest.raises(convert.InvalidV2Request, match="'config' is not supported"):
        convert.check_repository_parameters(request.parameters)
    convert.check_repository_parameters(pb.RepositoryModelLoadRequest().parameters)


# --- raw inputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("FP32", np.arange(6, dtype="<f4").reshape(2, 3)),
        ("FP64", np.arange(4, dtype="<f8").reshape(4, 1)),
        ("FP16", np.array([[0.5, -1.25, 65504.0]], dtype="<f2")),
        ("INT64", np.array([[-(2**62), 7]], dtype="<i8")),
        ("INT32", np.array([1, -2, 3], dtype="<i4")),
        ("INT8", np.array([-128, 127], dtype="i1")),
        ("UINT8", np.array([[0, 255]], dtype="u1")),
        ("UINT64", np.array([2**64 - 1], dtype="<u8")),
        ("BOOL", np.array([True, False, True])),
        ("BF16", np.array([0x3F80, 0xC000], dtype="<u2")),  # 1.0 and -2.0 as bfloat16 bit patterns
    ],
)
def test_raw_inputs_decode_to_the_same_array(datatype: str, array: np.ndarray[Any, Any]) -> None:
    tensor = Tensor(name="x", datatype=datatype, shape=array.shape)
    decoded = convert.decode_inputs(_raw_request((tensor, array.tobytes())))["x"]
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_raw_numbers_are_a_read_only_view_not_a_copy() -> None:
    tensor = Tensor(name="x", datatype="FP32", shape=[2, 2])
    decoded = convert.decode_inputs(_raw_request((tensor, np.ones(4, dtype="<f4").tobytes())))["x"]
    assert not decoded.flags.writeable
    assert decoded.base is not None


def test_raw_bytes_inputs_split_on_little_endian_length_prefixes() -> None:
    items = [b"hello", b"", "héllo".encode(), b"\x00\xff" * 3]
    tensor = Tensor(name="text", datatype="BYTES", shape=[2, 2])
    decoded = convert.decode_inputs(_raw_request((tensor, _length_prefixed(*items))))["text"]
    assert decoded.dtype == np.dtype(object)
    assert decoded.shape == (2, 2)
    assert decoded.ravel().tolist() == items


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (_length_prefixed(b"abcd"), "ends after 1 of 2"),
        (_length_prefixed(b"a", b"bc")[:-1], "declares 2 bytes but only 1 remain"),
        (_length_prefixed(b"a", b"b") + b"\x00", "1 bytes follow the 2 BYTES elements"),
        (b"\x01\x00\x00\x00\x00", "BYTES data of 5 bytes cannot hold the 2 elements"),
    ],
)
def test_malformed_bytes_input_is_invalid_input(raw: bytes, problem: str) -> None:
    tensor = Tensor(name="text", datatype="BYTES", shape=[2])
    with pytest.raises(InvalidInput, match=problem) as caught:
        convert.decode_inputs(_raw_request((tensor, raw)))
    assert "'text'" in str(caught.value)


@pytest.mark.parametrize("count", [1 << 40, 1 << 50, (1 << 60) - 1])
def test_bytes_shape_with_more_elements_than_the_data_can_hold_is_refused_before_allocating(count: int) -> None:
    # Every element takes at least its 4-byte length: 8 bytes hold 2 at most, never 2**40 (8 TiB of pointers).
    tensor = Tensor(name="text", datatype="BYTES", shape=[count])
    with pytest.raises(InvalidInput) as caught:
        convert.decode_inputs(_raw_request((tensor, _length_prefixed(b"a", b""))))
    assert str(caught.value) == (
        f"input 'text': BYTES data of 9 bytes cannot hold the {count} elements the shape holds; each element is a "
        "4-byte little-endian length followed by that many bytes"
    )


def test_bytes_count_is_checked_before_decode_bytes_allocates() -> None:
    with pytest.raises(InvalidInput, match="BYTES data of 4 bytes cannot hold the 2 elements"):
        convert.decode_bytes(b"\x00" * 4, 2, "text")
    assert convert.decode_bytes(b"\x00" * 8, 2, "text").tolist() == [b"", b""]


def _typed(tensor: Tensor) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", inputs=[tensor])


@pytest.mark.parametrize("carried", ["raw", "typed"])
@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_more_dimensions_than_numpy_allows_is_invalid_input_naming_the_limit(carried: str, datatype: str) -> None:
    tensor = Tensor(name="x", datatype=datatype, shape=[1] * 65)
    if carried == "raw":
        request = _raw_request((tensor, _length_prefixed(b"a") if datatype == "BYTES" else b"\x00" * 4))
    else:
        field = "bytes_contents" if datatype == "BYTES" else "fp32_contents"
        tensor.contents.MergeFrom(pb.InferTensorContents(**{field: [b"a" if datatype == "BYTES" else 1.0]}))
        request = _typed(tensor)
    with pytest.raises(InvalidInput) as caught:
        convert.decode_inputs(request)
    assert str(caught.value) == "input 'x': shape has 65 dimensions; an input has at most 64 dimensions"


def test_sixty_four_dimensions_are_accepted() -> None:
    tensor = Tensor(name="x", datatype="FP32", shape=[1] * 64)
    assert convert.decode_inputs(_raw_request((tensor, b"\x00" * 4)))["x"].shape == (1,) * 64


@pytest.mark.parametrize(
    ("datatype", "shape", "spanned", "limit"),
    [
        ("BYTES", [1 << 62], 1 << 62, (2**63 - 1) // 8),  # 2**62 pointers: more bytes than an intp counts
        ("FP32", [1 << 40, 1 << 40, 0], 1 << 80, (2**63 - 1) // 4),  # the element product overflows int64
        ("UINT8", [1 << 62, 4, 0], 1 << 64, 2**63 - 1),  # empty, yet numpy refuses the shape
        ("FP64", [1 << 60, 0], 1 << 60, (2**63 - 1) // 8),
    ],
)
def test_shape_no_array_can_hold_is_invalid_input(datatype: str, shape: list[int], spanned: int, limit: int) -> None:
    tensor = Tensor(name="x", datatype=datatype, shape=shape)
    with pytest.raises(InvalidInput) as caught:
        convert.decode_inputs(_raw_request((tensor, b"")))
    assert str(caught.value) == (
        f"input 'x': shape {shape} is too large: its nonzero dimensions multiply to {spanned}, more than the "
        f"{limit} elements of {datatype} an array can hold"
    )


def test_typed_contents_with_a_shape_no_array_can_hold_is_invalid_input() -> None:
    # No elements and an empty contents field agree, but numpy cannot give the array that shape.
    tensor = Tensor(name="x", datatype="INT64", shape=[1 << 62, 1 << 62, 0], contents=pb.InferTensorContents())
    with pytest.raises(InvalidInput, match="input 'x': shape .* is too large"):
        convert.decode_inputs(_typed(tensor))


def test_typed_bytes_element_count_is_checked_before_allocating() -> None:
    contents = pb.InferTensorContents(bytes_contents=[b"a"])
    tensor = Tensor(name="s", datatype="BYTES", shape=[1 << 40], contents=contents)
    with pytest.raises(InvalidInput, match=f"shape \\[{1 << 40}\\] holds {1 << 40} elements, but contents"):
        convert.decode_inputs(_typed(tensor))


def test_an_empty_input_with_a_zero_dimension_still_decodes() -> None:
    for datatype in ("FP32", "BYTES"):
        tensor = Tensor(name="x", datatype=datatype, shape=[0, 1 << 20])
        assert convert.decode_inputs(_raw_request((tensor, b"")))["x"].shape == (0, 1 << 20)


def test_raw_byte_length_that_does_not_match_the_shape_names_the_input_and_the_sizes() -> None:
    tensor = Tensor(name="x", datatype="FP32", shape=[2, 3])
    with pytest.raises(InvalidInput) as caught:
        convert.decode_inputs(_raw_request((tensor, b"\x00" * 20)))
    assert str(caught.value) == (
        "input 'x': shape [2, 3] of FP32 needs 24 bytes (6 x 4), but its raw_input_contents entry has 20"
    )


def test_raw_contents_must_cover_every_input() -> None:
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="a", datatype="FP32", shape=[1]), Tensor(name="b", datatype="FP32", shape=[1])],
        raw_input_contents=[b"\x00" * 4],
    )
    with pytest.raises(convert.InvalidV2Request, match="1 entries for 2 inputs"):
        convert.decode_inputs(request)


def test_raw_and_typed_contents_cannot_be_mixed() -> None:
    typed = Tensor(name="b", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1.0]))
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="a", datatype="FP32", shape=[1]), typed], raw_input_contents=[b"\x00" * 4, b"\x00" * 4]
    )
    with pytest.raises(InvalidInput, match="input 'b': typed contents are set"):
        convert.decode_inputs(request)


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (Tensor(name="x", datatype="FLOAT", shape=[1]), "unknown datatype 'FLOAT'"),
        (Tensor(name="x", datatype="FP32", shape=[-1]), "negative dimension"),
        (Tensor(name="x", datatype="BOOL", shape=[1]), "BOOL elements must be bytes 0 or 1"),
    ],
)
def test_bad_input_tensors_are_invalid_input(tensor: Tensor, problem: str) -> None:
    raw = b"\x02" if tensor.datatype == "BOOL" else b"\x00" * 4
    with pytest.raises(InvalidInput, match=problem):
        convert.decode_inputs(_raw_request((tensor, raw)))


def test_an_input_given_twice_is_invalid() -> None:
    tensor = Tensor(name="x", datatype="FP32", shape=[1])
    with pytest.raises(InvalidInput, match="appears twice"):
        convert.decode_inputs(_raw_request((tensor, b"\x00" * 4), (tensor, b"\x00" * 4)))


def test_an_unnamed_input_is_invalid() -> None:
    with pytest.raises(convert.InvalidV2Request, match=r"inputs\[0\].name is required"):
        convert.decode_inputs(_raw_request((Tensor(datatype="FP32", shape=[1]), b"\x00" * 4)))


# --- typed contents ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "contents", "expected"),
    [
        ("FP32", pb.InferTensorContents(fp32_contents=[1.5, -2.0]), np.array([1.5, -2.0], dtype="<f4")),
        ("FP64", pb.InferTensorContents(fp64_contents=[1e300, 0.0]), np.array([1e300, 0.0], dtype="<f8")),
        ("INT64", pb.InferTensorContents(int64_contents=[2**40, -1]), np.array([2**40, -1], dtype="<i8")),
        ("INT8", pb.InferTensorContents(int_contents=[-128, 127]), np.array([-128, 127], dtype="i1")),
        ("UINT16", pb.InferTensorContents(uint_contents=[0, 65535]), np.array([0, 65535], dtype="<u2")),
        ("BOOL", pb.InferTensorContents(bool_contents=[True, False]), np.array([True, False])),
    ],
)
def test_typed_contents_decode_to_the_datatypes_dtype(
    datatype: str, contents: pb.InferTensorContents, expected: np.ndarray[Any, Any]
) -> None:
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype=datatype, shape=[1, 2], contents=contents)])
    decoded = convert.decode_inputs(request)["x"]
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected.reshape(1, 2))


def test_typed_bytes_contents_become_an_object_array() -> None:
    contents = pb.InferTensorContents(bytes_contents=[b"a", b"", b"ccc"])
    request = pb.ModelInferRequest(inputs=[Tensor(name="s", datatype="BYTES", shape=[3], contents=contents)])
    decoded = convert.decode_inputs(request)["s"]
    assert decoded.dtype == np.dtype(object)
    assert decoded.tolist() == [b"a", b"", b"ccc"]


def test_typed_value_outside_the_datatypes_range_is_invalid() -> None:
    contents = pb.InferTensorContents(int_contents=[300])
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="INT8", shape=[1], contents=contents)])
    with pytest.raises(InvalidInput, match="outside the range of INT8"):
        convert.decode_inputs(request)


def test_typed_element_count_must_match_the_shape() -> None:
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0, 3.0])
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="FP32", shape=[2, 2], contents=contents)])
    with pytest.raises(InvalidInput, match="holds 4 elements, but contents.fp32_contents has 3"):
        convert.decode_inputs(request)


@pytest.mark.parametrize("shape", [[1, 4], [0, 4]])
def test_typed_contents_in_another_datatypes_field_are_refused_naming_both(shape: list[int]) -> None:
    contents = pb.InferTensorContents(int_contents=[1, 2, 3, 4][: shape[0] * 4])
    if not shape[0]:
        contents.int_contents.append(1)  # an empty repeated field is no field at all
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="FP32", shape=shape, contents=contents)])
    with pytest.raises(InvalidInput) as caught:
        convert.decode_inputs(request)
    assert str(caught.value) == (
        "input 'x': its datatype FP32 takes contents.fp32_contents, but contents.int_contents was given"
    )


def test_an_input_without_data_says_where_its_data_goes() -> None:
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="INT64", shape=[2, 2])])
    with pytest.raises(InvalidInput) as caught:
        convert.decode_inputs(request)
    assert str(caught.value) == (
        "input 'x': no data: send its 4 elements in contents.int64_contents or as an entry of raw_input_contents"
    )


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_travels_raw_only(datatype: str) -> None:
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype=datatype, shape=[1])])
    with pytest.raises(InvalidInput, match="send it in raw_input_contents"):
        convert.decode_inputs(request)


# --- request parameters -----------------------------------------------------------------------------------------


def test_priority_and_timeout_parameters() -> None:
    request = pb.ModelInferRequest()
    assert convert.priority(request.parameters) == 0
    assert convert.timeout_seconds(request.parameters) is None
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 250_000  # microseconds
    assert convert.priority(request.parameters) == 2
    assert convert.timeout_seconds(request.parameters) == 0.25
    request.parameters["priority"].int64_param = 1
    assert convert.priority(request.parameters) == 1


@pytest.mark.parametrize("key", ["priority", "timeout"])
def test_non_integer_schedule_parameters_are_invalid(key: str) -> None:
    request = pb.ModelInferRequest()
    request.parameters[key].string_param = "high"
    with pytest.raises(convert.InvalidV2Request, match=f"parameter '{key}' must be an integer"):
        convert.priority(request.parameters) if key == "priority" else convert.timeout_seconds(request.parameters)


def test_negative_priority_or_timeout_is_invalid() -> None:
    request = pb.ModelInferRequest()
    request.parameters["priority"].int64_param = -1
    with pytest.raises(InvalidArgument):
        convert.priority(request.parameters)
    request.parameters["timeout"].int64_param = -5
    with pytest.raises(InvalidArgument):
        convert.timeout_seconds(request.parameters)


def test_requested_outputs_keep_their_order_and_each_is_requested_once() -> None:
    def request(*names: str) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names])

    assert convert.requested_outputs(request("b", "a")) == ("b", "a")
    assert convert.requested_outputs(pb.ModelInferRequest()) == ()
    with pytest.raises(convert.InvalidV2Request, match="output 'b' is requested twice; request each output once"):
        convert.requested_outputs(request("b", "a", "b"))


def _classify(name: str, count: int | str, *, region: str = "") -> pb.ModelInferRequest:
    output = pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
    if isinstance(count, int):
        output.parameters["classification"].int64_param = count
    else:
        output.parameters["classification"].string_param = count
    if region:
        output.parameters["shared_memory_region"].string_param = region
    return pb.ModelInferRequest(outputs=[output, pb.ModelInferRequest.InferRequestedOutputTensor(name="other")])


def test_outputs_asked_to_be_classified_are_named_with_their_class_counts() -> None:
    assert convert.classifications(_classify("probs", 3)) == {"probs": 3}
    assert convert.requested_outputs(_classify("probs", 3)) == ("probs", "other")
    for count, says in ((0, "takes a positive integer"), ("3", "must be an integer")):
        with pytest.raises(convert.InvalidV2Request, match=says):
            convert.classifications(_classify("probs", count))
    with pytest.raises(convert.InvalidV2Request, match="comes in the answer, not in shared memory"):
        convert.classifications(_classify("probs", 3, region="r"))


def test_classification_ranks_each_batch_item_or_the_whole_output_as_triton_does() -> None:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    batched = convert.classified("probs", probs, 2, batched=True)
    assert batched.tolist() == [[b"0.700000:1", b"0.200000:2"], [b"0.500000:0", b"0.300000:2"]]
    whole = convert.classified("probs", probs, 10, batched=False)  # at most every element, flattened
    assert whole.tolist() == [b"0.700000:1", b"0.500000:3", b"0.300000:5", b"0.200000:2", b"0.200000:4", b"0.100000:0"]
    assert convert.classified("n", np.array([3, 9, 1], np.int64), 1, batched=False).tolist() == [b"9:1"]
    assert convert.classified("p", np.zeros((0, 3), np.float32), 2, batched=True).shape == (0, 2)
    with pytest.raises(convert.InvalidV2Request, match="output 'label' holds BYTES, which cannot be classified"):
        convert.classified("label", np.array([b"a"], dtype=object), 1, batched=False)


def test_a_bfloat16_output_is_classified_by_the_numbers_its_bits_hold() -> None:
    bits = np.array([0xBF80, 0x3F00, 0x4000], dtype="<u2")  # -1.0, 0.5 and 2.0 as bfloat16 bit patterns
    bf16 = TensorSpec("h", np.dtype("<u2"), (3,), ort_type="tensor(bfloat16)")
    ranked = convert.classified("h", bits, 3, batched=False, spec=bf16)
    assert ranked.tolist() == [b"2.000000:2", b"0.500000:1", b"-1.000000:0"]
    plain = TensorSpec("h", np.dtype("<u2"), (3,), ort_type="tensor(uint16)")  # the same bits as integers
    assert convert.classified("h", bits, 1, batched=False, spec=plain).tolist() == [b"49024:0"]


def test_a_string_output_is_refused_for_classification_before_the_run() -> None:
    signature = Signature(
        inputs=(TensorSpec("x", np.dtype(np.float32), (-1, 4)),),
        outputs=(TensorSpec("label", np.dtype(object), (-1,)), TensorSpec("p", np.dtype(np.float32), (-1, 3))),
    )
    convert.check_classifiable(signature, {"p": 2})
    with pytest.raises(convert.InvalidV2Request, match="output 'label' holds BYTES, which cannot be classified"):
        convert.check_classifiable(signature, {"p": 2, "label": 1})


# --- responses --------------------------------------------------------------------------------------------------


def _answer(**kwargs: Any) -> pb.ModelInferResponse:
    """The service's pre-serialised ModelInferResponse, parsed back by protobuf."""
    return pb.ModelInferResponse.FromString(wire.join(convert.infer_response_parts(**kwargs)))


def test_infer_response_carries_raw_outputs_in_order_and_echoes_the_id() -> None:
    outputs = {
        "probs": np.array([[0.25, 0.75]], dtype=np.float32),
        "label": np.array([[1]], dtype=np.int64),
        "half": np.array([1.5], dtype=np.float16),
        "names": np.array([b"cat", "dög"], dtype=object),
        "flag": np.array([True, False]),
    }
    response = _answer(model="mlp", version=4, request_id="req-7", outputs=outputs)
    assert (response.model_name, response.model_version, response.id) == ("mlp", "4", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probs", "FP32", [1, 2]),
        ("label", "INT64", [1, 1]),
        ("half", "FP16", [1]),
        ("names", "BYTES", [2]),
        ("flag", "BOOL", [2]),
    ]
    raws = list(response.raw_output_contents)
    assert raws[0] == outputs["probs"].tobytes()
    assert raws[1] == outputs["label"].tobytes()
    assert raws[2] == outputs["half"].tobytes()
    assert raws[3] == _length_prefixed(b"cat", "dög".encode())
    assert raws[4] == b"\x01\x00"
    assert not any(o.HasField("contents") for o in response.outputs)


def test_an_output_placed_in_shared_memory_already_is_described_and_not_written_again() -> None:
    memory = memoryview(bytearray(64))
    np.frombuffer(memory, np.float32, count=4)[:] = [1, 2, 3, 4]  # what ONNX Runtime wrote there
    # The array given for the placed output differs from the memory only so that a second write would show.
    outputs = {"placed": np.full((2, 2), 9.0, np.float32), "copied": np.array([5.0, 6.0], np.float32)}
    response = _answer(
        model="m",
        version=1,
        request_id="",
        outputs=outputs,
        shared={"placed": convert.SharedSlice("out", memory), "copied": convert.SharedSlice("out", memory[32:])},
        placed=frozenset({"placed"}),
    )

    assert list(response.raw_output_contents) == [b"", b""]
    written = [o.parameters["shared_memory_byte_size"].int64_param for o in response.outputs]
    assert written == [16, 8]
    assert np.frombuffer(memory, np.float32)[:4].tolist() == [1, 2, 3, 4]
    assert np.frombuffer(memory, np.float32)[8:10].tolist() == [5, 6]


def test_bytes_encoding_round_trips() -> None:
    items = np.array([[b"", b"x" * 300], [b"\x00", b"abc"]], dtype=object)
    decoded = convert.decode_bytes(convert.encode_bytes(items), 4, "x")
    assert decoded.tolist() == items.ravel().tolist()


# --- metadata, configuration, statistics, index -----------------------------------------------------------------


def _model(batchable: bool) -> ResolvedModel:
    lead = -1 if batchable else 1
    return ResolvedModel(
        name="mlp",
        version=3,
        sha256="ab" * 32,
        size_bytes=1000,
        signature=Signature(
            inputs=(
                TensorSpec("x", np.dtype("<f4"), (lead, 64)),
                TensorSpec("ids", np.dtype("<i8"), (lead, 4)),
            ),
            outputs=(
                TensorSpec("y", np.dtype("<f4"), (lead, 8)),
                TensorSpec("label", np.dtype(object), (lead,)),
            ),
        ),
    )


def test_model_metadata_lists_platform_versions_and_tensors() -> None:
    metadata = convert.model_metadata(_model(batchable=True))
    assert metadata.name == "mlp"
    assert list(metadata.versions) == ["3"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("x", "FP32", [-1, 64]),
        ("ids", "INT64", [-1, 4]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("y", "FP32", [-1, 8]),
        ("label", "BYTES", [-1]),
    ]


def test_model_config_of_a_batching_model_drops_the_batch_dimension() -> None:
    serving = ServingConfig(
        batching=BatchingConfig(
            max_batch_size=32,
            max_queue_delay_us=200,
            preferred_batch_sizes=(8, 16),
            priority_levels=3,
            max_queue_size=100,
            default_queue_timeout=0.5,
        ),
        cache=CacheConfig(enabled=True),
    )
    config = convert.model_config(_model(batchable=True), serving)
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "mlp",
        "onnxruntime_onnx",
        "onnxruntime",
        32,
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", config_pb.TYPE_FP32, [64]),
        ("ids", config_pb.TYPE_INT64, [4]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("y", config_pb.TYPE_FP32, [8]),
        ("label", config_pb.TYPE_STRING, []),
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [8, 16]
    assert batching.max_queue_delay_microseconds == 200
    assert batching.priority_levels == 3
    assert batching.default_queue_policy.max_queue_size == 100
    assert batching.default_queue_policy.default_timeout_microseconds == 500_000
    assert batching.default_queue_policy.allow_timeout_override
    assert config.response_cache.enable
    assert [(g.kind, g.count) for g in config.instance_group] == [(config_pb.ModelInstanceGroup.KIND_CPU, 1)]


def test_a_queue_timeout_under_a_microsecond_is_not_shown_as_none() -> None:
    serving = ServingConfig(batching=BatchingConfig(max_batch_size=4, default_queue_timeout=1e-7))
    config = convert.model_config(_model(batchable=True), serving)
    assert config.dynamic_batching.default_queue_policy.default_timeout_microseconds == 1  # 0 would mean no limit


@pytest.mark.parametrize(("batchable", "max_batch"), [(False, 32), (True, 0)])
def test_model_config_without_batching_keeps_full_dims(batchable: bool, max_batch: int) -> None:
    serving = ServingConfig(batching=BatchingConfig(max_batch_size=max_batch))
    config = convert.model_config(_model(batchable=batchable), serving)
    assert config.max_batch_size == 0
    assert config.WhichOneof("scheduling_choice") is None
    assert list(config.input[0].dims) == [1 if not batchable else -1, 64]


def test_model_statistics_in_the_protocols_shape() -> None:
    stats = ModelStatistics(
        name="mlp",
        version=3,
        requests=10,
        failures=2,
        inferences=40,
        executions=5,
        queue_seconds=0.5,
        compute_seconds=1.25,
        total_seconds=2.0,
        failure_seconds=0.25,
        cache_hits=4,
        cache_misses=6,
        batch_sizes={8: 5},
        batch_seconds={8: 1.0},
        last_inference=datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
    )
    out = convert.model_statistics(stats)
    assert (out.name, out.version, out.inference_count, out.execution_count) == ("mlp", "3", 40, 5)
    assert out.last_inference == 1704164645678
    s = out.inference_stats
    assert (s.success.count, s.success.ns) == (10, 2_000_000_000)
    assert (s.fail.count, s.fail.ns) == (2, 250_000_000)
    assert (s.queue.count, s.queue.ns) == (10, 500_000_000)
    assert (s.compute_infer.count, s.compute_infer.ns) == (6, 1_250_000_000)  # the 4 cache hits ran nothing
    assert s.compute_input.count == s.compute_output.count == 6
    assert (s.cache_hit.count, s.cache_miss.count) == (4, 6)
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in out.batch_stats] == [
        (8, 5, 1_000_000_000)
    ]


def test_never_used_model_has_zero_last_inference() -> None:
    assert convert.model_statistics(ModelStatistics(name="m", version=1)).last_inference == 0


@pytest.mark.parametrize(
    ("state", "words"),
    [
        (ModelState.READY, "READY"),
        (ModelState.LOADING, "LOADING"),
        (ModelState.UNLOADING, "UNLOADING"),
        (ModelState.FAILED, "UNAVAILABLE"),
    ],
)
def test_repository_index_states(state: ModelState, words: str) -> None:
    loaded = LoadedModel(name="mlp", version=2, sha256="00" * 32, state=state, reason="why" if words else "")
    index = convert.model_index(loaded)
    assert (index.name, index.version, index.state) == ("mlp", "2", words)


def test_server_extensions_name_only_what_modelforge_serves() -> None:
    assert set(convert.EXTENSIONS) == {
        "classification", "model_repository", "model_repository(unload_dependents)", "model_configuration",
        "schedule_policy", "parameters", "statistics",
    }  # fmt: skip


def test_bfloat16_is_told_from_uint16_by_the_onnx_runtime_type() -> None:
    bf16 = TensorSpec("h", np.dtype("<u2"), (-1, 2), ort_type="tensor(bfloat16)")
    uint16 = TensorSpec("u", np.dtype("<u2"), (-1, 2), ort_type="tensor(uint16)")
    signature = Signature(inputs=(bf16,), outputs=(bf16, uint16))
    model = ResolvedModel("m", 1, "00" * 32, 1, signature)
    metadata = convert.model_metadata(model)
    assert [t.datatype for t in metadata.inputs] == ["BF16"]
    assert [t.datatype for t in metadata.outputs] == ["BF16", "UINT16"]
    assert convert.model_config(model, ServingConfig()).input[0].data_type == config_pb.TYPE_BF16
    outputs = {"h": np.array([[0x3F80, 0]], dtype="<u2"), "u": np.array([[1, 2]], dtype="<u2")}
    assert convert.needs_signature(outputs)
    assert not convert.needs_signature({"y": np.zeros(2, dtype=np.float32)})
    response = _answer(model="m", version=1, request_id="", outputs=outputs, signature=signature)
    assert [o.datatype for o in response.outputs] == ["BF16", "UINT16"]
    assert response.raw_output_contents[0] == outputs["h"].tobytes()


def test_an_in_band_error_keeps_its_note_on_the_id_when_its_message_is_cut() -> None:
    request = pb.ModelInferRequest(model_name="m" * 5000, model_version="v" * 5000, id="i" * 100_000)
    answer = convert.stream_error_response(request, "x" * 5000)
    assert 1000 < len(answer.error_message) <= 1024
    assert answer.error_message.endswith("… (the request's id, 100000 characters, is too long to echo)")
    assert (len(answer.infer_response.model_name), len(answer.infer_response.model_version)) == (248, 248)  # and "…"
    assert answer.infer_response.id == ""
    short = pb.ModelInferRequest(model_name="mlp", model_version="2", id="7")
    assert convert.stream_error_response(short, "bad input").infer_response.id == "7"

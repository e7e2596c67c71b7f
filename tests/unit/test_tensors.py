from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest

from modelforge import tensors
from modelforge.common.v1.tensor_pb2 import DataType, Tensor

NUMERIC = [
    (np.float32, DataType.DATA_TYPE_FLOAT32),
    (np.float64, DataType.DATA_TYPE_FLOAT64),
    (np.float16, DataType.DATA_TYPE_FLOAT16),
    (np.int8, DataType.DATA_TYPE_INT8),
    (np.int16, DataType.DATA_TYPE_INT16),
    (np.int32, DataType.DATA_TYPE_INT32),
    (np.int64, DataType.DATA_TYPE_INT64),
    (np.uint8, DataType.DATA_TYPE_UINT8),
    (np.uint16, DataType.DATA_TYPE_UINT16),
    (np.uint32, DataType.DATA_TYPE_UINT32),
    (np.uint64, DataType.DATA_TYPE_UINT64),
    (np.bool_, DataType.DATA_TYPE_BOOL),
]


def round_trip(tensor: Tensor) -> Tensor:
    """What the peer sees: the message after the wire."""
    return Tensor.FromString(tensor.SerializeToString())


@pytest.mark.parametrize(("np_dtype", "data_type"), NUMERIC)
def test_numeric_round_trip(np_dtype: type, data_type: int) -> None:
    array = (np.arange(24) % 2 if np_dtype is np.bool_ else np.arange(24)).astype(np_dtype).reshape(2, 3, 4)
    tensor = tensors.to_tensor(array, "x")
    assert tensor.name == "x"
    assert tensor.dtype == data_type
    assert list(tensor.shape) == [2, 3, 4]
    assert tensor.raw_data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    back = tensors.to_numpy(round_trip(tensor))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_raw_data_is_little_endian_row_major() -> None:
    tensor = tensors.to_tensor(np.array([[1, 2], [3, 256]], dtype=np.int32))
    assert tensor.raw_data == b"\x01\0\0\0\x02\0\0\0\x03\0\0\0\x00\x01\0\0"


def test_scalar_has_empty_shape() -> None:
    tensor = tensors.to_tensor(np.float32(2.5), "s")
    assert list(tensor.shape) == []
    assert len(tensor.raw_data) == 4
    back = tensors.to_numpy(round_trip(tensor))
    assert back.shape == ()
    assert back == np.float32(2.5)


def test_python_scalars_and_lists_are_accepted() -> None:
    assert tensors.to_tensor(3).dtype == DataType.DATA_TYPE_INT64
    assert tensors.to_tensor([1.0, 2.0]).dtype == DataType.DATA_TYPE_FLOAT64
    assert tensors.to_tensor(True).dtype == DataType.DATA_TYPE_BOOL


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0, 2)])
def test_empty_tensors(shape: tuple[int, ...]) -> None:
    tensor = tensors.to_tensor(np.zeros(shape, dtype=np.float32))
    assert tensor.raw_data == b""
    back = tensors.to_numpy(round_trip(tensor))
    assert back.shape == shape
    assert back.dtype == np.float32


def test_empty_string_tensor() -> None:
    back = tensors.to_numpy(round_trip(tensors.to_tensor(np.array([], dtype=object).reshape(0, 2))))
    assert back.shape == (0, 2)
    assert back.dtype == object


def test_non_contiguous_arrays_are_gathered() -> None:
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    for view in (base[::2, 1::3], base.T, np.asfortranarray(base), base[:, ::-1]):
        assert not view.flags.c_contiguous
        back = tensors.to_numpy(round_trip(tensors.to_tensor(view)))
        np.testing.assert_array_equal(back, view)


@pytest.mark.parametrize("dtype", [">f4", ">i8", ">u2", ">f2", ">f8"])
def test_big_endian_input_is_swapped(dtype: str) -> None:
    array = np.arange(12).astype(dtype).reshape(3, 4)
    tensor = tensors.to_tensor(array)
    assert tensor.raw_data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = tensors.to_numpy(tensor)
    assert back.dtype.byteorder in "<=|"
    np.testing.assert_array_equal(back, array)


def test_big_endian_non_contiguous() -> None:
    array = np.arange(40, dtype=">i4").reshape(5, 8)[:, ::3]
    np.testing.assert_array_equal(tensors.to_numpy(tensors.to_tensor(array)), array)


def test_decoded_array_views_the_message_bytes() -> None:
    tensor = tensors.to_tensor(np.arange(1000, dtype=np.float64))
    back = tensors.to_numpy(tensor)
    assert not back.flags.writeable
    assert not back.flags.owndata
    root = back
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root, bytes)


def test_big_tensor_round_trip() -> None:
    array = np.arange(27 * 1024 * 1024, dtype=np.float32).reshape(-1, 1024)  # 108 MiB
    tensor = tensors.to_tensor(array, "big")
    assert len(tensor.raw_data) == array.nbytes
    back = tensors.to_numpy(tensor)
    assert back.shape == array.shape
    assert back.base is not None and not back.flags.owndata
    assert back[-1, -1] == array[-1, -1]
    assert np.array_equal(back[::4096], array[::4096])


def test_strings_from_bytes_and_str_elements() -> None:
    array = np.array([[b"abc", "d\u00e9f"], [b"", "\x00x"]], dtype=object)
    tensor = tensors.to_tensor(array, "text")
    assert tensor.dtype == DataType.DATA_TYPE_STRING
    assert tensor.raw_data == b""
    assert list(tensor.string_data) == [b"abc", "d\u00e9f".encode(), b"", b"\x00x"]
    back = tensors.to_numpy(round_trip(tensor))
    assert back.dtype == object
    assert back.shape == (2, 2)
    assert back.tolist() == [[b"abc", "d\u00e9f".encode()], [b"", b"\x00x"]]


def test_fixed_width_string_dtypes() -> None:
    unicode_back = tensors.to_numpy(tensors.to_tensor(np.array(["a", "bc\u00fc"])))
    assert unicode_back.tolist() == [b"a", "bc\u00fc".encode()]
    bytes_back = tensors.to_numpy(tensors.to_tensor(np.array([b"x", b"yz"])))
    assert bytes_back.tolist() == [b"x", b"yz"]


STRING_DTYPE = getattr(getattr(np, "dtypes", None), "StringDType", None)  # numpy 2 and later


@pytest.mark.skipif(STRING_DTYPE is None, reason="numpy 2's StringDType")
def test_numpy_string_dtype_arrays_are_strings() -> None:
    assert STRING_DTYPE is not None
    array = np.array([["cat", "z\u00e9bra"], ["", "bird"]], dtype=STRING_DTYPE())[:, ::-1]  # not contiguous
    back = tensors.to_numpy(round_trip(tensors.to_tensor(array, "text")))
    assert back.tolist() == [["z\u00e9bra".encode(), b"cat"], [b"bird", b""]]
    assert tensors.to_text(array).tolist() == [["z\u00e9bra", "cat"], ["bird", ""]]
    with_missing = np.array(["a", None], dtype=STRING_DTYPE(na_object=None))
    with pytest.raises(ValueError, match="tensor 'q': STRING elements must be bytes or str, but element 1 is NoneType"):
        tensors.to_tensor(with_missing, "q")


def test_scalar_string() -> None:
    back = tensors.to_numpy(round_trip(tensors.to_tensor(np.array("hello", dtype=object))))
    assert back.shape == ()
    assert back.item() == b"hello"


def test_string_elements_must_be_bytes_or_str() -> None:
    with pytest.raises(ValueError, match="tensor 'q': STRING elements must be bytes or str, but element 1 is int"):
        tensors.to_tensor(np.array([b"a", 3], dtype=object), "q")
    with pytest.raises(ValueError, match="as it does for integers beyond int64/uint64: give the array a numeric dtype"):
        tensors.to_tensor([2**64, 1], "big")


def test_bfloat16_from_ml_dtypes_travels_as_bit_patterns() -> None:
    array = np.array([1.0, -2.5, 3.0], dtype=ml_dtypes.bfloat16)
    tensor = tensors.to_tensor(array)
    assert tensor.dtype == DataType.DATA_TYPE_BFLOAT16
    assert tensor.raw_data == array.view(np.uint16).astype("<u2").tobytes()
    back = tensors.to_numpy(round_trip(tensor))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back.view(ml_dtypes.bfloat16), array)


def test_uint16_bit_patterns_can_be_sent_as_bfloat16() -> None:
    bits = np.array([0x3F80, 0xC020], dtype=np.uint16)
    tensor = tensors.to_tensor(bits, dtype=DataType.DATA_TYPE_BFLOAT16)
    assert tensor.dtype == DataType.DATA_TYPE_BFLOAT16
    np.testing.assert_array_equal(tensors.to_numpy(tensor), bits)


def test_forced_dtype_must_agree() -> None:
    with pytest.raises(ValueError, match="the array holds float32 \\(FLOAT32\\) but dtype INT32 was requested"):
        tensors.to_tensor(np.zeros(2, np.float32), dtype=DataType.DATA_TYPE_INT32)
    assert tensors.to_tensor(np.zeros(2, np.float32), dtype=DataType.DATA_TYPE_FLOAT32).dtype == 1


@pytest.mark.parametrize("value", [np.zeros(2, np.complex64), np.zeros(2, "datetime64[s]"), np.zeros(2, "V4")])
def test_unsupported_numpy_dtypes(value: np.ndarray) -> None:
    with pytest.raises(ValueError, match="has no ModelForge DataType"):
        tensors.to_tensor(value)


def make(dtype: int, shape: list[int], raw: bytes = b"", strings: list[bytes] | None = None) -> Tensor:
    return Tensor(name="in", dtype=dtype, shape=shape, raw_data=raw, string_data=strings or [])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (make(0, [1], b"\0" * 4), "tensor 'in': dtype is not set"),
        (make(99, [1], b"\0" * 4), "tensor 'in': unknown dtype 99"),
        (
            make(1, [2, 3], b"\0" * 20),
            r"tensor 'in': shape \[2, 3\] of FLOAT32 needs 24 bytes \(6 x 4\), but raw_data has 20",
        ),
        (make(1, [2, -1], b""), r"tensor 'in': shape \[2, -1\] has a negative dimension"),
        (make(1, [], b""), r"needs 4 bytes"),
        (make(1, [1], b"\0" * 4, [b"x"]), "string_data is only for STRING tensors; FLOAT32 goes in raw_data"),
        (make(14, [2], b"", [b"x"]), r"shape \[2\] holds 2 strings, but string_data has 1"),
        (make(14, [1], b"ab", [b"x"]), "STRING elements go in string_data, but raw_data is set"),
        (make(13, [2], b"\x01\x02"), "BOOL elements must be bytes 0 or 1"),
    ],
)
def test_to_numpy_rejects_inconsistent_tensors(tensor: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tensors.to_numpy(tensor)


def test_unnamed_tensor_messages() -> None:
    with pytest.raises(ValueError, match="^tensor: dtype is not set"):
        tensors.to_numpy(Tensor())


@pytest.mark.parametrize("data_type", [d for d in DataType.values() if d != DataType.DATA_TYPE_UNSPECIFIED])
def test_type_tables_are_complete_and_agree_with_onnx(data_type: int) -> None:
    onnx_type = tensors.to_onnx_type(data_type)
    assert tensors.from_onnx_type(onnx_type) == data_type
    assert DataType.Name(data_type).removeprefix("DATA_TYPE_") == tensors.data_type_name(data_type)
    assert tensors.from_ort_type(tensors.to_ort_type(data_type)) == data_type
    assert tensors.from_v2_datatype(tensors.to_v2_datatype(data_type)) == data_type
    if data_type == DataType.DATA_TYPE_STRING:
        assert onnx_type == onnx.TensorProto.STRING
        assert tensors.to_numpy_dtype(data_type) == np.dtype(object)
        with pytest.raises(ValueError, match="no fixed size"):
            tensors.itemsize(data_type)
    elif data_type == DataType.DATA_TYPE_BFLOAT16:
        assert onnx_type == onnx.TensorProto.BFLOAT16
        assert tensors.to_numpy_dtype(data_type) == np.uint16
    else:
        np_dtype = tensors.to_numpy_dtype(data_type)
        assert onnx.helper.tensor_dtype_to_np_dtype(onnx_type) == np_dtype
        assert tensors.from_numpy_dtype(np_dtype) == data_type
        assert tensors.itemsize(data_type) == np_dtype.itemsize


def test_type_table_errors() -> None:
    with pytest.raises(ValueError, match="ONNX element type 14 is not supported"):
        tensors.from_onnx_type(onnx.TensorProto.COMPLEX64)
    with pytest.raises(ValueError, match="'seq\\(tensor\\(float\\)\\)' is not a tensor type"):
        tensors.from_ort_type("seq(tensor(float))")
    with pytest.raises(ValueError, match="unknown datatype 'FP8'"):
        tensors.from_v2_datatype("FP8")
    with pytest.raises(ValueError, match="dtype is not set"):
        tensors.to_ort_type(DataType.DATA_TYPE_UNSPECIFIED)
    assert tensors.data_type_name(77) == "DataType(77)"


def test_spec_from_value_info() -> None:
    dynamic = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64, None])
    spec = tensors.spec_from_value_info(dynamic)
    assert spec.name == "x"
    assert spec.dtype == DataType.DATA_TYPE_FLOAT32
    assert list(spec.shape) == [-1, 64, -1]
    assert list(spec.dim_names) == ["batch", "", ""]
    rankless = onnx.helper.make_tensor_value_info("s", onnx.TensorProto.STRING, None)
    assert list(tensors.spec_from_value_info(rankless).shape) == []
    sequence = onnx.helper.make_tensor_sequence_value_info("seq", onnx.TensorProto.FLOAT, None)
    with pytest.raises(ValueError, match="'seq' is a sequence_type; ModelForge serves tensors only"):
        tensors.spec_from_value_info(sequence)
    complex_input = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.COMPLEX128, [1])
    with pytest.raises(ValueError, match="'c': ONNX element type 15 is not supported"):
        tensors.spec_from_value_info(complex_input)


def test_to_spec_and_spec_of() -> None:
    spec = tensors.to_spec("x", DataType.DATA_TYPE_INT64, [-1, 2], ["batch", ""])
    assert (list(spec.shape), list(spec.dim_names)) == ([-1, 2], ["batch", ""])
    assert list(tensors.to_spec("y", 1, [3]).dim_names) == [""]
    with pytest.raises(ValueError, match="below -1"):
        tensors.to_spec("x", 1, [-2])
    with pytest.raises(ValueError, match="1 dim_names for 2 dimensions"):
        tensors.to_spec("x", 1, [1, 2], ["a"])
    of = tensors.spec_of(np.zeros((2, 5), np.float16), "h")
    assert (of.name, of.dtype, list(of.shape)) == ("h", DataType.DATA_TYPE_FLOAT16, [2, 5])


def test_element_count() -> None:
    assert tensors.element_count([]) == 1
    assert tensors.element_count([2, 0, 3]) == 0
    assert tensors.element_count((4, 5)) == 20


def test_text_decoding_for_onnx_runtime() -> None:
    tensor = tensors.to_tensor(np.array([["caf\u00e9", b"x"]], dtype=object), "t")
    text = tensors.to_numpy(tensor, text=True)
    assert text.dtype == object
    assert text.shape == (1, 2)
    assert text.tolist() == [["caf\u00e9", "x"]]
    bad = Tensor(name="t", dtype=DataType.DATA_TYPE_STRING, shape=[2], string_data=[b"ok", b"a\xffb"])
    with pytest.raises(ValueError, match="tensor 't': string element 1 is not valid UTF-8"):
        tensors.to_numpy(bad, text=True)


@pytest.mark.parametrize(
    "array",
    [
        np.array([b"ab", "c\u00e9"], dtype=object),
        np.array(["ab", "c\u00e9"]),
        np.array(["ab", "c\u00e9"], dtype=object),
        np.array([b"ab", "c\u00e9".encode()]),
    ],
)
def test_to_text(array: np.ndarray) -> None:
    text = tensors.to_text(array)
    assert text.dtype == object
    assert text.tolist() == ["ab", "c\u00e9"]


def test_to_text_rejects_numbers_and_bad_utf8() -> None:
    with pytest.raises(ValueError, match="tensor 'n': expected strings, got an array of int64"):
        tensors.to_text(np.array([1, 2]), "n")
    with pytest.raises(ValueError, match="string element 0 is not valid UTF-8"):
        tensors.to_text(np.array([b"\xff"], dtype=object))


@pytest.mark.parametrize(
    "value",
    [["a\udcff"], np.array(["ok", "a\udcff"]), np.array(["a\udcff"], dtype=object)],
    ids=["list", "str-dtype", "object"],
)
def test_a_str_element_utf8_cannot_encode_is_a_value_error_naming_the_tensor(value: object) -> None:
    with pytest.raises(ValueError, match=r"tensor 'words': string element \d holds a lone surrogate '\\udcff'"):
        tensors.to_tensor(value, "words")


def test_a_ragged_list_is_a_value_error_naming_the_tensor() -> None:
    with pytest.raises(ValueError, match="tensor 'x': numpy cannot make an array .*nested lists must be rectangular"):
        tensors.to_tensor([[1.0, 2.0], [3.0]], "x")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            Tensor(name="x", dtype=DataType.DATA_TYPE_FLOAT32, shape=[0, 2**62]),
            r"tensor 'x': shape \[0, 4611686018427387904\] is too large: its nonzero dimensions multiply to "
            r"4611686018427387904, more than the 2305843009213693951 elements of FLOAT32 an array can hold",
        ),
        (
            Tensor(name="s", dtype=DataType.DATA_TYPE_STRING, shape=[2**40, 0, 2**40]),
            r"tensor 's': shape \[1099511627776, 0, 1099511627776\] is too large: .* elements of STRING",
        ),
        (
            Tensor(name="x", dtype=DataType.DATA_TYPE_UINT8, shape=[0] * 65),
            "tensor 'x': shape has 65 dimensions; a tensor has at most 64 dimensions",
        ),
    ],
    ids=["float32", "string", "rank"],
)
def test_to_numpy_refuses_an_empty_shape_no_array_can_have(tensor: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tensors.to_numpy(round_trip(tensor))
    assert tensors.to_numpy(Tensor(name="x", dtype=DataType.DATA_TYPE_FLOAT32, shape=[0, 2**40])).shape == (0, 2**40)

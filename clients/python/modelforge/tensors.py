"""numpy arrays to and from ``modelforge.common.v1.Tensor``, and the dtype tables.

ModelForge moves tensors as raw little-endian, row-major bytes with a dtype and a
shape; strings travel as repeated bytes. This module is shared by the SDK and the
inference service, and does no I/O.

Copies:

* :func:`to_numpy` copies nothing itself: the array is a read-only view over the
  ``bytes`` object protobuf creates when ``raw_data`` is read (protobuf copies out of
  its arena on every read, so read the field once). Call ``.copy()`` to write to it.
* :func:`to_tensor` makes the one copy that producing a ``bytes`` object requires
  (protobuf then copies it into the message; no buffer-protocol path exists). A
  non-contiguous array is gathered in that same copy; a big-endian array is
  byte-swapped first (one more copy, unavoidable).

bfloat16: numpy has no bfloat16 dtype of its own. :func:`to_numpy` returns
``DATA_TYPE_BFLOAT16`` tensors as ``uint16`` arrays holding the bit patterns, on
every install, so the result never depends on optional packages (ONNX Runtime
takes bfloat16 inputs in that form through
``OrtValue.ortvalue_from_numpy_with_onnx_type``). With ``ml_dtypes`` installed,
``array.view(ml_dtypes.bfloat16)`` reinterprets it without a copy. :func:`to_tensor`
accepts ``ml_dtypes.bfloat16`` arrays (recognised by dtype name, no import needed),
and ``uint16`` bit patterns when called with ``dtype=DataType.DATA_TYPE_BFLOAT16``.

Errors are ``ValueError`` with a message naming the tensor and what was expected;
services turn them into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

# _D.DATA_TYPE_* are the generated module's plain ints: reading DataType.DATA_TYPE_* goes through the enum
# wrapper's __getattr__, several times slower, and to_numpy reads a few per tensor of every request.
from modelforge.common.v1 import tensor_pb2 as _D
from modelforge.common.v1.tensor_pb2 import DataType, Tensor, TensorSpec

__all__ = [
    "DataType",
    "data_type_name",
    "element_count",
    "from_numpy_dtype",
    "from_onnx_type",
    "from_ort_type",
    "from_v2_datatype",
    "itemsize",
    "spec_from_value_info",
    "spec_of",
    "to_numpy",
    "to_numpy_dtype",
    "to_onnx_type",
    "to_ort_type",
    "to_spec",
    "to_tensor",
    "to_text",
    "to_v2_datatype",
]

# DataType -> little-endian numpy dtype. STRING has no fixed-size dtype (object arrays of bytes).
_NUMPY: dict[int, np.dtype[Any]] = {
    _D.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    _D.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    _D.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    _D.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    _D.DATA_TYPE_INT8: np.dtype("i1"),
    _D.DATA_TYPE_INT16: np.dtype("<i2"),
    _D.DATA_TYPE_INT32: np.dtype("<i4"),
    _D.DATA_TYPE_INT64: np.dtype("<i8"),
    _D.DATA_TYPE_UINT8: np.dtype("u1"),
    _D.DATA_TYPE_UINT16: np.dtype("<u2"),
    _D.DATA_TYPE_UINT32: np.dtype("<u4"),
    _D.DATA_TYPE_UINT64: np.dtype("<u8"),
    _D.DATA_TYPE_BOOL: np.dtype("?"),
}

# numpy kind+itemsize -> DataType, for arrays coming in (uint16 means UINT16, never BFLOAT16).
_FROM_NUMPY: dict[tuple[str, int], int] = {
    ("f", 4): _D.DATA_TYPE_FLOAT32,
    ("f", 8): _D.DATA_TYPE_FLOAT64,
    ("f", 2): _D.DATA_TYPE_FLOAT16,
    ("i", 1): _D.DATA_TYPE_INT8,
    ("i", 2): _D.DATA_TYPE_INT16,
    ("i", 4): _D.DATA_TYPE_INT32,
    ("i", 8): _D.DATA_TYPE_INT64,
    ("u", 1): _D.DATA_TYPE_UINT8,
    ("u", 2): _D.DATA_TYPE_UINT16,
    ("u", 4): _D.DATA_TYPE_UINT32,
    ("u", 8): _D.DATA_TYPE_UINT64,
    ("b", 1): _D.DATA_TYPE_BOOL,
}

# DataType <-> ONNX TensorProto.DataType (numbers fixed by onnx.proto; no onnx import needed).
_ONNX: dict[int, int] = {
    _D.DATA_TYPE_FLOAT32: 1,
    _D.DATA_TYPE_UINT8: 2,
    _D.DATA_TYPE_INT8: 3,
    _D.DATA_TYPE_UINT16: 4,
    _D.DATA_TYPE_INT16: 5,
    _D.DATA_TYPE_INT32: 6,
    _D.DATA_TYPE_INT64: 7,
    _D.DATA_TYPE_STRING: 8,
    _D.DATA_TYPE_BOOL: 9,
    _D.DATA_TYPE_FLOAT16: 10,
    _D.DATA_TYPE_FLOAT64: 11,
    _D.DATA_TYPE_UINT32: 12,
    _D.DATA_TYPE_UINT64: 13,
    _D.DATA_TYPE_BFLOAT16: 16,
}
_FROM_ONNX = {v: k for k, v in _ONNX.items()}

# DataType <-> ONNX Runtime's type strings (NodeArg.type).
_ORT: dict[int, str] = {
    _D.DATA_TYPE_FLOAT32: "tensor(float)",
    _D.DATA_TYPE_FLOAT64: "tensor(double)",
    _D.DATA_TYPE_FLOAT16: "tensor(float16)",
    _D.DATA_TYPE_BFLOAT16: "tensor(bfloat16)",
    _D.DATA_TYPE_INT8: "tensor(int8)",
    _D.DATA_TYPE_INT16: "tensor(int16)",
    _D.DATA_TYPE_INT32: "tensor(int32)",
    _D.DATA_TYPE_INT64: "tensor(int64)",
    _D.DATA_TYPE_UINT8: "tensor(uint8)",
    _D.DATA_TYPE_UINT16: "tensor(uint16)",
    _D.DATA_TYPE_UINT32: "tensor(uint32)",
    _D.DATA_TYPE_UINT64: "tensor(uint64)",
    _D.DATA_TYPE_BOOL: "tensor(bool)",
    _D.DATA_TYPE_STRING: "tensor(string)",
}
_FROM_ORT = {v: k for k, v in _ORT.items()}

# DataType <-> Open Inference Protocol (V2) datatype strings.
_V2: dict[int, str] = {
    _D.DATA_TYPE_FLOAT32: "FP32",
    _D.DATA_TYPE_FLOAT64: "FP64",
    _D.DATA_TYPE_FLOAT16: "FP16",
    _D.DATA_TYPE_BFLOAT16: "BF16",
    _D.DATA_TYPE_INT8: "INT8",
    _D.DATA_TYPE_INT16: "INT16",
    _D.DATA_TYPE_INT32: "INT32",
    _D.DATA_TYPE_INT64: "INT64",
    _D.DATA_TYPE_UINT8: "UINT8",
    _D.DATA_TYPE_UINT16: "UINT16",
    _D.DATA_TYPE_UINT32: "UINT32",
    _D.DATA_TYPE_UINT64: "UINT64",
    _D.DATA_TYPE_BOOL: "BOOL",
    _D.DATA_TYPE_STRING: "BYTES",
}
_FROM_V2 = {v: k for k, v in _V2.items()}

_LITTLE_ENDIAN = sys.byteorder == "little"


def data_type_name(dtype: DataType.ValueType | int) -> str:
    """The short name of a DataType for messages: ``"FLOAT32"``, ``"STRING"``, or ``"DataType(99)"``."""
    try:
        return DataType.Name(dtype).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        return f"DataType({int(dtype)})"


def _known(dtype: DataType.ValueType | int, what: str = "tensor") -> DataType.ValueType:
    if dtype == _D.DATA_TYPE_UNSPECIFIED:
        raise ValueError(f"{what}: dtype is not set; set it to one of the DataType values (e.g. DATA_TYPE_FLOAT32)")
    if dtype not in _ORT:
        raise ValueError(f"{what}: unknown dtype {int(dtype)}; this version of ModelForge knows 1 to 14")
    return DataType.ValueType(dtype)


def to_numpy_dtype(dtype: DataType.ValueType | int) -> np.dtype[Any]:
    """The numpy dtype that holds elements of ``dtype``.

    Args:
        dtype: A DataType value.

    Returns:
        A little-endian numpy dtype; ``uint16`` for BFLOAT16 (bit patterns) and
        ``object`` for STRING (elements are ``bytes``).

    Raises:
        ValueError: ``dtype`` is unspecified or unknown.
    """
    dtype = _known(dtype, "dtype")
    if dtype == _D.DATA_TYPE_STRING:
        return np.dtype(object)
    return _NUMPY[dtype]


@functools.lru_cache(maxsize=256)
def from_numpy_dtype(dtype: np.dtype[Any] | type | str) -> DataType.ValueType:
    """The DataType for a numpy dtype (remembered: servers ask it for the dtype of every output they answer with).

    ``str`` (fixed-width or numpy 2's StringDType), ``bytes`` and ``object`` dtypes map to STRING,
    ``ml_dtypes.bfloat16`` to BFLOAT16 and ``uint16`` to UINT16.

    Raises:
        ValueError: the dtype has no DataType (complex, datetime, float8 ...).
    """
    dt = np.dtype(dtype)
    if dt.kind in "OSUT":  # T: numpy 2's variable-width StringDType
        return _D.DATA_TYPE_STRING
    if dt.name == "bfloat16":
        return _D.DATA_TYPE_BFLOAT16
    found = _FROM_NUMPY.get((dt.kind, dt.itemsize))
    if found is None or dt.fields is not None:
        raise ValueError(
            f"numpy dtype {dt} has no ModelForge DataType; convert the array to one of "
            "float16/32/64, (u)int8/16/32/64, bool, bfloat16 or str/bytes"
        )
    return DataType.ValueType(found)


def itemsize(dtype: DataType.ValueType | int) -> int:
    """Bytes per element of a fixed-size DataType.

    Raises:
        ValueError: ``dtype`` is STRING (variable size), unspecified or unknown.
    """
    dtype = _known(dtype, "dtype")
    if dtype == _D.DATA_TYPE_STRING:
        raise ValueError("STRING elements have no fixed size")
    return _NUMPY[dtype].itemsize


def to_onnx_type(dtype: DataType.ValueType | int) -> int:
    """The ONNX ``TensorProto.DataType`` number for a DataType (FLOAT32 -> 1 ``FLOAT``)."""
    return _ONNX[_known(dtype, "dtype")]


def from_onnx_type(elem_type: int) -> DataType.ValueType:
    """The DataType for an ONNX ``TensorProto.DataType`` number.

    Raises:
        ValueError: the ONNX type has no DataType (complex, float8, int4 ...).
    """
    found = _FROM_ONNX.get(elem_type)
    if found is None:
        raise ValueError(
            f"ONNX element type {elem_type} is not supported by ModelForge; supported are float16/32/64, "
            "bfloat16, (u)int8/16/32/64, bool and string"
        )
    return DataType.ValueType(found)


def to_ort_type(dtype: DataType.ValueType | int) -> str:
    """ONNX Runtime's type string for a DataType (FLOAT32 -> ``"tensor(float)"``)."""
    return _ORT[_known(dtype, "dtype")]


def from_ort_type(type_string: str) -> DataType.ValueType:
    """The DataType for an ONNX Runtime type string such as ``"tensor(int64)"``.

    Raises:
        ValueError: not a tensor type ModelForge supports (sequences, maps, complex ...).
    """
    found = _FROM_ORT.get(type_string)
    if found is None:
        raise ValueError(f"ONNX Runtime type {type_string!r} is not a tensor type ModelForge supports")
    return DataType.ValueType(found)


def to_v2_datatype(dtype: DataType.ValueType | int) -> str:
    """The Open Inference Protocol datatype string for a DataType (FLOAT32 -> ``"FP32"``, STRING -> ``"BYTES"``)."""
    return _V2[_known(dtype, "dtype")]


def from_v2_datatype(datatype: str) -> DataType.ValueType:
    """The DataType for an Open Inference Protocol datatype string (``"FP32"``, ``"BYTES"`` ...).

    Raises:
        ValueError: an unknown datatype string.
    """
    found = _FROM_V2.get(datatype)
    if found is None:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(sorted(_FROM_V2))}")
    return DataType.ValueType(found)


def element_count(shape: Iterable[int]) -> int:
    """The number of elements of a shape (1 for a scalar ``()``)."""
    return math.prod(shape)


# numpy's limits on an array: at most this many dimensions, and at most this many bytes spanned by its dimensions.
_MAX_RANK = 64
_MAX_BYTES = int(np.iinfo(np.intp).max)


def _check_shape(shape: Sequence[int], dtype: DataType.ValueType, what: str) -> int:
    """The element count of ``shape``, refused before anything is allocated if no numpy array of ``dtype`` (object,
    for STRING) can have that shape."""
    for dim in shape:
        if dim < 0:
            raise ValueError(f"{what}: shape {list(shape)} has a negative dimension; dimensions are 0 or more")
    if len(shape) > _MAX_RANK:
        raise ValueError(f"{what}: shape has {len(shape)} dimensions; a tensor has at most {_MAX_RANK} dimensions")
    count = math.prod(shape)
    # numpy refuses a shape whose nonzero dimensions multiply, times the element size, past the largest intp,
    # even when a dimension of 0 leaves the array empty.
    spanned = count if count else math.prod(dim for dim in shape if dim)
    limit = _MAX_BYTES // to_numpy_dtype(dtype).itemsize
    if spanned > limit:
        raise ValueError(
            f"{what}: shape {list(shape)} is too large: its nonzero dimensions multiply to {spanned}, more than the "
            f"{limit} elements of {data_type_name(dtype)} an array can hold"
        )
    return count


def to_numpy(tensor: Tensor, *, text: bool = False) -> np.ndarray[Any, Any]:
    """Decodes a Tensor into a numpy array without copying the data.

    Args:
        tensor: The message. Numbers come from ``raw_data`` (little-endian, row-major),
            strings from ``string_data``.
        text: For STRING, decode each element as UTF-8 and return ``str`` elements.
            ONNX Runtime needs this: it turns ``bytes`` elements of object arrays into
            their ``repr`` (``"b'cat'"``) and only handles UTF-8 text.

    Returns:
        For numbers, a read-only array viewing the message's bytes (``uint16`` bit
        patterns for BFLOAT16). For STRING, an ``object`` array of ``bytes`` (or of
        ``str`` with ``text=True``).

    Raises:
        ValueError: dtype unset or unknown, a negative dimension, a shape no array can have, a byte length that
            does not match the shape, data in the wrong field, BOOL bytes other than 0 and 1,
            or (with ``text=True``) an element that is not valid UTF-8.
    """
    what = f"tensor {tensor.name!r}" if tensor.name else "tensor"
    dtype = _known(tensor.dtype, what)
    shape = tuple(tensor.shape)
    count = _check_shape(shape, dtype, what)
    if dtype == _D.DATA_TYPE_STRING:
        if tensor.raw_data:
            raise ValueError(f"{what}: STRING elements go in string_data, but raw_data is set")
        strings = tensor.string_data
        if len(strings) != count:
            raise ValueError(f"{what}: shape {list(shape)} holds {count} strings, but string_data has {len(strings)}")
        out = np.empty(count, dtype=object)
        out[:] = _decode_utf8(strings, what) if text else list(strings)
        return out.reshape(shape)
    if tensor.string_data:
        raise ValueError(f"{what}: string_data is only for STRING tensors; {data_type_name(dtype)} goes in raw_data")
    npdtype = _NUMPY[dtype]
    raw = tensor.raw_data
    expected = count * npdtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{what}: shape {list(shape)} of {data_type_name(dtype)} needs {expected} bytes "
            f"({count} x {npdtype.itemsize}), but raw_data has {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=npdtype).reshape(shape)
    if dtype == _D.DATA_TYPE_BOOL and count and array.view(np.uint8).max() > 1:
        raise ValueError(f"{what}: BOOL elements must be bytes 0 or 1")
    return array


def _decode_utf8(strings: Iterable[bytes], what: str) -> list[str]:
    out: list[str] = []
    for index, item in enumerate(strings):
        try:
            out.append(item.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{what}: string element {index} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "models take strings as UTF-8 text"
            ) from None
    return out


def to_text(array: Any, name: str = "") -> np.ndarray[Any, Any]:
    """Turns a string array (bytes or str elements, or an S/U dtype) into an ``object`` array of ``str``.

    The form ONNX Runtime takes for ``tensor(string)`` inputs. ``bytes`` are decoded as UTF-8.

    Raises:
        ValueError: an element is neither bytes nor str, or is not valid UTF-8.
    """
    what = f"tensor {name!r}" if name else "tensor"
    values: np.ndarray[Any, Any] = np.asarray(array)
    if values.dtype.kind in "UT":
        return values.astype(object)
    if values.dtype.kind not in "OS":
        raise ValueError(f"{what}: expected strings, got an array of {values.dtype}")
    items = values.ravel(order="C").tolist()
    if values.dtype.kind == "O" and all(type(item) is str for item in items):
        decoded: list[str] = items
    else:
        decoded = _decode_utf8(_string_elements(values, what), what)
    out = np.empty(values.size, dtype=object)
    out[:] = decoded
    return out.reshape(values.shape)


def _string_elements(array: np.ndarray[Any, Any], what: str) -> list[bytes]:
    flat = array.ravel(order="C")
    if array.dtype.kind == "S":
        # Fixed-width bytes drop trailing NULs, as numpy itself does on item access.
        return flat.tolist()
    if array.dtype.kind == "U":
        texts = flat.tolist()
        try:
            return [s.encode("utf-8") for s in texts]
        except UnicodeEncodeError:  # found again below, to say which element
            return [_encode_utf8(s, index, what) for index, s in enumerate(texts)]
    out: list[bytes] = []
    for index, item in enumerate(flat.tolist()):
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, str):
            out.append(_encode_utf8(item, index, what))
        elif isinstance(item, bytearray | memoryview):
            out.append(bytes(item))
        else:
            hint = ""
            if isinstance(item, int | float) and not isinstance(item, bool):  # numpy made an object array of numbers
                hint = (
                    "; an array of numbers reaches here when numpy holds them as objects, as it does for integers "
                    "beyond int64/uint64: give the array a numeric dtype"
                )
            raise ValueError(
                f"{what}: STRING elements must be bytes or str, but element {index} is {type(item).__name__}{hint}"
            )
    return out


def _encode_utf8(text: str, index: int, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, as os.fsdecode or errors="surrogateescape" leave
        raise ValueError(
            f"{what}: string element {index} holds a lone surrogate {text[exc.start]!r} at character {exc.start}, "
            "which UTF-8 cannot encode: pass the element's original bytes instead of str, or fix the text"
        ) from None


def _as_array(values: Any, what: str) -> np.ndarray[Any, Any]:
    try:
        return np.asarray(values)
    except ValueError as exc:
        hint = ""
        if "inhomogeneous" in str(exc):
            hint = "; nested lists must be rectangular, every list at one depth as long as the others"
        raise ValueError(f"{what}: numpy cannot make an array of the values given ({exc}){hint}") from None


def to_tensor(
    array: Any,
    name: str = "",
    *,
    dtype: DataType.ValueType | int | None = None,
) -> Tensor:
    """Encodes an array as a Tensor.

    Args:
        array: A numpy array or anything ``np.asarray`` accepts (scalars, nested lists).
            ``str``, ``bytes`` and ``object`` arrays (of ``bytes`` or ``str``) become STRING,
            with ``str`` encoded as UTF-8.
        name: The input or output name.
        dtype: Force a DataType. Only needed for BFLOAT16 bit patterns held in ``uint16``;
            otherwise it must agree with the array's dtype.

    Returns:
        The message. For numbers, ``raw_data`` holds the little-endian bytes, made with one
        copy when the array is C-contiguous and little-endian.

    Raises:
        ValueError: the values are no array (a ragged nested list), the array's dtype has no DataType,
            ``dtype`` disagrees with it, or a STRING element is neither bytes nor str, or is a str UTF-8 cannot
            encode (one with a lone surrogate).
    """
    what = f"tensor {name!r}" if name else "tensor"
    array = _as_array(array, what)
    found = from_numpy_dtype(array.dtype)
    if dtype is not None and dtype != found:
        dtype = _known(dtype, what)
        if not (dtype == _D.DATA_TYPE_BFLOAT16 and found == _D.DATA_TYPE_UINT16):
            raise ValueError(
                f"{what}: the array holds {array.dtype} ({data_type_name(found)}) but dtype "
                f"{data_type_name(dtype)} was requested; convert it with array.astype(...) first"
            )
        found = dtype
    shape = array.shape
    if found == _D.DATA_TYPE_STRING:
        return Tensor(name=name, dtype=found, shape=shape, string_data=_string_elements(array, what))
    return Tensor(name=name, dtype=found, shape=shape, raw_data=_little_endian_bytes(array))


def _little_endian_bytes(array: np.ndarray[Any, Any]) -> bytes:
    byteorder = array.dtype.byteorder
    if byteorder == ">" or (byteorder == "=" and not _LITTLE_ENDIAN):
        # One pass swaps and gathers into a new C-contiguous array; tobytes then copies it once.
        array = array.astype(array.dtype.newbyteorder("<"), order="C")
    # tobytes gathers a non-contiguous array in the same single copy.
    return array.tobytes(order="C")


class _ValueInfo(Protocol):
    """The parts of ``onnx.ValueInfoProto`` that :func:`spec_from_value_info` reads."""

    name: str
    type: Any


def spec_from_value_info(value_info: _ValueInfo) -> TensorSpec:
    """Builds a TensorSpec from an ONNX graph input or output (``onnx.ValueInfoProto``).

    Dimensions given by a number keep it; symbolic dimensions (``"batch"``) and
    unknown ones become -1, with the symbol in ``dim_names``.

    Raises:
        ValueError: the value is not a tensor, or its element type is not supported.
    """
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ValueError(f"{value_info.name!r} is a {kind or 'untyped value'}; ModelForge serves tensors only")
    tensor_type = value_info.type.tensor_type
    try:
        dtype = from_onnx_type(tensor_type.elem_type)
    except ValueError as exc:
        raise ValueError(f"{value_info.name!r}: {exc}") from None
    shape: list[int] = []
    names: list[str] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            which = dim.WhichOneof("value")
            shape.append(dim.dim_value if which == "dim_value" else -1)
            names.append(dim.dim_param if which == "dim_param" else "")
    return TensorSpec(name=value_info.name, dtype=dtype, shape=shape, dim_names=names)


def to_spec(
    name: str,
    dtype: DataType.ValueType | int,
    shape: Sequence[int],
    dim_names: Sequence[str] | None = None,
) -> TensorSpec:
    """Builds a TensorSpec, checking its parts.

    Args:
        name: The input or output name.
        dtype: The element type.
        shape: One entry per dimension; -1 for a dynamic one.
        dim_names: Symbolic names, one per dimension ("" where none); omitted means none.

    Raises:
        ValueError: an unknown dtype, a dimension below -1, or ``dim_names`` of the wrong length.
    """
    what = f"spec {name!r}"
    dtype = _known(dtype, what)
    if any(d < -1 for d in shape):
        raise ValueError(f"{what}: shape {list(shape)} has a dimension below -1")
    names = list(dim_names) if dim_names is not None else [""] * len(shape)
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} dim_names for {len(shape)} dimensions")
    return TensorSpec(name=name, dtype=dtype, shape=shape, dim_names=names)


def spec_of(array: Any, name: str = "") -> TensorSpec:
    """The TensorSpec describing an array exactly (no dynamic dimensions)."""
    array = np.asarray(array)
    return TensorSpec(name=name, dtype=from_numpy_dtype(array.dtype), shape=array.shape)

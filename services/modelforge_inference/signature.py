"""Checks request inputs and output names against a model's signature before ONNX Runtime sees them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from modelforge import tensors
from modelforge_inference.domain import BFLOAT16, DYNAMIC, Signature, TensorSpec, declared_bfloat16
from modelforge_inference.errors import InvalidInput, NonTensorOutput, RequestTooLarge, UnknownOutput

_OBJECT = np.dtype(object)


def describe(spec: TensorSpec) -> str:
    """How an input is declared, for messages: "float32 [-1, 64]"."""
    return f"{dtype_name(spec)} {list(spec.shape)}"


def dtype_name(spec: TensorSpec) -> str:
    """The element type in numpy's words ("float32", "int64"), which is also what the SDK's `models show` prints;
    "string" and "bfloat16" for the types numpy lacks."""
    if spec.is_string:
        return "string"
    if spec.ort_type == BFLOAT16:
        return "bfloat16"
    return str(spec.dtype)


def _array_dtype_name(array: np.ndarray[Any, Any]) -> str:
    if declared_bfloat16(array):
        return "bfloat16"
    return "string" if array.dtype.kind in "OSU" else str(array.dtype)


def request_bytes(inputs: Mapping[str, np.ndarray[Any, Any]]) -> int:
    """The payload size of a request: raw bytes of number tensors, element bytes of string tensors."""
    total = 0
    for array in inputs.values():
        if array.dtype == _OBJECT:
            total += sum(len(item) for item in array.reshape(-1).tolist() if isinstance(item, bytes | str))
        else:
            total += array.nbytes
    return total


# What one answer message spends on an output besides its data (name, datatype, shape and the fields' framing) is
# at most this plus the name and _DIM_BYTES per dimension; the answer's own fields (model, version, sha256, timings)
# at most _ANSWER_HEAD_BYTES plus the model's name.
_OUTPUT_FRAMING_BYTES = 64
_DIM_BYTES = 11
_ANSWER_HEAD_BYTES = 1024
# An element of a string output costs its bytes and at most this in framing (a 4-byte length prefix in V2's BYTES,
# a key and a varint length in string_data).
_ELEMENT_FRAMING_BYTES = 6


def answer_bytes(model: str, outputs: Mapping[str, np.ndarray[Any, Any]]) -> int:
    """An upper bound on the size of one answer message of either API carrying ``outputs`` of ``model``."""
    total = _ANSWER_HEAD_BYTES + len(model.encode())
    for name, array in outputs.items():
        total += _OUTPUT_FRAMING_BYTES + len(name.encode()) + _DIM_BYTES * array.ndim
        if array.dtype.kind in "OSU":
            total += sum(len(element) + _ELEMENT_FRAMING_BYTES for element in encoded_elements(array))
        else:
            total += array.nbytes
    return total


# String outputs of more elements than this are encoded (checked, hashed) on a thread, not on the event loop.
STRINGS_OFF_LOOP = 4096


def encoded_elements(array: np.ndarray[Any, Any]) -> Iterator[bytes]:
    """The elements of a string array as an answer carries them (UTF-8 for text), one at a time."""
    return (item if isinstance(item, bytes) else str(item).encode() for item in array.reshape(-1).tolist())


def string_elements(array: np.ndarray[Any, Any]) -> list[bytes]:
    """The elements of a string array as an answer carries them, all at once."""
    return list(encoded_elements(array))


def least_output_bytes(signature: Signature, feeds: Mapping[str, np.ndarray[Any, Any]], names: Iterable[str]) -> int:
    """The bytes the named outputs of a run on ``feeds`` take at the least, known before it runs: those of the
    numeric outputs whose shape the signature fixes (see _known_shape); the others count nothing."""
    rows = batch_rows(feeds) if signature.batchable else None
    total = 0
    for name in names:
        spec = signature.output(name)
        if spec is not None and spec.dtype.kind in "biuf" and (shape := _known_shape(spec, rows)) is not None:
            total += math.prod(shape) * spec.dtype.itemsize
    return total


def _known_shape(spec: TensorSpec, rows: int | None) -> list[int] | None:
    """The shape an output of a run will have, where the signature fixes it: a dynamic leading dimension follows
    the inputs' ``rows`` (None when the model does not batch); None when any other dimension is dynamic."""
    dims = list(spec.shape)
    if rows is not None and dims and dims[0] == DYNAMIC:
        dims[0] = rows
    return None if DYNAMIC in dims else dims


def check_inputs(
    signature: Signature, inputs: Mapping[str, np.ndarray[Any, Any]], *, max_request_bytes: int
) -> dict[str, np.ndarray[Any, Any]]:
    """Returns the inputs in signature order, ready for ONNX Runtime; raises InvalidArgument naming the input.

    Checks, in order: total size, unknown names, missing inputs, dtype, rank, fixed dimensions. String inputs given
    as numpy str/bytes arrays are turned into object arrays, which is what ONNX Runtime takes.
    """
    size = request_bytes(inputs)
    if size > max_request_bytes:
        raise RequestTooLarge(size, max_request_bytes)
    known = {spec.name for spec in signature.inputs}
    for name in inputs:
        if name not in known:
            has = f"its inputs are {', '.join(map(repr, sorted(known)))}" if known else "it takes no inputs: send none"
            raise InvalidInput(name, f"the model has no such input; {has}")
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for spec in signature.inputs:
        array = inputs.get(spec.name)
        if array is None:
            raise InvalidInput(spec.name, f"missing; the model needs it as {describe(spec)}")
        feeds[spec.name] = check_tensor(spec, array)
    if signature.shared_dims:
        _check_shared_dims(signature, list(feeds.values()))
    return feeds


def _check_shared_dims(signature: Signature, arrays: list[np.ndarray[Any, Any]]) -> None:
    """Raises InvalidInput when inputs differ in a dimension the model names alike (input_ids and attention_mask
    both [batch, seq]): ONNX Runtime would fail on them, or broadcast one against the other."""
    for name, places in signature.shared_dims:
        (first, first_axis), *others = places
        size = arrays[first].shape[first_axis]
        for index, axis in others:
            if arrays[index].shape[axis] != size:
                spec, other = signature.inputs[index], signature.inputs[first]
                there = f"its dimension {first_axis}"
                if index != first:
                    there = f"dimension {first_axis} of input {other.name!r}"
                raise InvalidInput(
                    spec.name,
                    f"dimension {axis} ({name!r}) is {arrays[index].shape[axis]}, but {there} is {size}: the model "
                    f"names both {name!r}, so they must be equal",
                )


def check_tensor(spec: TensorSpec, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Checks one input's dtype, rank and fixed dimensions; returns it as ONNX Runtime takes it."""
    if spec.is_string:
        if array.dtype.kind not in "OSU":
            raise InvalidInput(
                spec.name, f"expected string elements (DATA_TYPE_STRING), got {_array_dtype_name(array)}"
            )
        try:
            array = tensors.to_text(array, spec.name)  # ONNX Runtime takes str elements, not bytes
        except ValueError as exc:
            raise InvalidInput(spec.name, str(exc).removeprefix(f"tensor {spec.name!r}: ")) from None
    elif array.dtype != spec.dtype or (declared_bfloat16(array) and spec.ort_type != BFLOAT16):
        name = dtype_name(spec)
        convert = "" if name == "bfloat16" else f"; send {name} (numpy: array.astype('{name}'))"
        raise InvalidInput(
            spec.name, f"expected dtype {name}, got {_array_dtype_name(array)}; declared {describe(spec)}{convert}"
        )
    if array.ndim != len(spec.shape):
        raise InvalidInput(
            spec.name,
            f"expected rank {len(spec.shape)} ({describe(spec)}), got shape {list(array.shape)} of rank {array.ndim}",
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if want != DYNAMIC and want != got:
            raise InvalidInput(
                spec.name,
                f"dimension {axis} must be {want} ({describe(spec)}), got {got} in shape {list(array.shape)}",
            )
    return array


def check_outputs(signature: Signature, names: Iterable[str] | None) -> tuple[str, ...]:
    """The requested output names in request order without duplicates, or every tensor output when none are named.

    Raises NonTensorOutput for an output the graph has but that is not a tensor, UnknownOutput for any other name
    that is not a tensor output.
    """
    known = [spec.name for spec in signature.outputs]
    if not names:
        return tuple(known)
    chosen: list[str] = []
    for name in names:
        if name not in known:
            if name in signature.non_tensor_outputs:
                raise NonTensorOutput(name, known)
            raise UnknownOutput(name, known)
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def batch_key(feeds: Mapping[str, np.ndarray[Any, Any]]) -> tuple[tuple[int, ...], ...]:
    """Requests with equal keys can be stacked along dimension 0: every other dimension agrees."""
    return tuple(array.shape[1:] for array in feeds.values())


def batch_rows(feeds: Mapping[str, np.ndarray[Any, Any]]) -> int | None:
    """The leading dimension shared by every input, or None when they differ (such a request runs alone)."""
    rows = {array.shape[0] if array.ndim else -1 for array in feeds.values()}
    return rows.pop() if len(rows) == 1 and -1 not in rows else None


def counted_rows(rows: int | None) -> int:
    """The inferences a request of ``rows`` (batch_rows) counts for: its rows, none for an empty batch, and 1 for
    a request whose inputs share no leading dimension."""
    return 1 if rows is None else rows


def output_views(
    signature: Signature, feeds: Mapping[str, np.ndarray[Any, Any]], memory: Mapping[str, memoryview]
) -> dict[str, np.ndarray[Any, Any]] | None:
    """Arrays over ``memory`` (little-endian, row-major) typed and shaped as the named outputs of a run on
    ``feeds`` will be, for ONNX Runtime to write those outputs into; None unless every named output holds numbers,
    has a shape that the signature fixes (a dynamic leading dimension follows the inputs' rows when the model
    batches), and fits its memory."""
    rows = batch_rows(feeds) if signature.batchable else None
    views: dict[str, np.ndarray[Any, Any]] = {}
    for name, buffer in memory.items():
        spec = signature.output(name)
        if spec is None or spec.dtype.kind not in "biuf" or spec.ort_type == BFLOAT16:
            return None
        dims = _known_shape(spec, rows)
        if dims is None or (count := math.prod(dims)) * spec.dtype.itemsize > len(buffer):
            return None
        view = np.frombuffer(buffer, dtype=spec.dtype.newbyteorder("<"), count=count).reshape(dims)
        if not (view.flags.writeable and view.flags.aligned):
            return None
        views[name] = view
    return views

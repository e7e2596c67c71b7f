"""Open Inference Protocol (V2) messages to and from numpy arrays and the inference domain.

Tensors arrive either as raw little-endian bytes (``raw_input_contents``, one entry per
input, in the order of ``inputs``) or as typed ``InferTensorContents``. Raw numbers
become read-only numpy views over the bytes protobuf hands out, without another copy.
BYTES elements travel raw as a 4-byte little-endian length followed by the bytes, and
become ``object`` arrays of ``bytes``. FP16 is ``float16``; BF16 has no numpy dtype and
is carried as ``uint16`` bit patterns, as :mod:`modelforge.tensors` does. Responses
always carry raw bytes.

An input or requested output whose parameters name a ``shared_memory_region`` (with
``shared_memory_byte_size`` and an optional ``shared_memory_offset``) lives in a system
shared memory region the client registered (:mod:`modelforge_inference.shm`): such an
input is read from the region in place of a ``raw_input_contents`` entry, and such an
output is written into it, its ``raw_output_contents`` entry left empty.

A malformed input raises :class:`~modelforge_inference.errors.InvalidInput` naming it,
as the InferenceService does; other malformed requests raise :class:`InvalidV2Request`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from modelforge import tensors
from modelforge._refs import ModelRef
from modelforge.oip.v2 import grpc_service_pb2 as pb
from modelforge.oip.v2 import model_config_pb2 as config_pb
from modelforge_inference import wire
from modelforge_inference.domain import (
    BFLOAT16_BITS,
    LoadedModel,
    ModelState,
    ModelStatistics,
    RepositoryEntry,
    ResolvedModel,
    ServingConfig,
    Signature,
    TensorSpec,
)
from modelforge_inference.errors import InvalidInput, InvalidSharedMemoryRegion, SharedMemoryOff
from modelforge_inference.shm import Region, SharedMemoryRegions
from modelforge_server.errors import InvalidArgument, NotFound
from modelforge_server.status import MAX_MESSAGE_WIRE_BYTES, MAX_METADATA_WIRE_BYTES, bounded

__all__ = [
    "BACKEND",
    "check_repository_parameters",
    "check_unload_parameters",
    "EXTENSIONS",
    "SHARED_MEMORY_EXTENSION",
    "SharedSlice",
    "PLATFORM",
    "InvalidV2Request",
    "datatype_of",
    "decode_bytes",
    "decode_inputs",
    "encode_bytes",
    "FINAL_RESPONSE",
    "max_batch_size",
    "model_config",
    "model_index",
    "model_metadata",
    "model_ref",
    "named_ref",
    "model_statistics",
    "needs_signature",
    "priority",
    "refuse_sequences",
    "repository_model_ref",
    "requested_outputs",
    "shared_memory_outputs",
    "shared_memory_status",
    "stream_error_response",
    "stream_infer_response",
    "timeout_seconds",
]

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"

# The protocol extensions ModelForge implements, in the names clients test for. Request
# priority and timeout make up "schedule_policy"; "parameters" is the requests' and tensors'
# parameters, which are read where ModelForge knows them and otherwise ignored. System shared
# memory is listed too when the server takes it (MODELFORGE_ALLOW_CLIENT_SHM). No sequences,
# CUDA shared memory, trace or log settings: those RPCs answer UNIMPLEMENTED.
EXTENSIONS = (
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "schedule_policy",
    "parameters",
    "statistics",
)
SHARED_MEMORY_EXTENSION = "system_shared_memory"

# The parameters that put a tensor in a registered shared memory region.
_SHM_REGION = "shared_memory_region"
_SHM_OFFSET = "shared_memory_offset"
_SHM_BYTE_SIZE = "shared_memory_byte_size"

_LENGTH = struct.Struct("<I")
# numpy's NPY_MAXDIMS, the most dimensions an array can have (numpy 2 keeps the constant out of its Python API).
_MAX_RANK = 64
# numpy's limit on an array's size in bytes, even an empty one's: the largest intp.
_MAX_BYTES = int(np.iinfo(np.intp).max)
_BFLOAT16 = "tensor(bfloat16)"
_UINT16 = np.dtype("<u2")

# V2 datatype -> (numpy dtype, the InferTensorContents field holding it, or None for raw only).
_TYPED: dict[str, tuple[np.dtype[Any], str | None]] = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "INT8": (np.dtype("i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "FP16": (np.dtype("<f2"), None),
    "BF16": (BFLOAT16_BITS, None),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "BYTES": (np.dtype(object), "bytes_contents"),
}

# numpy dtype -> V2 datatype of an output, for the dtypes ONNX Runtime returns (uint16 may also mean BF16).
_DATATYPES: dict[np.dtype[Any], str] = {
    dtype: datatype for datatype, (dtype, _) in _TYPED.items() if datatype != "BF16"
}

# V2 datatype -> the model configuration's DataType.
_CONFIG_TYPES: dict[str, config_pb.DataType.ValueType] = {
    "BOOL": config_pb.TYPE_BOOL,
    "UINT8": config_pb.TYPE_UINT8,
    "UINT16": config_pb.TYPE_UINT16,
    "UINT32": config_pb.TYPE_UINT32,
    "UINT64": config_pb.TYPE_UINT64,
    "INT8": config_pb.TYPE_INT8,
    "INT16": config_pb.TYPE_INT16,
    "INT32": config_pb.TYPE_INT32,
    "INT64": config_pb.TYPE_INT64,
    "FP16": config_pb.TYPE_FP16,
    "FP32": config_pb.TYPE_FP32,
    "FP64": config_pb.TYPE_FP64,
    "BYTES": config_pb.TYPE_STRING,
    "BF16": config_pb.TYPE_BF16,
}

# Our lifecycle states in the words RepositoryIndex uses.
_STATES = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.UNLOADING: "UNLOADING",
    ModelState.FAILED: "UNAVAILABLE",
}


class InvalidV2Request(InvalidArgument):
    """An Open Inference Protocol request that cannot be decoded."""

    reason = "INVALID_V2_REQUEST"


class NoSuchV2Model(NotFound):
    """A V2 model name no registry model could have, or version 0: Triton answers NOT_FOUND for a model or version
    it lacks whatever its spelling, and its clients test for that code."""

    reason = "MODEL_NOT_FOUND"


def model_ref(name: str, version: str, *, field: str = "model_name", version_field: str = "model_version") -> ModelRef:
    """The ModelRef of a V2 model name and version (``"3"``, ``"production"`` or ``""``); an error names the
    request field at fault (``field`` for the name, ``version_field`` for the version)."""
    if not name:
        raise InvalidV2Request(f"{field} is required: set it to the registry's model name", field=field)
    try:
        return _parsed_ref(name, version)
    except ValueError as exc:
        error = exc
    at_fault = field
    if version:
        with contextlib.suppress(ValueError):
            _parsed_ref(name, "")  # the name parses alone: the version is at fault
            at_fault = version_field
    if at_fault == field:
        raise NoSuchV2Model(f"no model {name!r}: none could be named so ({error})", model=name)
    if version.isdigit() and int(version) == 0:
        raise NoSuchV2Model(f"model {name!r} has no version 0: versions count from 1", model=name)
    raise InvalidV2Request(str(error), field=at_fault)


# What Triton's clients may send for "the newest version", beside an empty model_version.
LATEST_VERSION = "-1"


def named_ref(name: str, version: str) -> ModelRef:
    """The ModelRef of the model requests (ModelReady, ModelMetadata ...), whose fields are name and version."""
    return model_ref(name, version, field="name", version_field="version")


@functools.lru_cache(maxsize=4096)
def _parsed_ref(name: str, version: str) -> ModelRef:
    """ModelRef.from_parts, remembered: every request repeats one of a few (name, version) pairs. A ModelRef is
    immutable, and a pair that fails to parse raises again (lru_cache keeps no exceptions). Version "-1" is the
    newest, as an empty one is: Triton reads both as its latest version."""
    return ModelRef.from_parts(name, "" if version == LATEST_VERSION else version)


def _shape(tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype[Any]) -> tuple[tuple[int, ...], int]:
    """The input's shape and element count, refused before anything is allocated for it if no numpy array of
    ``dtype`` can have that shape."""
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(tensor.name, f"shape {list(shape)} has a negative dimension; dimensions are 0 or more")
    if len(shape) > _MAX_RANK:
        raise InvalidInput(
            tensor.name, f"shape has {len(shape)} dimensions; an input has at most {_MAX_RANK} dimensions"
        )
    count = tensors.element_count(shape)
    # numpy refuses a shape whose nonzero dimensions multiply, times the element size, past the largest intp,
    # even when a dimension of 0 leaves the array empty.
    spanned = count if count else math.prod(dim for dim in shape if dim)
    if spanned > _MAX_BYTES // dtype.itemsize:
        raise InvalidInput(
            tensor.name,
            f"shape {list(shape)} is too large: its nonzero dimensions multiply to {spanned}, more than the "
            f"{_MAX_BYTES // dtype.itemsize} elements of {tensor.datatype} an array can hold",
        )
    return shape, count


def _dtype(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[np.dtype[Any], str | None]:
    found = _TYPED.get(tensor.datatype)
    if found is None:
        raise InvalidInput(tensor.name, f"unknown datatype {tensor.datatype!r}; use one of {', '.join(sorted(_TYPED))}")
    return found


def decode_bytes(raw: bytes | memoryview, count: int, name: str) -> np.ndarray[Any, Any]:
    """Splits the length-prefixed BYTES elements of input ``name`` into a flat ``object`` array of ``bytes``.

    A ``count`` the data cannot hold is refused before the array is allocated: every element takes at least
    its 4-byte length, so a shape of 2**40 elements over a few bytes is not an 8 TiB allocation.
    """
    if count > len(raw) // _LENGTH.size:
        raise InvalidInput(
            name,
            f"BYTES data of {len(raw)} bytes cannot hold the {count} elements the shape holds; each element is a "
            "4-byte little-endian length followed by that many bytes",
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput(
                name,
                f"BYTES data ends after {index} of {count} elements; each element is a 4-byte "
                "little-endian length followed by that many bytes",
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                name, f"BYTES element {index} declares {length} bytes but only {len(raw) - offset} remain"
            )
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidInput(name, f"{len(raw) - offset} bytes follow the {count} BYTES elements the shape holds")
    return out


def encode_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """Serialises a BYTES array, row-major, each element as a 4-byte little-endian length and its bytes."""
    parts: list[bytes] = []
    for item in array.ravel(order="C").tolist():
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _from_raw(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | memoryview,
    source: str = "its raw_input_contents entry",
) -> np.ndarray[Any, Any]:
    dtype, _ = _dtype(tensor)
    shape, count = _shape(tensor, dtype)
    if tensor.datatype == "BYTES":
        return decode_bytes(raw, count, tensor.name).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            tensor.name,
            f"shape {list(shape)} of {tensor.datatype} needs {expected} bytes "
            f"({count} x {dtype.itemsize}), but {source} has {len(raw)}",
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if tensor.datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidInput(tensor.name, "BOOL elements must be bytes 0 or 1")
    return array


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray[Any, Any]:
    dtype, field = _dtype(tensor)
    shape, count = _shape(tensor, dtype)
    if field is None:
        raise InvalidInput(tensor.name, f"{tensor.datatype} has no typed contents field; send it in raw_input_contents")
    given = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if any(name != field for name in given):
        wrong = ", ".join(f"contents.{name}" for name in given if name != field)
        raise InvalidInput(tensor.name, f"its datatype {tensor.datatype} takes contents.{field}, but {wrong} was given")
    if not given and count:
        raise InvalidInput(
            tensor.name,
            f"no data: send its {count} elements in contents.{field} or as an entry of raw_input_contents",
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            tensor.name, f"shape {list(shape)} holds {count} elements, but contents.{field} has {len(values)}"
        )
    if tensor.datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    wide = np.asarray(values, dtype=np.int64 if dtype.kind in "iu" and dtype.itemsize < 8 else dtype)
    if wide.dtype != dtype:
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(
                tensor.name,
                f"a value of contents.{field} is outside the range of {tensor.datatype} ({info.min} to {info.max})",
            )
        wide = wide.astype(dtype)
    return wide.reshape(shape)


def decode_inputs(
    request: pb.ModelInferRequest, regions: SharedMemoryRegions | None = None
) -> dict[str, np.ndarray[Any, Any]]:
    """The request's inputs as numpy arrays, by name. Inputs in shared memory are read-only views of ``regions``.

    Raises:
        InvalidV2Request: an unnamed input, or raw_input_contents entries that do not match the inputs.
        InvalidInput: a duplicate input, an unknown datatype, a negative dimension, more dimensions than
            numpy's 64 or a shape too large for an array, data that does not match the shape, or raw and typed
            data mixed.
        SharedMemoryOff, SharedMemoryRegionNotFound, InvalidSharedMemoryRegion: an input
            names a region this server does not have, or bytes outside it.
    """
    inputs = request.inputs
    # Read the repeated bytes field once: every read copies the bytes out of the message.
    raws = list(request.raw_input_contents)
    taken = 0  # raw entries belong, in order, to the inputs that are not in shared memory
    out: dict[str, np.ndarray[Any, Any]] = {}
    for index, tensor in enumerate(inputs):
        if not tensor.name:
            raise InvalidV2Request(f"inputs[{index}].name is required", field="inputs.name")
        if tensor.name in out:
            raise InvalidInput(tensor.name, "appears twice in inputs; send each input once")
        shared = _shared_memory(tensor.name, tensor.parameters, regions) if tensor.parameters else None
        if shared is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    tensor.name, "typed contents are set while the input is in shared memory; send it one way"
                )
            out[tensor.name] = _from_raw(tensor, shared.memory.toreadonly(), "its shared memory slice")
        elif raws:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    tensor.name, "typed contents are set while raw_input_contents is too; send every input one way"
                )
            if taken < len(raws):
                out[tensor.name] = _from_raw(tensor, raws[taken])
            taken += 1
        else:
            out[tensor.name] = _from_contents(tensor)
    if taken != len(raws):
        raise InvalidV2Request(
            f"raw_input_contents has {len(raws)} entries for {taken} inputs not in shared memory; "
            "send one entry per such input, in the order of inputs",
            field="raw_input_contents",
        )
    return out


@dataclass(frozen=True)
class SharedSlice:
    """A tensor's bytes in shared memory, and the name of the region they are in (answers echo it for outputs)."""

    region: str
    memory: memoryview


def _shared_memory(
    tensor: str, parameters: Mapping[str, pb.InferParameter], regions: SharedMemoryRegions | None
) -> SharedSlice | None:
    """The shared memory slice a tensor's parameters name, or None when they name none."""
    if _SHM_REGION not in parameters:
        for key in (_SHM_BYTE_SIZE, _SHM_OFFSET):
            if key in parameters:
                raise InvalidV2Request(
                    f"tensor {tensor!r} sets {key} without {_SHM_REGION}; set both {_SHM_REGION} and "
                    f"{_SHM_BYTE_SIZE}, or neither",
                    field=f"parameters.{key}",
                )
        return None
    region = parameters[_SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidV2Request(
            f"tensor {tensor!r}: {_SHM_REGION} must be a non-empty string_param naming a registered region",
            field=f"parameters.{_SHM_REGION}",
        )
    byte_size = _integer(parameters, _SHM_BYTE_SIZE)
    if byte_size is None:
        raise InvalidV2Request(
            f"tensor {tensor!r} sets {_SHM_REGION} without {_SHM_BYTE_SIZE}; set the size of its data in bytes",
            field=f"parameters.{_SHM_BYTE_SIZE}",
        )
    offset = _integer(parameters, _SHM_OFFSET) or 0
    if regions is None:
        raise SharedMemoryOff()
    name = region.string_param
    return SharedSlice(name, regions.slice(name, offset, byte_size, tensor=tensor))


def shared_memory_outputs(request: pb.ModelInferRequest, regions: SharedMemoryRegions | None) -> dict[str, SharedSlice]:
    """The requested outputs to write into shared memory, by name, with the bytes each may fill."""
    targets: dict[str, SharedSlice] = {}
    for output in request.outputs:
        if output.parameters:
            shared = _shared_memory(output.name, output.parameters, regions)
            if shared is not None:
                targets[output.name] = shared
    return targets


def shared_memory_status(regions: Iterable[Region]) -> pb.SystemSharedMemoryStatusResponse:
    """The SystemSharedMemoryStatus answer listing ``regions``."""
    status = pb.SystemSharedMemoryStatusResponse.RegionStatus
    return pb.SystemSharedMemoryStatusResponse(
        regions={
            region.name: status(name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size)
            for region in regions
        }
    )


def requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    """The output names the request asks for, in its order; empty for all outputs. Each may be asked for once."""
    names: list[str] = []
    for output in request.outputs:
        if not output.name:
            raise InvalidV2Request("outputs[].name is required", field="outputs.name")
        if output.name in names:  # as Triton refuses it: two destinations for one output cannot both be met
            raise InvalidV2Request(
                f"output {output.name!r} is requested twice; request each output once", field="outputs.name"
            )
        names.append(output.name)
    return tuple(names)


_CLASSIFICATION = "classification"
# The dtype kinds a classification ranks: booleans and numbers.
_RANKABLE = "biuf"


def classifications(request: pb.ModelInferRequest) -> dict[str, int]:
    """The outputs the request asks to classify (the classification extension, tritonclient's ``class_count``),
    each with the number of classes to return."""
    counts: dict[str, int] = {}
    for output in request.outputs:
        if _CLASSIFICATION not in output.parameters:
            continue
        count = _integer(output.parameters, _CLASSIFICATION)
        if count is None or count < 1:
            raise InvalidV2Request(
                f"output {output.name!r}: the classification parameter takes a positive integer, the number of "
                "classes to return",
                field="outputs.parameters",
            )
        if _SHM_REGION in output.parameters:
            raise InvalidV2Request(
                f"output {output.name!r}: a classified output comes in the answer, not in shared memory; drop one "
                "of the two parameters",
                field="outputs.parameters",
            )
        counts[output.name] = count
    return counts


def check_classifiable(signature: Signature, classes: Collection[str]) -> None:
    """Refuses, before the run, a classification of an output that the signature declares non-numeric (strings);
    `classified` checks the output itself after the run."""
    for spec in signature.outputs:
        if spec.name in classes and spec.dtype.kind not in _RANKABLE:
            raise _unclassifiable(spec.name, _spec_datatype(spec))


def classified(
    name: str, array: np.ndarray[Any, Any], count: int, *, batched: bool, spec: TensorSpec | None = None
) -> np.ndarray[Any, Any]:
    """Output `name` as Triton's classification extension answers it: the `count` largest elements of each batch
    item (of the whole output when the model has no batch dimension), largest first, each as ``b"value:index"``
    with the index into the item's elements flattened; BYTES of shape [batch, count] (or [count]). `spec`: the
    output's declaration, which tells a bfloat16 output (uint16 bit patterns here) from a uint16 one."""
    if array.dtype.kind not in _RANKABLE:
        raise _unclassifiable(name, datatype_of(array))
    if spec is not None and spec.ort_type == _BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)  # ranked and written as the numbers they hold
    batched = batched and array.ndim > 0
    rows = array.reshape((array.shape[0], math.prod(array.shape[1:])) if batched else (1, array.size))
    kept = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :kept]
    values = np.take_along_axis(rows, order, axis=1).tolist()
    integral = array.dtype.kind != "f"
    answer = np.empty((rows.shape[0], kept), dtype=object)
    for row, (row_values, row_order) in enumerate(zip(values, order.tolist(), strict=True)):
        for column, (value, index) in enumerate(zip(row_values, row_order, strict=True)):
            answer[row, column] = f"{int(value) if integral else f'{value:f}'}:{index}".encode()
    return answer if batched else answer.reshape(kept)


def _unclassifiable(name: str, datatype: str) -> InvalidV2Request:
    return InvalidV2Request(
        f"output {name!r} holds {datatype}, which cannot be classified: classes are ranked by number",
        field="outputs.parameters",
    )


def _integer(parameters: Mapping[str, pb.InferParameter], key: str) -> int | None:
    if key not in parameters:
        return None
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return parameter.int64_param
    if kind == "uint64_param":
        return parameter.uint64_param
    raise InvalidV2Request(
        f"parameter {key!r} must be an integer (int64_param or uint64_param), not {kind or 'empty'}",
        field=f"parameters.{key}",
    )


def priority(parameters: Mapping[str, pb.InferParameter]) -> int:
    """The request's queue priority: 1 is the most urgent; 0 (absent) is the model's default level."""
    value = _integer(parameters, "priority")
    if value is None:
        return 0
    if value < 0:
        raise InvalidV2Request(
            f"parameter 'priority' is {value}; use 1 (most urgent) or more", field="parameters.priority"
        )
    return value


_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def refuse_sequences(parameters: Mapping[str, pb.InferParameter]) -> None:
    """Refuses a request that is part of a sequence: ModelForge runs no sequence batching, and answering it
    statelessly would give wrong results silently. As Triton does for a model without it, a sequence_id that is
    0 or "" and sequence_start/sequence_end that are false pass."""
    if not parameters:
        return
    for key in _SEQUENCE_PARAMETERS:
        parameter = parameters.get(key)
        if parameter is None:
            continue
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None and getattr(parameter, kind):
            raise InvalidV2Request(
                f"parameter {key!r} makes the request part of a sequence, and this server runs no sequence batching "
                "(each request is answered on its own): drop the sequence parameters",
                field=f"parameters.{key}",
            )


def timeout_seconds(parameters: Mapping[str, pb.InferParameter]) -> float | None:
    """The request's queue timeout: the ``timeout`` parameter, in microseconds, as seconds; None if absent or 0."""
    value = _integer(parameters, "timeout")
    if not value:
        return None
    if value < 0:
        raise InvalidV2Request(
            f"parameter 'timeout' is {value} microseconds; use a positive value", field="parameters.timeout"
        )
    return value / 1_000_000


def datatype_of(array: np.ndarray[Any, Any], spec: TensorSpec | None = None) -> str:
    """The V2 datatype of an output array; a uint16 output the signature declares bfloat16 is BF16."""
    if spec is not None and spec.ort_type == _BFLOAT16:
        return "BF16"
    found = _DATATYPES.get(array.dtype)  # the common dtypes without the general lookup, on the hot path
    return found if found is not None else tensors.to_v2_datatype(tensors.from_numpy_dtype(array.dtype))


def needs_signature(outputs: Mapping[str, np.ndarray[Any, Any]]) -> bool:
    """True when an output's datatype depends on the signature: uint16 arrays may hold bfloat16 bit patterns."""
    return any(array.dtype == _UINT16 for array in outputs.values())


_RAW_OUTPUT_CONTENTS = 6  # ModelInferResponse.raw_output_contents
_STREAM_INFER_RESPONSE = 2  # ModelStreamInferResponse.infer_response


def _raw_view(array: np.ndarray[Any, Any], datatype: str) -> bytes | memoryview:
    if datatype == "BYTES":
        return encode_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.nbytes <= _COPY_UP_TO:
        return array.tobytes(order="C")
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data  # also for empty arrays


_COPY_UP_TO = 4096  # a copy of a small output costs less than the view of it (about 0.1 against 0.9 us)


def infer_response_parts(
    *,
    model: str,
    version: int,
    request_id: str,
    outputs: Mapping[str, np.ndarray[Any, Any]],
    signature: Signature | None = None,
    shared: Mapping[str, SharedSlice] | None = None,
    placed: frozenset[str] = frozenset(),
    final: bool = False,
) -> wire.Parts:
    """A serialised ModelInferResponse carrying every output, in its order, as raw bytes, byte for byte what
    protobuf would write, as parts: raw outputs are views of the arrays (field 6 follows every other field, so
    appending it keeps protobuf's own byte order).

    The fields before them are serialised pieces that repeat from request to request (the model and version,
    each output's metadata), kept in small caches, and the request's id between them, in field-number order as
    protobuf writes them.

    Outputs named in ``shared`` are written into their shared memory instead (unless named in ``placed``: there
    already); their metadata carries the region and the bytes written, and their raw entry stays empty, so every
    output keeps its raw entry's position.

    ``final`` marks the answer as its request's last (the parameter ``triton_final_response``), as Triton marks
    every answer on a stream.

    Raises:
        InvalidSharedMemoryRegion: an output does not fit the shared memory the request gave it; then no region
            is written to.
    """
    payloads = _fit_shared(outputs, shared) if shared else {}
    parts: wire.Parts = [_response_prefix(model, version)]
    if request_id:
        parts += wire.length_delimited(_RESPONSE_ID, [request_id.encode()])
    if final:
        parts.append(_FINAL_RESPONSE)
    raws: wire.Parts = []
    for name, array in outputs.items():
        datatype = datatype_of(array, signature.output(name) if signature is not None else None)
        target = shared.get(name) if shared else None
        if target is None:
            parts.append(_output_metadata(name, datatype, array.shape))
            raws += wire.length_delimited(_RAW_OUTPUT_CONTENTS, [_raw_view(array, datatype)])
        else:
            written = array.nbytes if name in placed else _write_shared(array, target, payloads[name])
            parts.append(_shared_output_metadata(name, datatype, array.shape, target.region, written))
            raws += wire.length_delimited(_RAW_OUTPUT_CONTENTS, [b""])
    return [*parts, *raws]


def _fit_shared(
    outputs: Mapping[str, np.ndarray[Any, Any]], shared: Mapping[str, SharedSlice]
) -> dict[str, bytes | None]:
    """Checks that every output bound for shared memory fits its slice, before any is written; returns the
    serialised BYTES outputs (None for the others, which are copied as they are)."""
    payloads: dict[str, bytes | None] = {}
    for name, target in shared.items():
        array = outputs.get(name)
        if array is None:
            continue
        data = encode_bytes(array) if array.dtype == object else None
        size = len(data) if data is not None else array.nbytes
        if size > len(target.memory):
            raise InvalidSharedMemoryRegion(
                target.region,
                f"output {name!r} needs {size} bytes but its shared_memory_byte_size is {len(target.memory)}; "
                "give it a larger slice",
            )
        payloads[name] = data
    return payloads


def _write_shared(array: np.ndarray[Any, Any], target: SharedSlice, data: bytes | None) -> int:
    """Writes an output into its shared memory, little-endian and row-major (``data`` if serialised already);
    returns the bytes written."""
    if data is not None:
        target.memory[: len(data)] = data
        return len(data)
    into = np.frombuffer(target.memory, dtype=array.dtype.newbyteorder("<"), count=array.size)
    np.copyto(into.reshape(array.shape), array)
    return array.nbytes


_RESPONSE_ID = 3  # ModelInferResponse.id
# The parameter by which Triton marks the last answer to a request on a stream (for a model that is not decoupled,
# every answer); clients of decoupled models read answers until they see it. ModelInferResponse field 4, serialised.
FINAL_RESPONSE = "triton_final_response"
_FINAL_PARAMETERS = {FINAL_RESPONSE: pb.InferParameter(bool_param=True)}
# The longest request id an in-band error echoes; clients pair answers with short ids, or by order without one.
MAX_ECHOED_ID_CHARS = 64 * 1024
_FINAL_RESPONSE = pb.ModelInferResponse(parameters=_FINAL_PARAMETERS).SerializeToString()


@functools.lru_cache(maxsize=1024)
def _response_prefix(model: str, version: int) -> bytes:
    """ModelInferResponse fields 1 and 2 (model_name, model_version), serialised."""
    return pb.ModelInferResponse(model_name=model, model_version=str(version)).SerializeToString()


@functools.lru_cache(maxsize=4096)
def _output_metadata(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """One ModelInferResponse.outputs entry (field 5: name, datatype, shape), serialised."""
    output = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)
    return pb.ModelInferResponse(outputs=[output]).SerializeToString()


@functools.lru_cache(maxsize=1024)
def _shared_output_metadata(name: str, datatype: str, shape: tuple[int, ...], region: str, byte_size: int) -> bytes:
    """One ModelInferResponse.outputs entry of an output written to shared memory, serialised."""
    output = pb.ModelInferResponse.InferOutputTensor(
        name=name,
        datatype=datatype,
        shape=shape,
        parameters={
            _SHM_REGION: pb.InferParameter(string_param=region),
            _SHM_BYTE_SIZE: pb.InferParameter(int64_param=byte_size),
        },
    )
    return pb.ModelInferResponse(outputs=[output]).SerializeToString()


def stream_infer_response(parts: wire.Parts) -> wire.Parts:
    """A ModelStreamInferResponse around the serialised ModelInferResponse in ``parts``."""
    return wire.length_delimited(_STREAM_INFER_RESPONSE, parts)


def stream_error_response(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """The in-band answer on a stream to a request that failed, final as every answer on a stream is.

    Its size is bounded whatever the request held: the message is cut as unary errors are, the model's name and
    version are echoed cut (they may be what was wrong), and an id longer than any answer may carry is left out,
    so that one bad request never makes an answer too large to send, which would end the stream for all.
    """
    echoed_id = request.id if len(request.id) <= MAX_ECHOED_ID_CHARS else ""
    note = "" if echoed_id == request.id else f" (the request's id, {len(request.id)} characters, is too long to echo)"
    return pb.ModelStreamInferResponse(
        error_message=bounded(message, MAX_MESSAGE_WIRE_BYTES - len(note)) + note,
        infer_response=pb.ModelInferResponse(
            model_name=bounded(request.model_name, MAX_METADATA_WIRE_BYTES),
            model_version=bounded(request.model_version, MAX_METADATA_WIRE_BYTES),
            id=echoed_id,
            parameters=_FINAL_PARAMETERS,
        ),
    )


def _spec_datatype(spec: TensorSpec) -> str:
    if spec.ort_type:
        return tensors.to_v2_datatype(tensors.from_ort_type(spec.ort_type))
    return tensors.to_v2_datatype(tensors.from_numpy_dtype(spec.dtype))


def _tensor_metadata(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=_spec_datatype(spec), shape=spec.shape)
        for spec in specs
    ]


def model_metadata(model: ResolvedModel) -> pb.ModelMetadataResponse:
    """The ModelMetadata answer for one resolved model version."""
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(model.version)],
        platform=PLATFORM,
        inputs=_tensor_metadata(model.signature.inputs),
        outputs=_tensor_metadata(model.signature.outputs),
    )


def max_batch_size(signature: Signature, serving: ServingConfig) -> int:
    """The max_batch_size a V2 client sees: the batcher's limit when the model batches, else 0."""
    return serving.batching.max_batch_size if signature.batchable else 0


def model_config(model: ResolvedModel, serving: ServingConfig, *, merging: bool = True) -> config_pb.ModelConfig:
    """The model configuration in the V2 shape. With max_batch_size > 0, dims leave out the batch dimension.

    `merging` False (a loaded version whose merged runs showed that its outputs do not follow the batch dimension)
    keeps max_batch_size, since requests may still carry that many rows each, and leaves out dynamic_batching."""
    batch = max_batch_size(model.signature, serving)
    skip = 1 if batch > 0 else 0
    config = config_pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=batch,
        input=[
            config_pb.ModelInput(name=spec.name, data_type=_CONFIG_TYPES[_spec_datatype(spec)], dims=spec.shape[skip:])
            for spec in model.signature.inputs
        ],
        output=[
            config_pb.ModelOutput(name=spec.name, data_type=_CONFIG_TYPES[_spec_datatype(spec)], dims=spec.shape[skip:])
            for spec in model.signature.outputs
        ],
        instance_group=[
            config_pb.ModelInstanceGroup(name=model.name, kind=config_pb.ModelInstanceGroup.KIND_CPU, count=1)
        ],
        version_policy=config_pb.ModelVersionPolicy(
            specific=config_pb.ModelVersionPolicy.Specific(versions=[model.version])
        ),
        response_cache=config_pb.ModelResponseCache(enable=serving.cache.enabled),
    )
    if batch > 0 and merging:
        batching = serving.batching
        # Rounded up: 0 would tell a client the queue has no timeout.
        timeout_us = math.ceil(batching.default_queue_timeout * 1_000_000) if batching.default_queue_timeout else 0
        config.dynamic_batching.CopyFrom(
            config_pb.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_sizes,
                max_queue_delay_microseconds=batching.max_queue_delay_us,
                priority_levels=batching.priority_levels,
                default_priority_level=batching.priority_levels,
                default_queue_policy=config_pb.ModelQueuePolicy(
                    timeout_action=config_pb.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=timeout_us,
                    allow_timeout_override=True,
                    max_queue_size=batching.max_queue_size,
                ),
            )
        )
    return config


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000_000))


def _ms_since_epoch(when: datetime | None) -> int:
    return round(when.timestamp() * 1000) if when is not None else 0


def model_statistics(stats: ModelStatistics) -> pb.ModelStatistics:
    """One model version's counters in the V2 shape. Durations the engine does not measure apart are 0: the
    preparation of inputs and outputs around a run (``compute_input``, ``compute_output``, within
    ``compute_infer`` here) and cache lookups (``cache_hit``, ``cache_miss``)."""
    succeeded = stats.requests  # requests answered successfully, from the prediction cache or by a run
    computed = max(0, succeeded - stats.cache_hits)  # as in Triton, the compute counts leave cache hits out
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=stats.name,
        version=str(stats.version),
        last_inference=_ms_since_epoch(stats.last_inference),
        inference_count=stats.inferences,
        execution_count=stats.executions,
        inference_stats=pb.InferStatistics(
            success=duration(count=succeeded, ns=_ns(stats.total_seconds)),
            fail=duration(count=stats.failures, ns=_ns(stats.failure_seconds)),
            queue=duration(count=succeeded, ns=_ns(stats.queue_seconds)),
            compute_input=duration(count=computed),
            compute_infer=duration(count=computed, ns=_ns(stats.compute_seconds)),
            compute_output=duration(count=computed),
            cache_hit=duration(count=stats.cache_hits),
            cache_miss=duration(count=stats.cache_misses),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=duration(count=count),
                compute_infer=duration(count=count, ns=_ns(stats.batch_seconds.get(size, 0.0))),
                compute_output=duration(count=count),
            )
            for size, count in sorted(stats.batch_sizes.items())
        ],
    )


def model_index(loaded: LoadedModel | RepositoryEntry) -> pb.RepositoryIndexResponse.ModelIndex:
    """One repository entry as RepositoryIndex lists it: a held version in its state, or a model not loaded
    (UNAVAILABLE, with its newest READY version if it has one)."""
    return pb.RepositoryIndexResponse.ModelIndex(
        name=loaded.name,
        version="" if loaded.version is None else str(loaded.version),
        state="UNAVAILABLE" if loaded.state is None else _STATES[loaded.state],
        reason=loaded.reason,
    )


def check_repository_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    """Refuses load parameters that would replace the model's configuration or files: the registry owns both."""
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            raise InvalidV2Request(
                f"parameter {key!r} is not supported: model files and serving settings come from the registry; "
                "upload a new version or change the version's labels instead",
                field=f"parameters.{key}",
            )


def check_unload_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    """Refuses an `unload_dependents` that is not a bool_param, as Triton does. Its value changes nothing here: no
    model depends on another (there are no ensembles)."""
    dependents = parameters.get("unload_dependents")
    if dependents is not None and dependents.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidV2Request("parameter 'unload_dependents' takes a bool_param", field="parameters.unload_dependents")


def check_repository_name(repository_name: str) -> None:
    """Refuses a repository other than the default: the registry is the server's one model repository."""
    if repository_name:
        raise InvalidV2Request(
            f"repository_name {repository_name!r} is not supported: this server has one model repository, the "
            "registry; leave repository_name empty",
            field="repository_name",
        )


def repository_model_ref(model_name: str) -> ModelRef:
    """The ModelRef of a repository request's model_name: ``name``, ``name:3`` or ``name@alias``."""
    if not model_name:
        raise InvalidV2Request("model_name is required: set it to the registry's model name", field="model_name")
    try:
        return ModelRef.parse(model_name)
    except ValueError as exc:
        error = exc
    parts = re.split("([:@])", model_name, maxsplit=1)  # [name] or [name, ":" or "@", version or alias]
    name = parts[0]
    try:
        ModelRef.parse(name)
    except ValueError:
        raise NoSuchV2Model(f"no model {name!r}: none could be named so ({error})", model=name) from None
    if parts[1:2] == [":"] and parts[2].isdigit() and int(parts[2]) == 0:
        raise NoSuchV2Model(f"model {name!r} has no version 0: versions count from 1", model=name)
    raise InvalidV2Request(str(error), field="model_name")

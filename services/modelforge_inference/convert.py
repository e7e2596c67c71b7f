"""modelforge.inference.v1 messages to and from the inference domain; tensors through modelforge.tensors."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from google.protobuf import duration_pb2, timestamp_pb2

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.registry.v1 import registry_pb2
from modelforge_inference import wire
from modelforge_inference.domain import (
    BFLOAT16_BITS,
    CacheMode,
    LoadedModel,
    ModelRef,
    ModelState,
    ModelStatistics,
    Prediction,
    Timings,
)
from modelforge_inference.errors import InvalidInput, InvalidTimeout
from modelforge_server import durations
from modelforge_server.errors import InvalidArgument

_UINT16 = np.dtype("<u2")

_CACHE_MODES: dict[int, CacheMode] = {
    pb.CACHE_MODE_UNSPECIFIED: CacheMode.USE,
    pb.CACHE_MODE_USE: CacheMode.USE,
    pb.CACHE_MODE_BYPASS: CacheMode.BYPASS,
    pb.CACHE_MODE_REFRESH: CacheMode.REFRESH,
}
_STATES = {
    ModelState.LOADING: pb.LOADED_MODEL_STATE_LOADING,
    ModelState.READY: pb.LOADED_MODEL_STATE_READY,
    ModelState.UNLOADING: pb.LOADED_MODEL_STATE_UNLOADING,
    ModelState.FAILED: pb.LOADED_MODEL_STATE_FAILED,
}


class InvalidModelRef(InvalidArgument):
    reason = "INVALID_MODEL_REF"

    def __init__(self, problem: str) -> None:
        super().__init__(f"ref: {problem}", field="ref")


# -- requests ------------------------------------------------------------------------------------------------


def model_ref(ref: registry_pb2.ModelRef, *, required: bool = True) -> ModelRef | None:
    """The domain ModelRef of a request's ref; None when it is unset and not required."""
    if not ref.name:
        if required:
            raise InvalidModelRef("ref.name is required: the name of a model in the registry")
        return None
    selector = ref.WhichOneof("selector")
    try:
        if selector == "version":
            return ModelRef(ref.name, version=ref.version)
        if selector == "alias":
            return ModelRef(ref.name, alias=ref.alias)
        return ModelRef(ref.name)
    except ValueError as exc:
        raise InvalidModelRef(str(exc)) from None


def inputs(messages: Sequence[tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
    """Decodes input tensors without copying their bytes; names must be set and unique. None at all is a request
    for a model with no inputs; the signature check names what any other model misses."""
    decoded: dict[str, np.ndarray] = {}
    for index, message in enumerate(messages):
        name = message.name
        if not name:
            raise InvalidArgument(f"inputs[{index}].name is required: the model input it feeds", field="inputs")
        if name in decoded:
            raise InvalidInput(name, "given twice; send each input once")
        try:
            array = tensors.to_numpy(message)
        except ValueError as exc:
            raise InvalidInput(name, str(exc).removeprefix(f"tensor {name!r}: ")) from None
        decoded[name] = array.view(BFLOAT16_BITS) if message.dtype == tensor_pb2.DATA_TYPE_BFLOAT16 else array
    return decoded


def cache_mode(value: int) -> CacheMode:
    mode = _CACHE_MODES.get(value)
    if mode is None:
        raise InvalidArgument(f"cache_mode {value} is not a CacheMode value", field="cache_mode")
    return mode


def timeout(request: pb.PredictRequest | pb.PredictStreamRequest) -> float | None:
    """The request's queue timeout in seconds; None when unset (zero counts as unset)."""
    if not request.HasField("timeout"):
        return None
    whole, nanos = request.timeout.seconds, request.timeout.nanos
    if whole <= 0 and nanos <= 0 and (whole or nanos):  # a well-formed Duration, below zero
        raise InvalidTimeout(whole + nanos / 1e9)
    return durations.seconds(request.timeout, "timeout") or None


# -- responses -----------------------------------------------------------------------------------------------


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    _fill_duration(message, seconds)
    return message


def _fill_duration(message: duration_pb2.Duration, seconds: float) -> None:
    whole = int(seconds)
    message.seconds = whole  # setting a field, even to zero, marks the submessage present
    message.nanos = int(round((seconds - whole) * 1e9))


def timestamp(value: Any) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def timings(value: Timings) -> pb.Timings:
    message = pb.Timings()
    _fill_timings(message, value)
    return message


def _fill_timings(message: pb.Timings, value: Timings) -> None:
    """Sets the three durations in place: building Duration messages and copying them in costs twice as much."""
    _fill_duration(message.queue, value.queue)
    _fill_duration(message.compute, value.compute)
    _fill_duration(message.total, value.total)


def _dtype(prediction: Prediction, name: str, array: np.ndarray) -> tensor_pb2.DataType.ValueType | None:
    """BFLOAT16 for an output the signature declares so (its array holds uint16 bits); None: the array's own."""
    if array.dtype == _UINT16 and prediction.is_bfloat16(name):
        return tensor_pb2.DATA_TYPE_BFLOAT16
    return None


def predict_response(prediction: Prediction) -> pb.PredictResponse:
    return pb.PredictResponse(
        model=prediction.model,
        version=prediction.version,
        sha256=prediction.sha256,
        outputs=[
            tensors.to_tensor(array, name, dtype=_dtype(prediction, name, array))
            for name, array in prediction.outputs.items()
        ],
        timings=timings(prediction.timings),
        cache_hit=prediction.cache_hit,
    )


# Field numbers of the messages assembled by hand below (see inference.proto and tensor.proto).
_PREDICT_RESPONSE_OUTPUTS = 4
_TENSOR_RAW_DATA = 4
_STREAM_RESPONSE_CHUNK = 2
_CHUNK_DATA = 3
_STRING_DATA_KEY = len(wire.key(4))  # the key of PredictStreamChunk.string_data, before each element


def _tensor_parts(prediction: Prediction, name: str, array: np.ndarray) -> wire.Parts:
    """A Tensor's serialised parts: a STRING tensor through protobuf, a numeric one with raw_data as a view."""
    dtype = _dtype(prediction, name, array)
    found = tensors.from_numpy_dtype(array.dtype)
    if found == tensor_pb2.DATA_TYPE_STRING:
        return [tensors.to_tensor(array, name).SerializeToString()]
    data = raw_view(array)
    parts: wire.Parts = [_tensor_head(name, found if dtype is None else dtype, array.shape)]
    if len(data):  # proto3 leaves an empty bytes field out
        parts += wire.length_delimited(_TENSOR_RAW_DATA, [data])
    return parts


@functools.lru_cache(maxsize=4096)
def _tensor_head(name: str, dtype: tensor_pb2.DataType.ValueType, shape: tuple[int, ...]) -> bytes:
    """A numeric Tensor's fields before raw_data (name, dtype, shape), serialised; a version answers with few."""
    return tensor_pb2.Tensor(name=name, dtype=dtype, shape=shape).SerializeToString()


@functools.lru_cache(maxsize=1024)
def _predict_head(model: str, version: int, sha256: str) -> bytes:
    """PredictResponse fields 1 to 3 (model, version, sha256), serialised."""
    return pb.PredictResponse(model=model, version=version, sha256=sha256).SerializeToString()


def predict_response_bytes(prediction: Prediction) -> bytes:
    """The serialised PredictResponse of `predict_response`, byte for byte, each output's bytes copied once."""
    tail = pb.PredictResponse(cache_hit=prediction.cache_hit)
    _fill_timings(tail.timings, prediction.timings)
    parts: wire.Parts = [_predict_head(prediction.model, prediction.version, prediction.sha256)]
    for name, array in prediction.outputs.items():
        parts += wire.length_delimited(_PREDICT_RESPONSE_OUTPUTS, _tensor_parts(prediction, name, array))
    parts.append(tail.SerializeToString())
    return wire.join(parts)


def loaded_model(model: LoadedModel) -> pb.LoadedModel:
    return pb.LoadedModel(
        model=model.name,
        version=model.version,
        sha256=model.sha256,
        state=_STATES[model.state],
        reason=model.reason,
        memory_bytes=model.memory_bytes,
        last_use_time=timestamp(model.last_use),
        in_flight=model.in_flight,
        load_duration=duration(model.load_seconds),
        execution_providers=model.execution_providers,
    )


def model_statistics(stats: ModelStatistics) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        model=stats.name,
        version=stats.version,
        request_count=stats.requests,
        failure_count=stats.failures,
        inference_count=stats.inferences,
        execution_count=stats.executions,
        queue_duration=duration(stats.queue_seconds),
        compute_duration=duration(stats.compute_seconds),
        total_duration=duration(stats.total_seconds),
        cache_hit_count=stats.cache_hits,
        cache_miss_count=stats.cache_misses,
        batch_sizes=dict(stats.batch_sizes),
        last_inference_time=timestamp(stats.last_inference),
        cancelled_count=stats.cancelled,
    )


def cache_status(degraded: bool | None) -> pb.CacheStatus.ValueType:
    if degraded is None:
        return pb.CACHE_STATUS_DISABLED
    return pb.CACHE_STATUS_DEGRADED if degraded else pb.CACHE_STATUS_OK


# -- streams -------------------------------------------------------------------------------------------------


def raw_view(array: np.ndarray) -> memoryview:
    """The array's little-endian bytes as a flat view; copies only when the array is not already laid out so."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data  # also for empty arrays


def streamed_output(
    name: str, array: np.ndarray, dtype: tensor_pb2.DataType.ValueType | None = None
) -> pb.StreamedOutput:
    dtype = tensors.from_numpy_dtype(array.dtype) if dtype is None else dtype
    size = array.size if dtype == tensor_pb2.DATA_TYPE_STRING else array.nbytes
    return pb.StreamedOutput(name=name, dtype=dtype, shape=array.shape, byte_size=size)


def stream_header(prediction: Prediction) -> pb.PredictStreamResponse:
    return pb.PredictStreamResponse(
        header=pb.PredictStreamHeader(
            model=prediction.model,
            version=prediction.version,
            sha256=prediction.sha256,
            outputs=[
                streamed_output(name, array, _dtype(prediction, name, array))
                for name, array in prediction.outputs.items()
            ],
            cache_hit=prediction.cache_hit,
        )
    )


def raw_chunks(name: str, view: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """One serialised PredictStreamResponse per chunk_bytes slice; the slice is copied once, into the message."""
    for offset in range(0, len(view), chunk_bytes):
        head = pb.PredictStreamChunk(output=name, offset=offset).SerializeToString()
        chunk = [head, *wire.length_delimited(_CHUNK_DATA, [view[offset : offset + chunk_bytes]])]
        yield wire.join(wire.length_delimited(_STREAM_RESPONSE_CHUNK, chunk))


def string_chunks(name: str, elements: list[bytes], chunk_bytes: int) -> Iterator[pb.PredictStreamResponse]:
    """The elements of a STRING output as PredictStreamResponse chunks, in order; each chunk's offset is the index
    of its first element.

    A chunk's ``string_data`` takes at most ``chunk_bytes`` serialised, counting each element's framing (its
    tag and varint length, at least 2 bytes even for an empty element) with its bytes, so a stream of many small
    or empty elements is split like one of large ones. An element whose encoding alone exceeds ``chunk_bytes``
    cannot be split: it is sent alone, in a chunk of its own.
    """
    start, size = 0, 0
    for index, element in enumerate(elements):
        length = len(element)
        encoded = _STRING_DATA_KEY + wire.varint_size(length) + length
        if index > start and size + encoded > chunk_bytes:
            yield pb.PredictStreamResponse(
                chunk=pb.PredictStreamChunk(output=name, offset=start, string_data=elements[start:index])
            )
            start, size = index, 0
        size += encoded
    if start < len(elements):
        yield pb.PredictStreamResponse(
            chunk=pb.PredictStreamChunk(output=name, offset=start, string_data=elements[start:])
        )


def string_digest(elements: list[bytes]) -> str:
    digest = hashlib.sha256()
    for element in elements:
        digest.update(struct.pack("<I", len(element)))
        digest.update(element)
    return digest.hexdigest()


def stream_trailer(value: Timings, digests: dict[str, str]) -> pb.PredictStreamResponse:
    return pb.PredictStreamResponse(trailer=pb.PredictStreamTrailer(timings=timings(value), sha256=digests))

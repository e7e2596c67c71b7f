"""Pure conversions shared by the sync and async clients: protobuf messages to SDK values and back.

Nothing here does I/O or knows about channels, so each client is a thin shell that builds a request here, sends
it, and converts the answer here. The stateful pieces (:class:`UploadPlan`, :class:`DownloadCheck`,
:class:`StreamAssembler`, :class:`ResultAssembler`, :class:`ResultCheck`) take messages one at a time and leave
reading and writing to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import numbers
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from modelforge import tensors
from modelforge._domain import (
    CacheMode,
    CacheStatus,
    Dataset,
    JobFailure,
    JobPriority,
    JobPriorityName,
    JobProgress,
    JobState,
    JobStatus,
    LoadedModel,
    Model,
    ModelEvent,
    ModelEventType,
    ModelState,
    ModelStatistics,
    ModelVersion,
    OnnxInfo,
    Prediction,
    Signature,
    TensorSpec,
    Timings,
    VersionState,
)
from modelforge._errors import IntegrityError, ModelForgeError
from modelforge._refs import ModelRef, validate_model_name
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2

Progress = Callable[[int, int], None]
"""A progress callback: ``progress(done_bytes, total_bytes)``."""

MiB = 1024 * 1024
DEFAULT_CHUNK_BYTES = 1 * MiB


# --- scalars -------------------------------------------------------------------------------------------------


def _time(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def _duration(d: duration_pb2.Duration) -> timedelta:
    return d.ToTimedelta()


def duration_proto(seconds: float | None, what: str) -> duration_pb2.Duration | None:
    """A Duration for ``seconds`` of the argument ``what``; None stays None (the field is left unset)."""
    if seconds is None:
        return None
    if seconds < 0:
        raise ValueError(f"{what} must be 0 or more seconds, not {seconds!r}")
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


INT32_MAX = 2**31 - 1
MAX_DURATION_SECONDS = 315_576_000_000  # google.protobuf.Duration's range


def whole_number(value: int, what: str) -> int:
    """``value`` when it is a whole number from 0 to INT32_MAX (the range of its int32 field), else a ValueError
    naming the argument ``what`` and the range, instead of protobuf's bare "Value out of range"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= INT32_MAX:
        raise ValueError(f"{what} must be a whole number from 0 to {INT32_MAX}, not {value!r}")
    return int(value)


def resource_id(value: str, what: str) -> str:
    """``value`` when it is a UUID, as the ids of jobs and datasets are, else a ValueError naming the argument
    ``what``: the call is not made."""
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{what} {value!r} is not a UUID, as the ids of jobs and datasets are") from None
    return value


def model_filter(model: str) -> str:
    """A model name to filter a listing by: "" for none, else a valid name (ValueError otherwise)."""
    return model and validate_model_name(model)


def _check_input_names(inputs: Mapping[Any, Any]) -> None:
    """Refuses a name that is not a string here, where protobuf would say only "bad argument type"."""
    for name in inputs:
        if not isinstance(name, str):
            raise TypeError(f"input names must be strings, but {name!r} is {type(name).__name__}")


def _dtype_name(dtype: int) -> str:
    return tensors.data_type_name(dtype).lower()


# --- references ----------------------------------------------------------------------------------------------


def ref_proto(ref: str | ModelRef) -> registry_pb2.ModelRef:
    """The ``ModelRef`` message for a reference string or value; raises ValueError for a malformed string."""
    parsed = ModelRef.parse(ref)
    if parsed.version is not None:
        return registry_pb2.ModelRef(name=parsed.name, version=parsed.version)
    if parsed.alias is not None:
        return registry_pb2.ModelRef(name=parsed.name, alias=parsed.alias)
    return registry_pb2.ModelRef(name=parsed.name)


def version_number(ref: str | ModelRef) -> int | None:
    """The version number a reference names directly, or None when it needs resolving."""
    return ModelRef.parse(ref).version


# --- registry ------------------------------------------------------------------------------------------------


def tensor_spec(spec: tensor_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(
        name=spec.name, dtype=_dtype_name(spec.dtype), shape=tuple(spec.shape), dim_names=tuple(spec.dim_names)
    )


def signature(sig: registry_pb2.Signature) -> Signature:
    return Signature(
        inputs=tuple(tensor_spec(s) for s in sig.inputs), outputs=tuple(tensor_spec(s) for s in sig.outputs)
    )


def onnx_info(info: registry_pb2.OnnxInfo) -> OnnxInfo:
    return OnnxInfo(
        ir_version=info.ir_version,
        opset_imports={o.domain: o.version for o in info.opset_imports},
        producer_name=info.producer_name,
        producer_version=info.producer_version,
        graph_name=info.graph_name,
        doc_string=info.doc_string,
        metadata_props=dict(info.metadata_props),
    )


def model(message: registry_pb2.Model) -> Model:
    """The SDK value of a ``Model`` message."""
    return Model(
        name=message.name,
        description=message.description,
        labels=dict(message.labels),
        aliases=dict(sorted(message.aliases.items())),
        latest_version=message.latest_version or None,
        create_time=_time(message.create_time),
        update_time=_time(message.update_time),
    )


_VERSION_STATES = {
    registry_pb2.VERSION_STATE_READY: VersionState.READY,
    registry_pb2.VERSION_STATE_ARCHIVED: VersionState.ARCHIVED,
}


def version_state_proto(state: VersionState | str | None) -> registry_pb2.VersionState.ValueType:
    """The enum value for a state filter; None means any state."""
    if state is None:
        return registry_pb2.VERSION_STATE_UNSPECIFIED
    wanted = VersionState(state.upper()) if isinstance(state, str) else state
    return next(k for k, v in _VERSION_STATES.items() if v is wanted)


def model_version(message: registry_pb2.ModelVersion) -> ModelVersion:
    """The SDK value of a ``ModelVersion`` message."""
    return ModelVersion(
        model=message.model,
        version=message.version,
        state=_VERSION_STATES.get(message.state, VersionState.READY),
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        signature=signature(message.signature),
        onnx=onnx_info(message.onnx),
        description=message.description,
        labels=dict(message.labels),
        version_label=message.version_label,
        aliases=tuple(message.aliases),
        create_time=_time(message.create_time),
    )


def model_event(message: registry_pb2.ModelEvent) -> ModelEvent:
    """The SDK value of a ``ModelEvent`` message."""
    name = registry_pb2.ModelEventType.Name(message.type).removeprefix("MODEL_EVENT_TYPE_")
    return ModelEvent(
        type=ModelEventType(name),
        model=message.model,
        version=message.version or None,
        alias=message.alias,
        event_time=_time(message.event_time),
    )


def list_models_request(
    *, name_prefix: str, labels: Mapping[str, str] | None, page_size: int, page_token: str
) -> registry_pb2.ListModelsRequest:
    return registry_pb2.ListModelsRequest(
        page_size=page_size, page_token=page_token, name_prefix=name_prefix, labels=dict(labels or {})
    )


def update_model_request(
    name: str, *, description: str | None, labels: Mapping[str, str] | None
) -> registry_pb2.UpdateModelRequest:
    """An UpdateModel request whose mask names exactly the fields given (not None)."""
    paths = [p for p, v in (("description", description), ("labels", labels)) if v is not None]
    if not paths:
        raise ValueError("nothing to update: pass description=... and/or labels=...")
    return registry_pb2.UpdateModelRequest(
        model=registry_pb2.Model(
            name=validate_model_name(name), description=description or "", labels=dict(labels or {})
        ),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


def update_version_request(
    name: str,
    version: int,
    *,
    description: str | None,
    labels: Mapping[str, str] | None,
    version_label: str | None,
) -> registry_pb2.UpdateModelVersionRequest:
    """An UpdateModelVersion request whose mask names exactly the fields given (not None)."""
    given = (("description", description), ("labels", labels), ("version_label", version_label))
    paths = [p for p, v in given if v is not None]
    if not paths:
        raise ValueError("nothing to update: pass description=..., labels=... and/or version_label=...")
    return registry_pb2.UpdateModelVersionRequest(
        model_version=registry_pb2.ModelVersion(
            model=name,
            version=version,
            description=description or "",
            labels=dict(labels or {}),
            version_label=version_label or "",
        ),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


# --- uploads and downloads -----------------------------------------------------------------------------------


class ProgressFailed(Exception):
    """Raised into gRPC's reading of an upload's requests when the progress callback raised: an exception it takes
    as the end of the call, which it cancels, where a BaseException (KeyboardInterrupt) left a blocking upload
    waiting for ever. The caller then raises what the callback raised (see :func:`reported`)."""


@dataclass
class UploadProgress:
    """An upload's progress callback, called from its request iterator, which gRPC reads: what the callback raises
    is kept, and gRPC sees :class:`ProgressFailed`."""

    callback: Progress | None
    failure: BaseException | None = None

    def report(self, done: int, total: int) -> None:
        if self.callback is None:
            return
        try:
            self.callback(done, total)
        except BaseException as exc:
            self.failure = exc
            raise ProgressFailed() from exc


@contextlib.contextmanager
def reported(progress: UploadProgress) -> Iterator[None]:
    """Around an upload call: raises what its progress callback raised in place of the failure of the call that it
    ended (gRPC cancels it; nothing is stored)."""
    try:
        yield
    except (ModelForgeError, asyncio.CancelledError):
        if progress.failure is not None:
            raise progress.failure from None
        raise


@dataclass
class UploadPlan:
    """What an upload sends: the header (with sha256 and size computed beforehand), then chunks.

    The caller hashes the source first (:func:`sha256_of_bytes`, or :func:`hash_stream` over a file), builds the
    plan, then feeds it the chunks it reads; :meth:`chunk` reports progress as each chunk is handed to gRPC.
    """

    header: registry_pb2.UploadModelVersionHeader
    progress: UploadProgress = field(default_factory=lambda: UploadProgress(None))
    sent: int = 0

    @classmethod
    def build(
        cls,
        *,
        name: str,
        sha256: str,
        size: int,
        create_model: bool,
        description: str,
        labels: Mapping[str, str] | None,
        version_label: str,
        progress: Progress | None,
    ) -> UploadPlan:
        header = registry_pb2.UploadModelVersionHeader(
            model=name,
            create_model=create_model,
            description=description,
            labels=dict(labels or {}),
            version_label=version_label,
            sha256=sha256,
            size_bytes=size,
        )
        return cls(header=header, progress=UploadProgress(progress))

    def first(self) -> registry_pb2.UploadModelVersionRequest:
        """The header message; reports 0 bytes sent."""
        self.progress.report(0, self.header.size_bytes)
        return registry_pb2.UploadModelVersionRequest(header=self.header)

    def chunk(self, data: bytes) -> registry_pb2.UploadModelVersionRequest:
        """The message for the next chunk; reports the bytes sent so far."""
        self.sent += len(data)
        self.progress.report(self.sent, self.header.size_bytes)
        return registry_pb2.UploadModelVersionRequest(chunk=data)

    @property
    def all_sent(self) -> bool:
        """Whether every byte of the file was handed to gRPC."""
        return self.sent == self.header.size_bytes

    def requests_from_bytes(self, data: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[Any]:
        """Every request message for an in-memory file: the header, then slices of ``data``."""
        view = memoryview(data)
        yield self.first()
        for start in range(0, len(view), chunk_bytes):
            yield self.chunk(bytes(view[start : start + chunk_bytes]))


def sha256_of_bytes(data: bytes | bytearray | memoryview) -> str:
    """The lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Any, chunk_bytes: int = 4 * MiB) -> tuple[str, int]:
    """The lowercase hex sha256 and the size of a file, read in chunks (blocking: run it in a thread from async)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


@dataclass
class DownloadCheck:
    """Checks a download as it arrives: the header first, then chunks; :meth:`finish` verifies size and sha256."""

    progress: Progress | None = None
    version: ModelVersion | None = None
    received: int = 0
    _digest: Any = field(default_factory=hashlib.sha256)

    def accept(self, message: registry_pb2.DownloadModelVersionResponse) -> bytes:
        """Takes one stream message and returns the file bytes it carries (empty for the header)."""
        which = message.WhichOneof("content")
        if which == "model_version":
            if self.version is not None:
                raise IntegrityError("the download stream sent a second header; the server is misbehaving")
            self.version = model_version(message.model_version)
            if self.progress is not None:
                self.progress(0, self.version.size_bytes)
            return b""
        if self.version is None:
            raise IntegrityError("the download stream sent file bytes before its header; the server is misbehaving")
        data = message.chunk
        self.received += len(data)
        if self.received > self.version.size_bytes:
            raise IntegrityError(
                f"{self.version.ref} is {self.version.size_bytes} bytes, but the server sent more; download aborted"
            )
        self._digest.update(data)
        if self.progress is not None:
            self.progress(self.received, self.version.size_bytes)
        return data

    def finish(self) -> ModelVersion:
        """Verifies the whole file and returns its version; raises IntegrityError on a short or corrupt file."""
        if self.version is None:
            raise IntegrityError("the download stream ended before its header; retry the download")
        if self.received != self.version.size_bytes:
            raise IntegrityError(
                f"{self.version.ref} is {self.version.size_bytes} bytes, but the download ended after "
                f"{self.received}; retry the download"
            )
        actual = self._digest.hexdigest()
        if actual != self.version.sha256:
            raise IntegrityError(
                f"{self.version.ref}: the downloaded file's sha256 is {actual}, but the registry says "
                f"{self.version.sha256}; the file was not kept, retry the download"
            )
        return self.version


# --- inference -----------------------------------------------------------------------------------------------

_CACHE_MODES = {
    None: inference_pb2.CACHE_MODE_UNSPECIFIED,
    "use": inference_pb2.CACHE_MODE_USE,
    "bypass": inference_pb2.CACHE_MODE_BYPASS,
    "refresh": inference_pb2.CACHE_MODE_REFRESH,
}


def _inference_fields(
    ref: str | ModelRef,
    inputs: Mapping[str, Any],
    *,
    outputs: list[str] | tuple[str, ...] | None,
    priority: int,
    queue_timeout: float | None,
    cache: CacheMode | None,
) -> dict[str, Any]:
    if not isinstance(inputs, Mapping):
        raise TypeError("inputs must be a mapping of input name to array, e.g. {'input': array} ({} for none)")
    _check_input_names(inputs)
    if cache not in _CACHE_MODES:
        raise ValueError(f"cache must be 'use', 'bypass', 'refresh' or None, not {cache!r}")
    if isinstance(outputs, str):  # a str is a sequence of one-letter names
        raise TypeError(f"outputs takes a list of output names, e.g. [{outputs!r}], not a string")
    # A zero Duration means "no timeout" on the wire; a Duration holds at most about 10,000 years.
    if queue_timeout is not None and (
        isinstance(queue_timeout, bool)
        or not isinstance(queue_timeout, numbers.Real)
        or not 1e-6 <= queue_timeout <= MAX_DURATION_SECONDS
    ):
        raise ValueError(
            f"queue_timeout must be a number of seconds from a microsecond to {MAX_DURATION_SECONDS} (None for the "
            f"model's default), not {queue_timeout!r}"
        )
    fields: dict[str, Any] = {
        "ref": ref_proto(ref),
        "inputs": [tensors.to_tensor(value, name) for name, value in inputs.items()],
        "output_names": list(outputs or ()),
        "priority": whole_number(priority, "priority"),
        "cache_mode": _CACHE_MODES[cache],
    }
    timeout = duration_proto(queue_timeout, "queue_timeout")
    if timeout is not None:
        fields["timeout"] = timeout
    return fields


def predict_request(ref: str | ModelRef, inputs: Mapping[str, Any], **options: Any) -> inference_pb2.PredictRequest:
    """A Predict request; inputs are numpy arrays (or anything ``np.asarray`` takes), keyed by input name."""
    return inference_pb2.PredictRequest(**_inference_fields(ref, inputs, **options))


def predict_stream_request(
    ref: str | ModelRef, inputs: Mapping[str, Any], *, verify: bool = True, **options: Any
) -> inference_pb2.PredictStreamRequest:
    """A PredictStream request; the arguments of :func:`predict_request`, and whether the server hashes the outputs."""
    return inference_pb2.PredictStreamRequest(**_inference_fields(ref, inputs, **options), skip_sha256=not verify)


def timings(message: inference_pb2.Timings) -> Timings:
    return Timings(queue=_duration(message.queue), compute=_duration(message.compute), total=_duration(message.total))


def outputs(response: inference_pb2.PredictResponse) -> dict[str, np.ndarray[Any, Any]]:
    """The outputs of a Predict response as numpy arrays (read-only views over the message's bytes)."""
    return {t.name: tensors.to_numpy(t) for t in response.outputs}


def prediction(response: inference_pb2.PredictResponse) -> Prediction:
    """A Predict response with its outputs and the facts about how it ran."""
    return Prediction(
        outputs=outputs(response),
        model=response.model,
        version=response.version,
        sha256=response.sha256,
        timings=timings(response.timings),
        cache_hit=response.cache_hit,
    )


@dataclass
class _Output:
    spec: inference_pb2.StreamedOutput
    buffer: bytearray | list[bytes]
    filled: int = 0


class StreamAssembler:
    """Reassembles the outputs of a PredictStream call, message by message, and checks them against the trailer.

    Numeric outputs are written into one preallocated buffer each, so memory stays at the size of the outputs.
    Progress counts the bytes received over the bytes announced in the header (STRING outputs count elements).
    With ``verify`` (for requests that did not set skip_sha256) every output must match the trailer's sha256;
    without it, only the sizes and order of the chunks are checked.
    """

    def __init__(self, progress: Progress | None = None, *, verify: bool = True) -> None:
        self._progress = progress
        self._verify = verify
        self._header: inference_pb2.PredictStreamHeader | None = None
        self._outputs: dict[str, _Output] = {}
        self._trailer: inference_pb2.PredictStreamTrailer | None = None
        self._total = 0
        self._done = 0

    def accept(self, message: inference_pb2.PredictStreamResponse) -> None:
        which = message.WhichOneof("content")
        if self._trailer is not None:
            raise IntegrityError(f"the prediction stream sent a {which or 'message'} after its trailer")
        if which == "header":
            self._on_header(message.header)
        elif which == "chunk":
            self._on_chunk(message.chunk)
        elif which == "trailer":
            if self._header is None:
                raise IntegrityError("the prediction stream sent its trailer before its header")
            self._trailer = message.trailer
        else:
            raise IntegrityError("the prediction stream sent an empty message; the server is misbehaving")

    def _on_header(self, header: inference_pb2.PredictStreamHeader) -> None:
        if self._header is not None:
            raise IntegrityError("the prediction stream sent a second header; the server is misbehaving")
        self._header = header
        for spec in header.outputs:
            _check_announced(spec)
            if spec.name in self._outputs:
                raise IntegrityError(f"the prediction stream announced output {spec.name!r} twice")
            is_string = spec.dtype == tensor_pb2.DATA_TYPE_STRING
            try:
                buffer: list[bytes] | bytearray = [] if is_string else bytearray(spec.byte_size)
            except MemoryError:
                raise IntegrityError(
                    f"the prediction stream announced output {spec.name!r} of {spec.byte_size} bytes, more than this "
                    "process can hold"
                ) from None
            self._outputs[spec.name] = _Output(spec, buffer)
            self._total += spec.byte_size
        if self._progress is not None:
            self._progress(0, self._total)

    def _on_chunk(self, chunk: inference_pb2.PredictStreamChunk) -> None:
        out = self._outputs.get(chunk.output)
        if self._header is None or out is None:
            raise IntegrityError(f"the prediction stream sent bytes of an unannounced output {chunk.output!r}")
        if chunk.offset != out.filled:
            raise IntegrityError(
                f"output {chunk.output!r}: a chunk starts at {chunk.offset}, expected {out.filled}; "
                "the stream is out of order"
            )
        if isinstance(out.buffer, list):
            if chunk.data:
                raise IntegrityError(f"output {chunk.output!r}: a STRING output's chunk carries raw bytes")
            if out.filled + len(chunk.string_data) > out.spec.byte_size:
                raise IntegrityError(f"output {chunk.output!r}: more elements than the {out.spec.byte_size} announced")
            out.buffer.extend(chunk.string_data)
            step = len(chunk.string_data)
        else:
            if chunk.string_data:
                raise IntegrityError(f"output {chunk.output!r}: a numeric output's chunk carries string elements")
            step = len(chunk.data)
            if out.filled + step > out.spec.byte_size:
                raise IntegrityError(f"output {chunk.output!r}: more bytes than the {out.spec.byte_size} announced")
            out.buffer[out.filled : out.filled + step] = chunk.data
        out.filled += step
        self._done += step
        if self._progress is not None:
            self._progress(self._done, self._total)

    def finish(self) -> Prediction:
        """The reassembled outputs; raises IntegrityError if the stream was incomplete or a checksum differs."""
        if self._header is None or self._trailer is None:
            raise IntegrityError("the prediction stream ended early, before its trailer; retry the call")
        result: dict[str, np.ndarray[Any, Any]] = {}
        for name, out in self._outputs.items():
            if out.filled != out.spec.byte_size:
                raise IntegrityError(f"output {name!r}: received {out.filled} of {out.spec.byte_size} announced")
            if self._verify:
                expected = self._trailer.sha256.get(name)
                if not expected:
                    raise IntegrityError(f"output {name!r}: the stream's trailer carries no sha256 to check it against")
                digest = _output_digest(out)
                if digest != expected:
                    raise IntegrityError(f"output {name!r}: sha256 {digest} differs from the server's {expected}")
            result[name] = _output_array(out)
            if (
                out.spec.dtype == tensor_pb2.DATA_TYPE_BOOL
                and result[name].size
                and result[name].view(np.uint8).max() > 1
            ):
                raise IntegrityError(f"output {name!r}: BOOL elements must be bytes 0 or 1; retry the call")
        header = self._header
        return Prediction(
            outputs=result,
            model=header.model,
            version=header.version,
            sha256=header.sha256,
            timings=timings(self._trailer.timings),
            cache_hit=header.cache_hit,
        )


def _check_announced(spec: inference_pb2.StreamedOutput) -> None:
    """Raises IntegrityError unless an announced output's dtype is known and its size follows from its shape."""
    try:
        dtype = tensors.to_numpy_dtype(spec.dtype)
    except ValueError as exc:
        raise IntegrityError(f"the prediction stream announced output {spec.name!r} with {exc}") from None
    if any(dim < 0 for dim in spec.shape):
        raise IntegrityError(f"the prediction stream announced output {spec.name!r} with shape {list(spec.shape)}")
    elements = math.prod(spec.shape)
    strings = spec.dtype == tensor_pb2.DATA_TYPE_STRING
    expected = elements if strings else elements * dtype.itemsize
    if spec.byte_size != expected:
        unit = "elements" if strings else "bytes"
        raise IntegrityError(
            f"the prediction stream announced output {spec.name!r} of shape {list(spec.shape)} with "
            f"{spec.byte_size} {unit}, not {expected}"
        )


def _output_digest(out: _Output) -> str:
    """The sha256 the server sends for this output: of its raw bytes, or of its length-prefixed STRING elements."""
    if not isinstance(out.buffer, list):
        return hashlib.sha256(out.buffer).hexdigest()
    digest = hashlib.sha256()
    for item in out.buffer:
        digest.update(len(item).to_bytes(4, "little"))
        digest.update(item)
    return digest.hexdigest()


def _output_array(out: _Output) -> np.ndarray[Any, Any]:
    shape = tuple(out.spec.shape)
    if isinstance(out.buffer, list):
        array = np.empty(len(out.buffer), dtype=object)
        array[:] = out.buffer
        return array.reshape(shape)
    return np.frombuffer(out.buffer, dtype=tensors.to_numpy_dtype(out.spec.dtype)).reshape(shape)


_LOADED_STATES = {
    inference_pb2.LOADED_MODEL_STATE_LOADING: ModelState.LOADING,
    inference_pb2.LOADED_MODEL_STATE_READY: ModelState.READY,
    inference_pb2.LOADED_MODEL_STATE_UNLOADING: ModelState.UNLOADING,
    inference_pb2.LOADED_MODEL_STATE_FAILED: ModelState.FAILED,
}


def loaded_model(message: inference_pb2.LoadedModel) -> LoadedModel:
    """The SDK value of a ``LoadedModel`` message."""
    return LoadedModel(
        model=message.model,
        version=message.version,
        sha256=message.sha256,
        state=_LOADED_STATES.get(message.state, ModelState.READY),
        reason=message.reason,
        memory_bytes=message.memory_bytes,
        last_used=_time(message.last_use_time),
        in_flight=message.in_flight,
        load_duration=_duration(message.load_duration),
        execution_providers=tuple(message.execution_providers),
    )


def model_statistics(message: inference_pb2.ModelStatistics) -> ModelStatistics:
    """The SDK value of a ``ModelStatistics`` message."""
    return ModelStatistics(
        model=message.model,
        version=message.version,
        request_count=message.request_count,
        failure_count=message.failure_count,
        inference_count=message.inference_count,
        execution_count=message.execution_count,
        queue_time=_duration(message.queue_duration),
        compute_time=_duration(message.compute_duration),
        total_time=_duration(message.total_duration),
        cache_hit_count=message.cache_hit_count,
        cache_miss_count=message.cache_miss_count,
        batch_sizes=dict(sorted(message.batch_sizes.items())),
        last_inference_time=_time(message.last_inference_time),
        cancelled_count=message.cancelled_count,
    )


_CACHE_STATUSES = {
    inference_pb2.CACHE_STATUS_OK: CacheStatus.OK,
    inference_pb2.CACHE_STATUS_DEGRADED: CacheStatus.DEGRADED,
    inference_pb2.CACHE_STATUS_DISABLED: CacheStatus.DISABLED,
}


def cache_status(value: int) -> CacheStatus:
    return _CACHE_STATUSES.get(inference_pb2.CacheStatus.ValueType(value), CacheStatus.DISABLED)


# --- jobs ----------------------------------------------------------------------------------------------------

_JOB_STATES = {
    jobs_pb2.JOB_STATE_QUEUED: JobState.QUEUED,
    jobs_pb2.JOB_STATE_RUNNING: JobState.RUNNING,
    jobs_pb2.JOB_STATE_COMPLETED: JobState.COMPLETED,
    jobs_pb2.JOB_STATE_FAILED: JobState.FAILED,
    jobs_pb2.JOB_STATE_CANCELLED: JobState.CANCELLED,
}
_PRIORITIES = {
    jobs_pb2.JOB_PRIORITY_LOW: JobPriority.LOW,
    jobs_pb2.JOB_PRIORITY_NORMAL: JobPriority.NORMAL,
    jobs_pb2.JOB_PRIORITY_HIGH: JobPriority.HIGH,
}


def job_state_proto(state: JobState | str | None) -> jobs_pb2.JobState.ValueType:
    """The enum value for a state filter; None means any state."""
    if state is None:
        return jobs_pb2.JOB_STATE_UNSPECIFIED
    wanted = JobState(state.upper()) if isinstance(state, str) else state
    return next(k for k, v in _JOB_STATES.items() if v is wanted)


def job_priority_proto(priority: JobPriority | JobPriorityName | None) -> jobs_pb2.JobPriority.ValueType:
    """The enum value for ``"low"``, ``"normal"``, ``"high"`` (or a JobPriority); None means NORMAL."""
    if priority is None:
        return jobs_pb2.JOB_PRIORITY_UNSPECIFIED
    try:
        wanted = JobPriority(priority.upper() if isinstance(priority, str) else priority)
    except ValueError:
        raise ValueError(f"priority must be 'low', 'normal' or 'high' (or a JobPriority), not {priority!r}") from None
    return next(k for k, v in _PRIORITIES.items() if v is wanted)


def _ref_value(ref: registry_pb2.ModelRef) -> ModelRef:
    which = ref.WhichOneof("selector")
    if which == "version":
        return ModelRef(ref.name, version=ref.version)
    if which == "alias":
        return ModelRef(ref.name, alias=ref.alias)
    return ModelRef(ref.name)


def job_status(message: jobs_pb2.Job) -> JobStatus:
    """The SDK value of a ``Job`` message."""
    p = message.progress
    return JobStatus(
        id=message.id,
        model_ref=_ref_value(message.model_ref),
        model_version=message.model_version,
        state=_JOB_STATES.get(message.state, JobState.QUEUED),
        progress=JobProgress(
            items_done=p.items_done,
            items_total=p.items_total,
            batches_done=p.batches_done,
            batches_total=p.batches_total,
            items_per_second=p.items_per_second,
            time_remaining=_duration(p.estimated_time_remaining) if p.HasField("estimated_time_remaining") else None,
        ),
        dataset_id=message.dataset_id,
        dataset_deleted=message.dataset_deleted,
        batch_size=message.batch_size,
        priority=_PRIORITIES.get(message.priority, JobPriority.NORMAL),
        labels=dict(message.labels),
        max_attempts=message.max_attempts,
        time_limit=_duration(message.time_limit) if message.HasField("time_limit") else None,
        attempt_count=message.attempt_count,
        worker_id=message.worker_id,
        create_time=_time(message.create_time),
        start_time=_time(message.start_time),
        finish_time=_time(message.finish_time),
        update_time=_time(message.update_time),
        queued_time=_duration(message.queued_duration),
        inference_time=_duration(message.inference_duration),
        error=JobFailure(message.error.code, message.error.reason, message.error.message)
        if message.HasField("error")
        else None,
        request_id=message.request_id,
        queued_reason=message.queued_reason,
        next_run_time=_time(message.next_run_time),
    )


def dataset(message: jobs_pb2.Dataset) -> Dataset:
    """The SDK value of a ``Dataset`` message."""
    return Dataset(
        id=message.id,
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        item_count=message.item_count,
        record_count=message.record_count,
        tensors=tuple(tensor_spec(t) for t in message.tensors),
        display_name=message.display_name,
        labels=dict(message.labels),
        create_time=_time(message.create_time),
    )


def _items(arrays: Mapping[str, Any]) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """The arrays (as numpy) and their common item count (the length of their first dimension)."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("job input must be a non-empty mapping of input name to array, e.g. {'input': array}")
    _check_input_names(arrays)
    converted = {name: np.asarray(value) for name, value in arrays.items()}
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in converted.items()}
    if None in counts.values():
        scalar = next(n for n, c in counts.items() if c is None)
        raise ValueError(f"input {scalar!r} is a scalar; job inputs have a first dimension that counts the items")
    if len(set(counts.values())) != 1:
        raise ValueError(f"every input must have the same number of items (first dimension); got {counts}")
    return converted, next(iter(counts.values()))  # type: ignore[return-value]


def inline_input(arrays: Mapping[str, Any]) -> jobs_pb2.InlineInput:
    """The inline input of a job: one tensor per input, the first dimension counting the items."""
    converted, _ = _items(arrays)
    return jobs_pb2.InlineInput(tensors=[tensors.to_tensor(a, name) for name, a in converted.items()])


def input_bytes(arrays: Mapping[str, Any]) -> int:
    """Roughly how many bytes the arrays take on the wire (numbers only; strings count as 64 bytes each)."""
    return sum(a.nbytes if a.dtype != object else a.size * 64 for a in (np.asarray(v) for v in arrays.values()))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def encode_dataset(arrays: Mapping[str, Any], *, record_bytes: int = 1 * MiB) -> bytes:
    """A dataset file for ``arrays``: length-delimited DatasetRecord messages of about ``record_bytes`` each.

    The items (rows along the first dimension) are split into records in order; every record carries every
    input. See ``DatasetRecord`` in jobs.proto for the format.
    """
    converted, count = _items(arrays)
    if count == 0:
        raise ValueError("a dataset needs at least one item; the inputs' first dimension is 0")
    per_item = max(1, input_bytes({n: a[:1] for n, a in converted.items()}))
    step = max(1, record_bytes // per_item)
    out = bytearray()
    for start in range(0, count, step):
        record = jobs_pb2.DatasetRecord(
            tensors=[tensors.to_tensor(a[start : start + step], name) for name, a in converted.items()]
        )
        body = record.SerializeToString()
        out += _varint(len(body))
        out += body
    return bytes(out)


def _result_record(
    message: jobs_pb2.GetJobResultResponse, expected: int
) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """The outputs one result message carries, by name, and how many items they cover.

    Raises IntegrityError unless the record starts at item ``expected`` and its outputs agree on their item count.
    """
    if message.first_item != expected:
        raise IntegrityError(
            f"the job result skipped or repeated items: a record starts at item {message.first_item}, "
            f"expected {expected}; retry the call"
        )
    arrays = {tensor.name: tensors.to_numpy(tensor) for tensor in message.record.tensors}
    counts = {name: array.shape[0] if array.ndim else 1 for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        raise IntegrityError(
            f"the job result's record at item {expected} holds outputs of different item counts {counts}; "
            "retry the call"
        )
    return arrays, next(iter(counts.values()), 0)


class _Layout:
    """Each output's dtype and per-item shape, as the first record of a job's result gives them: every later record
    must carry the same outputs with the same items, for the items to make one array per output."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}

    def check(self, arrays: Mapping[str, np.ndarray[Any, Any]], first_item: int) -> None:
        """Raises IntegrityError for a record of other outputs, ValueError for an output whose items changed."""
        if self.items and arrays.keys() != self.items.keys():
            raise IntegrityError(
                f"the job result's record at item {first_item} holds outputs {sorted(arrays)}, not "
                f"{sorted(self.items)} as before; retry the call"
            )
        for name, array in arrays.items():
            item = self.items.setdefault(name, (array.dtype, array.shape[1:]))
            if item != (array.dtype, array.shape[1:]):
                raise ValueError(
                    f"output {name!r} is {array.dtype}{list(array.shape[1:])} per item from item {first_item}, "
                    f"{item[0]}{list(item[1])} before: its items do not make one array"
                )


class ResultAssembler:
    """Collects a job's result stream, record by record in item order, into one array per output; the stream must
    hold the job's ``items_total`` items, as :class:`ResultCheck` checks for a file."""

    def __init__(self, items_total: int) -> None:
        self._total = items_total
        self._parts: dict[str, list[np.ndarray[Any, Any]]] = {}
        self._layout = _Layout()
        self._next = 0

    def accept(self, message: jobs_pb2.GetJobResultResponse) -> None:
        """Takes one stream message. Raises ValueError for an output whose items change dtype or shape."""
        arrays, count = _result_record(message, self._next)
        self._layout.check(arrays, self._next)
        for name, array in arrays.items():
            self._parts.setdefault(name, []).append(array)
        self._next += count

    def finish(self) -> dict[str, np.ndarray[Any, Any]]:
        """Output name to the outputs of every item, in item order.

        Raises:
            IntegrityError: the stream held more or fewer items than the job.
        """
        if self._next != self._total:
            raise IntegrityError(f"the job result held {self._next} of the job's {self._total} items; retry the call")
        return {name: np.concatenate(parts) for name, parts in self._parts.items()}


def storable(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``array`` as a .npy file holds it without pickle, so that ``np.load(..., allow_pickle=False)`` reads it back.

    A STRING output (an object array of bytes) becomes a ``str`` array when every element is UTF-8 text, else a
    ``bytes`` array; any other array is returned as it is.

    Raises:
        ValueError: an element ends in a NUL byte, which numpy drops from both kinds.
    """
    if array.dtype != object:
        return array
    elements = [bytes(element) if not isinstance(element, str) else element.encode() for element in array.flat]
    if any(element.endswith(b"\0") for element in elements):
        raise ValueError(
            f"output {name!r} has strings ending in NUL bytes, which a .npy file cannot hold without pickle"
        )
    try:
        return np.array([element.decode() for element in elements], dtype=str).reshape(array.shape)
    except UnicodeDecodeError:
        return np.array(elements, dtype=bytes).reshape(array.shape)


SavedResult = dict[str, tuple[np.dtype[Any], tuple[int, ...]]]
"""What :meth:`Job.save_result` wrote: output name to the dtype and shape of its array in the file."""


@dataclass(frozen=True, slots=True)
class ResultPiece:
    """Part of a numeric output to append to its .npy file: the items of one record, in item order.

    Attributes:
        output: The output's name.
        array: Its items in this record (a view of the message's bytes).
        shape: The shape of the whole output in the file, for the .npy header written before the first piece.
    """

    output: str
    array: np.ndarray[Any, Any]
    shape: tuple[int, ...]


class ResultCheck:
    """Checks a job's result stream, record by record, as it is saved to a file output by output.

    The :class:`ResultAssembler` of a file: each numeric output is written as it arrives, to a .npy file sized
    for the job's ``items_total`` items, so that saving a result takes the memory of one record, not of the
    result. :meth:`accept` returns the pieces to append; it checks that records come in item order, carry the same
    outputs, and keep each output's dtype and per-item shape. STRING outputs have no fixed width to lay out
    before their last item: they are kept, and :meth:`finish` returns them whole, as :func:`storable` makes them.
    """

    def __init__(self, items_total: int) -> None:
        self._total = items_total
        self._next = 0
        self._layout = _Layout()
        self._strings: dict[str, list[np.ndarray[Any, Any]]] = {}

    def accept(self, message: jobs_pb2.GetJobResultResponse) -> list[ResultPiece]:
        """Takes one stream message and returns its numeric outputs' pieces to append, in output order."""
        arrays, count = _result_record(message, self._next)
        if self._next + count > self._total:
            raise IntegrityError(
                f"the job result holds more items than the job's {self._total}: a record of {count} starts at "
                f"item {self._next}; retry the call"
            )
        self._layout.check(arrays, self._next)
        pieces = []
        for name, array in arrays.items():
            item = self._layout.items[name]
            if array.dtype == object:
                self._strings.setdefault(name, []).append(array)
            else:
                pieces.append(ResultPiece(name, array, (self._total, *item[1])))
        self._next += count
        return pieces

    def finish(self) -> tuple[SavedResult, dict[str, np.ndarray[Any, Any]]]:
        """What the file holds, output by output in stream order, and the STRING outputs' whole arrays to save.

        Raises:
            IntegrityError: the stream ended before the job's last item.
            ValueError: a STRING output has an element that :func:`storable` refuses.
        """
        if self._next != self._total:
            raise IntegrityError(
                f"the job result ended early: it held {self._next} of the job's {self._total} items; retry the call"
            )
        strings = {}
        for name, parts in self._strings.items():
            try:
                strings[name] = storable(name, np.concatenate(parts))
            except ValueError as exc:
                raise ValueError(f"{exc}; read it with result() instead") from None
        saved = {
            name: (strings[name].dtype, strings[name].shape) if name in strings else (dtype, (self._total, *shape))
            for name, (dtype, shape) in self._layout.items.items()
        }
        return saved, strings


def dataset_upload_requests(
    data: bytes,
    *,
    display_name: str,
    labels: Mapping[str, str] | None,
    chunk_bytes: int,
    progress: UploadProgress,
) -> Iterator[jobs_pb2.UploadDatasetRequest]:
    """Every message of a dataset upload: the header with sha256 and size, then chunks, reporting progress."""
    header = jobs_pb2.UploadDatasetHeader(
        display_name=display_name, labels=dict(labels or {}), sha256=sha256_of_bytes(data), size_bytes=len(data)
    )
    progress.report(0, len(data))
    yield jobs_pb2.UploadDatasetRequest(header=header)
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        piece = bytes(view[start : start + chunk_bytes])
        progress.report(start + len(piece), len(data))
        yield jobs_pb2.UploadDatasetRequest(chunk=piece)

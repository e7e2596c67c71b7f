"""Calls to the registry and the inference service; their grpc.RpcError become domain errors here.

A failure keeps its kind, so that the runner can tell transient ones (UNAVAILABLE, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED: run the job again later) from permanent ones (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION:
fail the job with the reason), and keeps the remote ErrorInfo.reason. One RESOURCE_EXHAUSTED is permanent: a batch
whose outputs are too large for one answer (RESPONSE_TOO_LARGE) is too large on every attempt.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.common.v1.tensor_pb2 import Tensor
from modelforge.inference.v1 import inference_pb2
from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_jobs import convert, errors
from modelforge_jobs.datasets import encode_varint
from modelforge_jobs.domain import Dims, Priority, ResolvedModel, TensorInfo, itemization
from modelforge_server.errors import ServiceError
from modelforge_server.probes import ServingProbe
from modelforge_server.refs import ModelRef

_KINDS: dict[grpc.StatusCode, type[errors.RemoteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.RemoteInvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: errors.RemoteInvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.RemoteNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.RemoteFailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.RemoteResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.RemoteDeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: errors.RemoteUnavailable,
    # The worker never cancels its own calls (its shutdown cancels the task instead): CANCELLED comes from a server
    # that stopped mid-call, and ABORTED from a concurrent change there; both succeed when tried again.
    grpc.StatusCode.CANCELLED: errors.RemoteUnavailable,
    grpc.StatusCode.ABORTED: errors.RemoteUnavailable,
}

# Job priority to PredictRequest.priority: 1 is the most urgent level; levels past the model's count are its last.
_INFERENCE_PRIORITY = {Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# What gRPC says when a request is larger than the sender's or the receiver's message limit.
_MESSAGE_LIMITS = ("Sent message larger than max", "Received message larger than max")


def _remote_reason(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason or None
    return None


def translate(exc: grpc.aio.AioRpcError, service: str) -> ServiceError:
    """The domain error for a failed call to `service` ("registry" or "inference service")."""
    code = exc.code()
    details = exc.details() or code.name
    reason = _remote_reason(exc)
    if reason == errors.BatchAnswerTooLarge.reason:
        return errors.BatchAnswerTooLarge(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(limit in details for limit in _MESSAGE_LIMITS):
        return errors.BatchRequestTooLarge(details)
    kind = _KINDS.get(code, errors.RemoteInternal)
    message = details if kind is not errors.RemoteUnavailable else f"the {service} is unavailable: {details}"
    return kind(message, reason=reason)


# What a call answering for a caller keeps of the caller's remaining time to answer it.
_ANSWER_MARGIN = 0.5


class RegistryClient:
    """Resolves model references with the registry."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._timeout = timeout

    async def resolve(self, ref: ModelRef, *, within: float | None = None) -> ResolvedModel:
        """The version `ref` names now. `within`: the seconds left to the caller's own deadline; the registry gets
        a little less, so that a registry that does not answer is reported UNAVAILABLE while the caller still
        listens, rather than the caller's deadline passing first.

        Raises:
            RemoteUnavailable: the registry is down, or did not answer in time.
        """
        timeout = self._timeout if within is None else max(0.05, min(self._timeout, within - _ANSWER_MARGIN))
        try:
            response = await self._stub.ResolveModelRef(
                registry_pb2.ResolveModelRefRequest(ref=convert.ref_to_proto(ref)), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # this call's timeout: the registry did not answer
                raise errors.RemoteUnavailable(
                    f"the registry is unavailable: it did not answer within {timeout:.1f} s",
                    reason="REGISTRY_UNAVAILABLE",
                ) from exc
            if exc.code() == grpc.StatusCode.UNAVAILABLE and _remote_reason(exc) is None:  # not reached at all
                raise errors.RemoteUnavailable(
                    f"the registry is unavailable: {exc.details() or 'no connection'}", reason="REGISTRY_UNAVAILABLE"
                ) from exc
            raise translate(exc, "registry") from exc
        version = response.model_version
        if version.state == registry_pb2.VERSION_STATE_ARCHIVED:
            raise errors.VersionArchived(version.model, int(version.version))
        inputs = tuple(
            TensorInfo(spec.name, int(spec.dtype), tuple(int(d) for d in spec.shape[1:]))
            for spec in version.signature.inputs
        )
        ranks = tuple(len(spec.shape) for spec in version.signature.inputs)
        fixed_items, unitemized = itemization(
            [_dims(spec) for spec in version.signature.inputs],
            # Outputs that are not tensors (dtype UNSPECIFIED) are never computed, so never stored.
            {spec.name: _dims(spec) for spec in version.signature.outputs if spec.dtype},
        )
        return ResolvedModel(
            version.model,
            int(version.version),
            version.sha256,
            inputs,
            ranks,
            fixed_items,
            unitemized,
            output_item_bytes=sum(_declared_item_bytes(spec) for spec in version.signature.outputs),
        )


def _declared_item_bytes(spec: tensor_pb2.TensorSpec) -> int:
    """Bytes per item of an output, from its signature: 0 unless its elements and every dimension after the first
    have a fixed size."""
    if spec.dtype in (tensor_pb2.DATA_TYPE_UNSPECIFIED, tensor_pb2.DATA_TYPE_STRING) or len(spec.shape) < 1:
        return 0
    item_shape = [int(d) for d in spec.shape[1:]]
    if any(d < 0 for d in item_shape):
        return 0
    try:
        return tensors.element_count(item_shape) * tensors.itemsize(spec.dtype)
    except ValueError:  # a dtype this release does not know
        return 0


def _dims(spec: tensor_pb2.TensorSpec) -> Dims:
    names = list(spec.dim_names) + [""] * (len(spec.shape) - len(spec.dim_names))
    return tuple((int(size), name) for size, name in zip(spec.shape, names, strict=False))


class InferenceClient:
    """Runs batches on the inference service, always on the pinned version.

    A batch's Predict is sent and received as bytes, which keeps the Python work per call small: the request is
    the job's fixed fields, serialized once per job, around each input tensor's own serialization (protobuf's wire
    format is the concatenation of the fields, so these are the very bytes protobuf makes of the PredictRequest),
    and the response's outputs become a DatasetRecord by changing only their field tags. No message is built for
    a whole batch on either side.
    """

    PREDICT = f"/{inference_pb2.DESCRIPTOR.services_by_name['InferenceService'].full_name}/Predict"

    def __init__(self, channels: Sequence[grpc.aio.Channel], *, timeout: float) -> None:
        # No serializers: requests and responses pass as bytes. Several channels: each batch takes the next.
        self._predicts = itertools.cycle([c.unary_unary(self.PREDICT, _registered_method=True) for c in channels])
        self._timeout = timeout
        self._around_inputs: dict[tuple[str, int, Priority], tuple[bytes, bytes]] = {}

    def _around(self, model: str, version: int, priority: Priority) -> tuple[bytes, bytes]:
        key = (model, version, priority)
        around = self._around_inputs.get(key)
        if around is None:
            around = request_around(model, version, priority)
            self._around_inputs = {key: around}  # a runner runs one job at a time: keep the last one only
        return around

    async def predict(
        self,
        model: str,
        version: int,
        inputs: Sequence[Tensor],
        *,
        items: int,
        priority: Priority,
        timeout: float | None = None,
    ) -> bytes:
        """Runs one batch of `items` items; returns its outputs as a serialized DatasetRecord.

        Raises OutputsNotPerItem when an output's first dimension is not `items`: the batch cannot be split into
        its items' outputs (a model whose signature did not show it, such as an unnamed count of detections)."""
        request = predict_request(self._around(model, version, priority), inputs)
        deadline = self._timeout if timeout is None else min(timeout, self._timeout)
        try:
            response = await next(self._predicts)(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and _remote_reason(exc) is None:
                # The call's own deadline, not an answer (the service names its reasons): the inference service
                # did not answer in time, hung or far behind, so the job waits for it as for one that is down.
                raise errors.RemoteUnavailable(
                    f"the inference service did not answer a batch within {deadline:g} s (MODELFORGE_INFERENCE_TIMEOUT)"
                ) from exc
            raise translate(exc, "inference service") from exc
        record, rows = outputs_record(response)
        for output, first in rows:
            if first != items:
                shown = "is a scalar" if first is None else f"held {first} rows for a batch of {items} items"
                raise errors.OutputsNotPerItem(model, version, output, shown)
        return record


# The keys (field number << 3 | wire type 2) of PredictRequest.inputs, PredictResponse.outputs, DatasetRecord.tensors.
_INPUTS_TAG = bytes([2 << 3 | 2])
_OUTPUTS_KEY = 4 << 3 | 2
_TENSORS_TAG = bytes([1 << 3 | 2])


def request_around(model: str, version: int, priority: Priority) -> tuple[bytes, bytes]:
    """A batch's serialized PredictRequest less its inputs: the bytes before them (the ref, field 1) and the bytes
    after them (fields 4 and 6), so that the request comes in field order, as protobuf writes it."""
    before = inference_pb2.PredictRequest(ref=registry_pb2.ModelRef(name=model, version=version))
    after = inference_pb2.PredictRequest(
        priority=_INFERENCE_PRIORITY[priority], cache_mode=inference_pb2.CACHE_MODE_BYPASS
    )
    return before.SerializeToString(), after.SerializeToString()


def predict_request(around: tuple[bytes, bytes], inputs: Sequence[Tensor]) -> bytes:
    """The serialized PredictRequest of a batch: its inputs' serializations between the bytes of `request_around`."""
    parts = [around[0]]
    for tensor in inputs:
        data = tensor.SerializeToString()
        parts += (_INPUTS_TAG, encode_varint(len(data)), data)
    parts.append(around[1])
    return b"".join(parts)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the serialized message in data[pos:end], in order, none of them copied: each as its key,
    where the bytes after the key start, where its value starts (after the length, for a length-delimited one)
    and where it ends. Raises ValueError for an unknown wire type or a message cut short."""
    while pos < end:
        key, after_key = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            start, pos = after_key, _read_varint(data, after_key)[1]
        elif wire == 2:
            size, start = _read_varint(data, after_key)
            pos = start + size
        elif wire in (1, 5):
            start, pos = after_key, after_key + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        yield key, after_key, start, pos
    if pos != end:
        raise ValueError("it is cut short")


def outputs_record(response: bytes) -> tuple[bytes, list[tuple[str, int | None]]]:
    """A serialized PredictResponse's outputs as a serialized DatasetRecord: each output's bytes, tagged as one of
    the record's tensors; the response's other fields are skipped. With it, each output's name and first dimension
    (None for a scalar). Raises RemoteInternal when it is malformed."""
    parts: list[bytes | memoryview] = []
    rows: list[tuple[str, int | None]] = []
    view = memoryview(response)
    try:
        for key, after_key, start, stop in _fields(response, 0, len(response)):
            if key == _OUTPUTS_KEY:
                parts += (_TENSORS_TAG, view[after_key:stop])  # the same length, then the same tensor
                rows.append(_head(response, start, stop))
    except (IndexError, ValueError) as exc:
        raise errors.RemoteInternal(f"the inference service sent a malformed PredictResponse: {exc}") from exc
    return b"".join(parts), rows


# The keys of Tensor.name, and of Tensor.shape packed (as protobuf writes it) and not.
_NAME_KEY = 1 << 3 | 2
_SHAPE_PACKED_KEY = 3 << 3 | 2
_SHAPE_KEY = 3 << 3 | 0


def _head(data: bytes, pos: int, end: int) -> tuple[str, int | None]:
    """The name and first dimension (None for a scalar) of the serialized Tensor in data[pos:end]."""
    name = ""
    for key, _, start, stop in _fields(data, pos, end):
        if key == _NAME_KEY:
            name = bytes(data[start:stop]).decode("utf-8", "replace")
        elif key == _SHAPE_KEY or (key == _SHAPE_PACKED_KEY and stop > start):
            return name, _read_varint(data, start)[0]
    return name, None  # no shape: a scalar


def registry_probe(channel: grpc.aio.Channel) -> ServingProbe:
    """The registry's readiness, as a dependency check of the jobs API."""
    service = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
    return ServingProbe(channel, service, functools.partial(errors.DependencyUnavailable, "registry"))


def inference_probe(channel: grpc.aio.Channel) -> ServingProbe:
    """The inference service's readiness, as a dependency check of the jobs API."""
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
    return ServingProbe(channel, service, functools.partial(errors.DependencyUnavailable, "inference service"))

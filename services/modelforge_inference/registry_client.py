"""The inference service's side of the registry API: the three calls it makes, in domain terms.

:class:`RegistryClient` wraps a ``RegistryServiceStub`` on a ``grpc.aio`` channel. It turns registry messages into
domain objects (:class:`ResolvedModel`, :class:`ModelEvent`) and every ``grpc.RpcError`` into a kind from
``modelforge_server.errors`` (:func:`translated`), keeping the registry's message and ``ErrorInfo`` reason, so that a
NOT_FOUND from the registry reaches our own caller as NOT_FOUND with the registry's words:

    grpc status from the registry      raised here
    NOT_FOUND                          RegistryNotFound (NotFound)
    UNAVAILABLE, CANCELLED, INTERNAL,  RegistryUnavailable (Unavailable): the registry is down, restarting or broken;
      UNKNOWN and anything unlisted      retrying later may succeed
    INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED
                                       the kind of the same name, with the registry's reason

Nothing else in the inference service catches ``grpc.RpcError`` from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_inference.domain import ModelRef, ModelSummary, ResolvedModel, Signature, TensorSpec
from modelforge_server import errors

__all__ = [
    "ModelEvent",
    "ModelEventType",
    "ModelFileCorrupt",
    "RegistryClient",
    "RegistryNotFound",
    "RegistryUnavailable",
    "resolved_model",
    "signature",
    "translated",
]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ModelEventType(enum.Enum):
    """What changed in the registry (the registry's ModelEventType, without the prefix)."""

    WATCH_STARTED = registry_pb2.MODEL_EVENT_TYPE_WATCH_STARTED
    MODEL_CREATED = registry_pb2.MODEL_EVENT_TYPE_MODEL_CREATED
    MODEL_UPDATED = registry_pb2.MODEL_EVENT_TYPE_MODEL_UPDATED
    MODEL_DELETED = registry_pb2.MODEL_EVENT_TYPE_MODEL_DELETED
    VERSION_CREATED = registry_pb2.MODEL_EVENT_TYPE_VERSION_CREATED
    VERSION_UPDATED = registry_pb2.MODEL_EVENT_TYPE_VERSION_UPDATED
    VERSION_ARCHIVED = registry_pb2.MODEL_EVENT_TYPE_VERSION_ARCHIVED
    VERSION_RESTORED = registry_pb2.MODEL_EVENT_TYPE_VERSION_RESTORED
    VERSION_DELETED = registry_pb2.MODEL_EVENT_TYPE_VERSION_DELETED
    ALIAS_SET = registry_pb2.MODEL_EVENT_TYPE_ALIAS_SET
    ALIAS_DELETED = registry_pb2.MODEL_EVENT_TYPE_ALIAS_DELETED
    # A type newer than this build (a registry upgraded first): some change to the event's model.
    OTHER = -1


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """One change in the registry. model is empty and version 0 where the type has none."""

    type: ModelEventType
    model: str = ""
    version: int = 0
    alias: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Errors


class RegistryNotFound(errors.NotFound):
    """The registry has no such model, version or alias; the message is the registry's."""

    reason = "NOT_FOUND"

    def __init__(self, message: str, reason: str = "", **metadata: str) -> None:
        super().__init__(message, **metadata)
        if reason:
            self.reason = reason


class RegistryUnavailable(errors.Unavailable):
    """The registry could not be reached or failed; retrying later may succeed."""

    reason = "REGISTRY_UNAVAILABLE"

    def __init__(self, what: str, detail: str, **metadata: str) -> None:
        super().__init__(
            f"the model registry could not {what}: {detail or 'no details'}; retry when it is reachable again",
            **metadata,
        )


_KINDS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,  # a version file lost from the blob store: no retry helps
}


def _error_info(exc: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The registry's ErrorInfo reason and metadata, from the status details trailer; empty when absent."""
    trailers = exc.trailing_metadata() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None
    for key, value in trailers or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed trailer must not hide the error itself
            return "", {}
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason, dict(info.metadata)
    return "", {}


def translate(exc: grpc.RpcError, what: str) -> errors.ServiceError:
    """The domain error for a failed registry call; ``what`` completes "the model registry could not ...".

    A call that outlived its timeout is RegistryUnavailable: the registry did not answer in time, which is not the
    caller's deadline passing."""
    code = exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None) or ""
    reason, metadata = _error_info(exc)
    if code == grpc.StatusCode.NOT_FOUND:
        return RegistryNotFound(details or f"the model registry found nothing to {what}", reason, **metadata)
    kind = _KINDS.get(code)
    if kind is None:
        return RegistryUnavailable(what, f"{code.name}: {details}" if details else code.name, **metadata)
    error = kind(details or f"the model registry refused to {what} ({code.name})", **metadata)
    if reason:
        error.reason = reason
    return error


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Re-raises a grpc.RpcError from the registry as the domain error :func:`translate` gives."""
    try:
        yield
    except grpc.RpcError as exc:
        raise translate(exc, what) from exc


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def _spec(spec: tensor_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(
        name=spec.name,
        dtype=tensors.to_numpy_dtype(spec.dtype),
        shape=tuple(spec.shape),
        dim_names=tuple(spec.dim_names),
        ort_type=tensors.to_ort_type(spec.dtype),  # tells bfloat16 from uint16, which share a numpy dtype
    )


def signature(proto: registry_pb2.Signature) -> Signature:
    """The domain view of a registry Signature.

    The registry stores a graph output that is not a tensor (a sequence or map, such as skl2onnx's ZipMap) with
    dtype UNSPECIFIED, as it does a tensor of an element type ModelForge lacks: neither can be served, so such
    outputs are left out of ``outputs`` and named in ``non_tensor_outputs``.
    """
    unspecified = tensor_pb2.DATA_TYPE_UNSPECIFIED
    return Signature(
        # An input that is not a tensor is left out too: no request can feed it, and the version fails to load.
        inputs=tuple(_spec(spec) for spec in proto.inputs if spec.dtype != unspecified),
        outputs=tuple(_spec(spec) for spec in proto.outputs if spec.dtype != unspecified),
        non_tensor_outputs=tuple(spec.name for spec in proto.outputs if spec.dtype == unspecified),
        non_tensor_inputs=tuple(spec.name for spec in proto.inputs if spec.dtype == unspecified),
    )


def resolved_model(version: registry_pb2.ModelVersion) -> ResolvedModel:
    """The domain view of a registry ModelVersion."""
    return ResolvedModel(
        name=version.model,
        version=version.version,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        signature=signature(version.signature),
        labels=dict(version.labels),
        aliases=tuple(version.aliases),
        archived=version.state == registry_pb2.VERSION_STATE_ARCHIVED,
    )


def ref_to_proto(ref: ModelRef) -> registry_pb2.ModelRef:
    if ref.version is not None:
        return registry_pb2.ModelRef(name=ref.name, version=ref.version)
    if ref.alias is not None:
        return registry_pb2.ModelRef(name=ref.name, alias=ref.alias)
    return registry_pb2.ModelRef(name=ref.name)


# ---------------------------------------------------------------------------------------------------------------
# Calls


class ModelFileCorrupt(errors.Unavailable):
    """The registry sent a file other than the one resolved: its sha256 or size differs, or the stream broke off."""

    reason = "MODEL_FILE_CORRUPT"

    def __init__(self, model: ResolvedModel, detail: str) -> None:
        super().__init__(
            f"the file of {model.name}:{model.version} from the registry does not match its record ({detail}); "
            "nothing was kept; retry, and check the registry's blob store if it persists",
            model=model.name,
            version=str(model.version),
            sha256=model.sha256,
        )


class RegistryClient:
    """ResolveModelRef, DownloadModelVersion, WatchModelEvents and ListModels, in domain terms and with domain
    errors."""

    def __init__(self, stub: registry_pb2_grpc.RegistryServiceStub, *, call_timeout: float = 10.0) -> None:
        self._stub = stub
        self._call_timeout = call_timeout

    async def list_models(self, *, page_size: int = 500) -> AsyncIterator[ModelSummary]:
        """Every model in the registry, in name order, fetched page by page."""
        token = ""
        while True:
            with translated("list its models"):
                page = await self._stub.ListModels(
                    registry_pb2.ListModelsRequest(page_size=page_size, page_token=token), timeout=self._call_timeout
                )
            for model in page.models:
                yield ModelSummary(model.name, model.latest_version)
            if not (token := page.next_page_token):
                return

    async def resolve(self, ref: ModelRef, *, timeout: float | None = None) -> ResolvedModel:
        """The version ``ref`` points at now."""
        with translated(f"resolve {ref}"):
            response = await self._stub.ResolveModelRef(
                registry_pb2.ResolveModelRefRequest(ref=ref_to_proto(ref)), timeout=timeout
            )
        return resolved_model(response.model_version)

    async def download(self, model: ResolvedModel) -> AsyncGenerator[bytes, None]:
        """The file of ``model``, chunk by chunk. Checks that the registry sends that very version and sha256;
        the caller checks the bytes. Closing the generator early cancels the call.

        A download may take as long as its size needs, but the registry must send its next message within the
        call timeout: a registry that stalls (a blob store that hangs while the connection stays up) fails the
        download with RegistryUnavailable instead of holding its version LOADING for good.
        """
        what = f"send the file of {model.name}:{model.version}"
        request = registry_pb2.DownloadModelVersionRequest(
            ref=registry_pb2.ModelRef(name=model.name, version=model.version)
        )
        call = self._stub.DownloadModelVersion(request)
        try:
            with translated(what):
                first = True
                while True:
                    try:
                        message = await asyncio.wait_for(call.read(), self._call_timeout)
                    except TimeoutError:
                        raise RegistryUnavailable(
                            what, f"it sent nothing for {self._call_timeout:g} s in the middle of the file"
                        ) from None
                    if message is grpc.aio.EOF:
                        break
                    if first:
                        first = False
                        if message.WhichOneof("content") != "model_version":
                            raise ModelFileCorrupt(model, "the stream did not start with the version header")
                        header = message.model_version
                        if header.sha256 != model.sha256 or header.size_bytes != model.size_bytes:
                            raise ModelFileCorrupt(
                                model,
                                f"the registry sends sha256 {header.sha256} of {header.size_bytes} bytes, "
                                f"expected {model.sha256} of {model.size_bytes} bytes",
                            )
                        continue
                    yield message.chunk
                if first:
                    raise ModelFileCorrupt(model, "the stream was empty")
        finally:
            call.cancel()

    async def watch(self, model: str = "") -> AsyncGenerator[ModelEvent, None]:
        """The registry's model events, from WATCH_STARTED on, until the stream breaks (RegistryUnavailable) or
        the registry ends it (the generator returns). Closing the generator cancels the call."""
        call = self._stub.WatchModelEvents(registry_pb2.WatchModelEventsRequest(model=model))
        try:
            with translated("stream model events"):
                async for message in call:
                    event = message.event
                    try:
                        kind = ModelEventType(event.type)
                    except ValueError:  # still a change to event.model: what is cached of it must go
                        kind = ModelEventType.OTHER
                    yield ModelEvent(kind, event.model, event.version, event.alias)
        finally:
            call.cancel()

"""Calls to the registry and the inference service; their grpc.RpcError become domain errors here.

A failure keeps its kind, so that the runner can tell transient ones (UNAVAILABLE, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED: run the job again later) from permanent ones (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION:
fail the job with the reason), and keeps the remote ErrorInfo.reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.common.v1.tensor_pb2 import Tensor
from modelforge.inference.v1 import inference_pb2, inference_pb2_grpc
from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_jobs import errors
from modelforge_jobs.domain import ModelRefSpec, Priority, ResolvedModel, TensorInfo
from modelforge_server.errors import ServiceError

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
    kind = _KINDS.get(code, errors.RemoteInternal)
    details = exc.details() or code.name
    message = details if kind is not errors.RemoteUnavailable else f"the {service} is unavailable: {details}"
    return kind(message, reason=_remote_reason(exc))


def _ref_proto(ref: ModelRefSpec) -> registry_pb2.ModelRef:
    proto = registry_pb2.ModelRef(name=ref.name)
    if ref.version is not None:
        proto.version = ref.version
    elif ref.alias is not None:
        proto.alias = ref.alias
    return proto


class RegistryClient:
    """Resolves model references with the registry."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._timeout = timeout

    async def resolve(self, ref: ModelRefSpec) -> ResolvedModel:
        try:
            response = await self._stub.ResolveModelRef(
                registry_pb2.ResolveModelRefRequest(ref=_ref_proto(ref)), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "registry") from exc
        version = response.model_version
        if version.state == registry_pb2.VERSION_STATE_ARCHIVED:
            raise errors.VersionArchived(version.model, int(version.version))
        inputs = tuple(
            TensorInfo(spec.name, int(spec.dtype), tuple(int(d) for d in spec.shape[1:]))
            for spec in version.signature.inputs
        )
        ranks = tuple(len(spec.shape) for spec in version.signature.inputs)
        return ResolvedModel(version.model, int(version.version), version.sha256, inputs, ranks)


class InferenceClient:
    """Runs batches on the inference service, always on the pinned version."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._timeout = timeout

    async def predict(
        self,
        model: str,
        version: int,
        inputs: Sequence[Tensor],
        *,
        priority: Priority,
        timeout: float | None = None,
    ) -> list[Tensor]:
        request = inference_pb2.PredictRequest(
            ref=registry_pb2.ModelRef(name=model, version=version),
            inputs=inputs,
            priority=_INFERENCE_PRIORITY[priority],
            cache_mode=inference_pb2.CACHE_MODE_BYPASS,
        )
        deadline = self._timeout if timeout is None else min(timeout, self._timeout)
        try:
            response = await self._stub.Predict(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "inference service") from exc
        return list(response.outputs)


class InferenceHealth:
    """The inference service's readiness as a dependency check of the jobs API: ``await InferenceHealth(channel)()``
    raises DependencyUnavailable unless it reports its InferenceService SERVING (health RPCs are never traced)."""

    SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 1.0) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._request = health_pb2.HealthCheckRequest(service=self.SERVICE)
        self._timeout = timeout

    async def __call__(self) -> None:
        try:
            response = await self._stub.Check(self._request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise errors.DependencyUnavailable("inference service", exc.code().name) from exc
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            raise errors.DependencyUnavailable("inference service", f"its health check answers {status}")

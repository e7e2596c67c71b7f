"""Another ModelForge service's readiness, as a dependency check of this one (see `app.Server.watch_dependency`).

The inference service watches the registry this way, the jobs API the registry and the inference service. A probe
asks the other service's ``grpc.health.v1.Health/Check`` about one of its gRPC services, which that service reports
NOT_SERVING while a dependency of its own (its database) is down, and raises unless the answer is SERVING. Health
calls are never traced.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["ServingProbe"]


class ServingProbe:
    """``await ServingProbe(...)()`` raises ``unavailable(detail)`` unless ``service`` is SERVING over ``channel``.

    Args:
        channel: This service's channel to the other one.
        service: The full name of the gRPC service asked about, e.g. ``modelforge.registry.v1.RegistryService``.
        unavailable: Makes the domain error to raise from a detail ("UNAVAILABLE: ...", "its health check answers
            NOT_SERVING").
        timeout: Longest one Check may take.
        observer: Called with each probe's finding, True when the service answered SERVING; a probe cancelled by
            its caller (the check's own time limit) counts as no answer.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        service: str,
        unavailable: Callable[[str], Exception],
        *,
        timeout: float = 1.0,
        observer: Callable[[bool], None] | None = None,
    ) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._request = health_pb2.HealthCheckRequest(service=service)
        self._unavailable = unavailable
        self._timeout = timeout
        self._observer = observer or (lambda serving: None)

    async def __call__(self) -> None:
        try:
            try:
                response = await self._stub.Check(self._request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                detail = f"{exc.code().name}: {exc.details()}" if exc.details() else exc.code().name
                raise self._unavailable(detail) from exc
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                raise self._unavailable(f"its health check answers {status}")
        except BaseException:
            self._observer(False)
            raise
        self._observer(True)

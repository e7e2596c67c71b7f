"""Channels to the ModelForge services: where they are, message limits, and retries of idempotent calls.

A client's target comes from its ``target`` argument, else from ``MODELFORGE_<SERVICE>_ADDRESS``
(``MODELFORGE_REGISTRY_ADDRESS``, ``MODELFORGE_INFERENCE_ADDRESS``, ``MODELFORGE_JOBS_ADDRESS``), else from the
service's default port on localhost. This module is the only place in the SDK that reads the environment.

Retries follow AIP-194: only ``UNAVAILABLE``, only for RPCs that are safe to repeat, and by gRPC itself through
the channel's service config (``retryPolicy``), never by a hand-written loop.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Service",
    "INFERENCE",
    "JOBS",
    "REGISTRY",
    "channel_options",
    "open_aio_channel",
    "open_channel",
    "resolve_target",
]

MiB = 1024 * 1024
# The servers' default MODELFORGE_MAX_MESSAGE_BYTES; large tensors go through the streaming RPCs instead.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


@dataclass(frozen=True)
class Service:
    """What the SDK knows about one ModelForge service in order to reach it."""

    key: str
    """Short name: ``registry``, ``inference`` or ``jobs``; the env variable is ``MODELFORGE_<KEY>_ADDRESS``."""
    full_name: str
    """The gRPC service name, for example ``modelforge.registry.v1.RegistryService``."""
    default_port: int
    idempotent_methods: tuple[str, ...]
    """RPCs that gRPC may repeat on UNAVAILABLE: reads, and writes whose repetition changes nothing."""

    @property
    def env_var(self) -> str:
        return f"MODELFORGE_{self.key.upper()}_ADDRESS"

    @property
    def default_target(self) -> str:
        return f"127.0.0.1:{self.default_port}"


REGISTRY = Service(
    key="registry",
    full_name="modelforge.registry.v1.RegistryService",
    default_port=50051,
    idempotent_methods=(
        "GetModel",
        "ListModels",
        "UpdateModel",
        "GetModelVersion",
        "ResolveModelRef",
        "ListModelVersions",
        "UpdateModelVersion",
        "ArchiveModelVersion",
        "RestoreModelVersion",
        "SetAlias",
        "DownloadModelVersion",
    ),
)
INFERENCE = Service(
    key="inference",
    full_name="modelforge.inference.v1.InferenceService",
    default_port=50052,
    idempotent_methods=(
        "Predict",
        "PredictStream",
        "LoadModel",
        "UnloadModel",
        "ListLoadedModels",
        "GetModelStatistics",
    ),
)
JOBS = Service(
    key="jobs",
    full_name="modelforge.jobs.v1.JobService",
    default_port=50053,
    # CreateJob is repeatable because the SDK always sends a request_id.
    idempotent_methods=(
        "CreateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "GetDataset",
        "ListDatasets",
        "WatchJob",
        "GetJobResult",
    ),
)


def resolve_target(service: Service, target: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The address to dial: the explicit target, else the service's env variable, else localhost:default port."""
    if target:
        return target
    env = os.environ if environ is None else environ
    return env.get(service.env_var) or service.default_target


def _service_config(service: Service) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service.full_name, "method": m} for m in service.idempotent_methods],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


MAX_FRAME_SIZE = (1 << 24) - 1  # HTTP/2's largest SETTINGS_MAX_FRAME_SIZE


# A call's connection quiet this long is pinged, and given up on (the call ends UNAVAILABLE) when the ping goes
# unanswered for a third as long: a watch or a stream on a server whose host went away, or behind a network cut,
# ends instead of waiting for ever. ModelForge's services take pings as often as every 5 s.
KEEPALIVE_SECONDS = 30.0


def channel_options(
    service: Service,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    own_connection: bool = False,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel arguments: message limits, HTTP/2 frames as large as the protocol allows, retries through the service
    config, keepalive pings while calls are open, a TCP connection of the channel's own (`own_connection`), and
    any caller extras."""
    answer = round(keepalive_seconds / 3 * 1000)
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # The largest frame we accept: a multi-MiB output then arrives in a few frames instead of hundreds of
        # 16 KiB ones, which moves large responses about a quarter faster (docs/PERFORMANCE.md).
        ("grpc.http2.max_frame_size", MAX_FRAME_SIZE),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(service)),
        ("grpc.keepalive_time_ms", round(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", answer),
        ("grpc.http2.ping_timeout_ms", answer),  # what gRPC waits for the answer by (a minute otherwise)
        ("grpc.http2.max_pings_without_data", 0),  # a quiet watch stays watched, not only for two pings
        *([OWN_CONNECTION] if own_connection else []),
        *extra,
    ]


# gRPC shares one connection among the channels to a target with the same arguments; a channel with this one has
# a connection of its own.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def open_channel(
    service: Service,
    target: str | None,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    own_connection: bool = False,
) -> grpc.Channel:
    """A blocking-API channel to ``service`` (plaintext; put TLS in front with your own channel)."""
    options = channel_options(service, max_message_bytes=max_message_bytes, own_connection=own_connection)
    return grpc.insecure_channel(resolve_target(service, target), options=options)


def open_aio_channel(
    service: Service,
    target: str | None,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    own_connection: bool = False,
) -> grpc.aio.Channel:
    """An asyncio channel to ``service``; same options as :func:`open_channel`."""
    options = channel_options(service, max_message_bytes=max_message_bytes, own_connection=own_connection)
    return grpc.aio.insecure_channel(resolve_target(service, target), options=options)


def _connections(count: int, channel: object) -> int:
    """``count`` when a client may open that many connections, else a ValueError that says why."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"connections must be a whole number >= 1, not {count!r}")
    if count > 1 and channel is not None:
        raise ValueError("pass either connections or channel, not both: a channel of your own is one connection")
    return count


class ChannelClient:
    """What every blocking client shares: a channel, opened from a target or borrowed, closed on exit; or several
    channels to the target, each with a connection of its own (`connections`), the first being ``_channel``."""

    def __init__(
        self,
        service: Service,
        target: str | None,
        channel: grpc.Channel | None,
        max_message_bytes: int,
        connections: int = 1,
    ) -> None:
        if channel is not None and target is not None:
            raise ValueError("pass either target or channel, not both")
        count = _connections(connections, channel)
        self._owns_channel = channel is None
        self._channels = [channel] if channel is not None else [
            open_channel(service, target, max_message_bytes=max_message_bytes, own_connection=count > 1)
            for _ in range(count)
        ]  # fmt: skip
        self._channel = self._channels[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channels (unless one was passed in). Calls in flight are cancelled."""
        if self._owns_channel:
            for channel in self._channels:
                channel.close()


class AsyncChannelClient:
    """What every asyncio client shares: a grpc.aio channel, opened from a target or borrowed, closed on exit; or
    several to the target, as :class:`ChannelClient`."""

    def __init__(
        self,
        service: Service,
        target: str | None,
        channel: grpc.aio.Channel | None,
        max_message_bytes: int,
        connections: int = 1,
    ) -> None:
        if channel is not None and target is not None:
            raise ValueError("pass either target or channel, not both")
        count = _connections(connections, channel)
        if channel is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    f"create {type(self).__name__} inside the coroutine that uses it (`async with "
                    f"{type(self).__name__}() as client:`): its channel belongs to the event loop running then, and "
                    "outside one it would belong to a loop that never runs"
                ) from None
        self._owns_channel = channel is None
        self._channels = [channel] if channel is not None else [
            open_aio_channel(service, target, max_message_bytes=max_message_bytes, own_connection=count > 1)
            for _ in range(count)
        ]  # fmt: skip
        self._channel = self._channels[0]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channels (unless one was passed in). Calls in flight are cancelled."""
        if self._owns_channel:
            for channel in self._channels:
                await channel.close()

"""Channels to the ModelForge services: where they are, message limits, and retries of idempotent calls.

A client's target comes from its ``target`` argument, else from ``MODELFORGE_<SERVICE>_ADDRESS``
(``MODELFORGE_REGISTRY_ADDRESS``, ``MODELFORGE_INFERENCE_ADDRESS``, ``MODELFORGE_JOBS_ADDRESS``), else from the
service's default port on localhost. This module is the only place in the SDK that reads the environment.

Retries follow AIP-194: only ``UNAVAILABLE``, only for RPCs that are safe to repeat, and by gRPC itself through
the channel's service config (``retryPolicy``), never by a hand-written loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeAlias

import grpc
import grpc.aio

from modelforge._errors import CancelledError, translated

__all__ = [
    "CLIENT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Service",
    "INFERENCE",
    "JOBS",
    "REGISTRY",
    "call_timeout",
    "channel_options",
    "open_aio_channel",
    "open_channel",
    "resolve_target",
]

MiB = 1024 * 1024
# The servers' default MODELFORGE_MAX_MESSAGE_BYTES: the largest message they send, and so the largest a client
# receives by default; larger outputs come through the streaming RPCs instead.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


class _ClientTimeout(enum.Enum):
    """The type of :data:`CLIENT_TIMEOUT`, so that type checkers tell it from a number of seconds and None."""

    CLIENT_TIMEOUT = "the client's timeout"

    def __repr__(self) -> str:
        return "<the client's timeout>"


CLIENT_TIMEOUT: Final = _ClientTimeout.CLIENT_TIMEOUT
"""The default of a method's ``timeout=``: the timeout the client was made with."""

Timeout: TypeAlias = float | None | Literal[_ClientTimeout.CLIENT_TIMEOUT]
"""A method's ``timeout=``: seconds, None for no limit, or :data:`CLIENT_TIMEOUT`."""


def call_timeout(timeout: Timeout, client_timeout: float | None) -> float | None:
    """The deadline of one call, in seconds from now (None: no limit): ``timeout``, unless it is CLIENT_TIMEOUT."""
    return client_timeout if timeout is CLIENT_TIMEOUT else timeout


@dataclass(frozen=True)
class Service:
    """What the SDK knows about one ModelForge service in order to reach it."""

    key: str
    """Short name: ``registry``, ``inference`` or ``jobs``; the env variable is ``MODELFORGE_<KEY>_ADDRESS``."""
    full_name: str
    """The gRPC service name, for example ``modelforge.registry.v1.RegistryService``."""
    default_port: int
    idempotent_methods: tuple[str, ...]
    """Unary RPCs that gRPC may repeat on UNAVAILABLE: reads, and writes whose repetition changes nothing."""
    max_request_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """The largest request message the service receives with its default settings, and so the largest its clients
    send by default."""

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
    ),
)
INFERENCE = Service(
    key="inference",
    full_name="modelforge.inference.v1.InferenceService",
    default_port=50052,
    idempotent_methods=(
        "Predict",
        "LoadModel",
        "ListLoadedModels",
        "GetModelStatistics",
    ),
    # MODELFORGE_MAX_REQUEST_BYTES (64 MiB) of inputs, plus max(1 MiB, 1/16 of that) for the rest of the request:
    # the server receives that much so that its own check, naming the limit, refuses larger inputs.
    max_request_message_bytes=64 * MiB + max(1 * MiB, 64 * MiB // 16),
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
    ),
)


def resolve_target(service: Service, target: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The address to dial: the explicit target, else the service's env variable, else localhost:default port.

    Raises ValueError for a ``HOST:PORT`` address whose port is out of range, which gRPC would dial as another
    port (99999 as 34463) rather than refuse.
    """
    if target:
        return _checked_port(target, "address")
    env = os.environ if environ is None else environ
    if value := env.get(service.env_var):
        return _checked_port(value, service.env_var)
    return service.default_target


# A target gRPC reads as a host and a port: HOST:PORT, [IPV6]:PORT, or either after dns: or ipv4:/ipv6:.
_HOST_PORT = re.compile(r"^(?:dns:(?://[^/]*/)?|ipv[46]:)?(?:\[[^\]]*\]|[^:/\[\]]+):(\d+)$")


def _checked_port(target: str, what: str) -> str:
    match = _HOST_PORT.match(target)
    if match is not None and not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"{what} {target!r} has port {match.group(1)}: a port is a number from 1 to 65535")
    return target


# Only unary calls that can be repeated are retried, by gRPC, on UNAVAILABLE: an UnloadModel repeated after its
# answer was lost finds the version unloaded and fails. Streamed calls are not: on a connection that went quiet
# (a frozen host), gRPC retries the call its keepalive ended, and that attempt can then wait for ever. They fail
# UNAVAILABLE instead, and the SDK opens them again where it knows how to go on (Job.watch).
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
    max_message_bytes: int | None = None,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    own_connection: bool = False,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel arguments: message limits, HTTP/2 frames as large as the protocol allows, retries through the service
    config, keepalive pings while calls are open, reconnection within two seconds of a service's return, a TCP
    connection of the channel's own (`own_connection`), and any caller extras.

    `max_message_bytes` limits the messages sent and received alike; None sends up to the service's
    ``max_request_message_bytes`` and receives up to DEFAULT_MAX_MESSAGE_BYTES, what the servers receive and send with
    their default settings.
    """
    answer = round(keepalive_seconds / 3 * 1000)
    send = service.max_request_message_bytes if max_message_bytes is None else max_message_bytes
    receive = DEFAULT_MAX_MESSAGE_BYTES if max_message_bytes is None else max_message_bytes
    return [
        ("grpc.max_send_message_length", send),
        ("grpc.max_receive_message_length", receive),
        # The largest frame we accept: a multi-MiB output then arrives in a few frames instead of hundreds of
        # 16 KiB ones, which moves large responses about a quarter faster (docs/PERFORMANCE.md).
        ("grpc.http2.max_frame_size", MAX_FRAME_SIZE),
        ("grpc.enable_retries", 1),
        # A request up to the largest the channel sends is kept for a retry (gRPC's default keeps 256 KiB: a larger
        # Predict or CreateJob whose connection broke was not retried).
        ("grpc.per_rpc_retry_buffer_size", send),
        ("grpc.service_config", _service_config(service)),
        ("grpc.keepalive_time_ms", round(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", answer),
        ("grpc.http2.ping_timeout_ms", answer),  # what gRPC waits for the answer by (a minute otherwise)
        ("grpc.http2.max_pings_without_data", 0),  # a quiet watch stays watched, not only for two pings
        # A service back from a restart is reached within two seconds: gRPC's own backoff between attempts to
        # connect grows to two minutes while calls keep failing, and a call meanwhile fails UNAVAILABLE at once.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
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
    max_message_bytes: int | None = None,
    own_connection: bool = False,
) -> grpc.Channel:
    """A blocking-API channel to ``service`` (plaintext; put TLS in front with your own channel)."""
    options = channel_options(service, max_message_bytes=max_message_bytes, own_connection=own_connection)
    return grpc.insecure_channel(resolve_target(service, target), options=options)


def open_aio_channel(
    service: Service,
    target: str | None,
    *,
    max_message_bytes: int | None = None,
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
        max_message_bytes: int | None,
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
        max_message_bytes: int | None,
        connections: int = 1,
    ) -> None:
        if channel is not None and target is not None:
            raise ValueError("pass either target or channel, not both")
        count = _connections(connections, channel)
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop the client's calls must run on: the one it was made on; None for a channel passed in
        outside a loop, whose owner answers for it."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            if channel is None:
                raise RuntimeError(
                    f"create {type(self).__name__} inside the coroutine that uses it (`async with "
                    f"{type(self).__name__}() as client:`): its channel belongs to the event loop running then, and "
                    "outside one it would belong to a loop that never runs"
                ) from None
        self._closed = False
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
        """Closes the channels (unless one was passed in). Calls in flight end with :class:`CancelledError`."""
        self._closed = True
        if self._owns_channel:
            for channel in self._channels:
                await channel.close()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """:func:`translated`, for the calls of this client: refused on an event loop other than the client's, and
        ended with the SDK's CancelledError, not asyncio's, when the client closes under them.

        grpc.aio cancels a closed channel's calls by cancelling their futures, which raises asyncio.CancelledError
        in the caller's task although nobody cancelled the task. A task that was cancelled itself
        (``task.cancel()``, ``asyncio.wait_for`` running out) has a nonzero ``cancelling()`` count, and then
        asyncio's CancelledError goes on unchanged.
        """
        self._check_loop()
        try:
            with translated():
                yield
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._closed and task is not None and task.cancelling() == 0:
                raise CancelledError(_CLOSED_IN_FLIGHT, code=grpc.StatusCode.CANCELLED) from exc
            raise

    def _check_loop(self) -> None:
        running = asyncio.get_running_loop()
        if self._loop is None or running is self._loop:
            return
        name = type(self).__name__
        ended = ", which has closed" if self._loop.is_closed() else ""
        raise RuntimeError(
            f"this {name} was created on another event loop{ended}, and its channel belongs to that loop: create "
            f"the client inside the coroutine that uses it (`async with {name}() as client:`), one for each event "
            "loop (each asyncio.run() starts a new one)"
        )


_CLOSED_IN_FLIGHT = (
    "the client was closed while this call was in flight, so the call was cancelled: close the client (or leave "
    "its `async with` block) once its calls have finished, or make a new client for the call"
)

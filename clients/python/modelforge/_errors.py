"""The SDK's exceptions, and the one place where gRPC failures become them.

Every failed call raises a subclass of :class:`ModelForgeError`, chosen by the call's
gRPC status code, and raised ``from`` the original ``grpc.RpcError``::

    ModelForgeError                 any failed call; .code, .reason, .details, .metadata
    ├── InvalidArgumentError        INVALID_ARGUMENT, OUT_OF_RANGE: fix the request
    ├── NotFoundError               NOT_FOUND: no such model, version, alias or job
    ├── AlreadyExistsError          ALREADY_EXISTS: the thing to create exists
    ├── FailedPreconditionError     FAILED_PRECONDITION: not allowed in the current state
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED: a size limit, quota or queue is full
    ├── DeadlineExceededError       DEADLINE_EXCEEDED: the deadline passed first
    ├── UnavailableError            UNAVAILABLE: the service is down or unreachable; retry later
    ├── AbortedError                ABORTED: a concurrent change got in the way; retry
    ├── CancelledError              CANCELLED: the call was cancelled
    │   └── ClientClosedError       raised by the SDK itself for a call on a closed client
    ├── PermissionDeniedError       PERMISSION_DENIED
    ├── UnauthenticatedError        UNAUTHENTICATED
    ├── InternalError               INTERNAL: a server bug; the server log has more
    ├── UnimplementedError          UNIMPLEMENTED: the server does not offer that call
    └── IntegrityError              DATA_LOSS, or raised by the SDK itself when bytes received do not
                                    match their announced size or sha256

UNKNOWN (and any code not listed) raises ModelForgeError itself. Errors the SDK raises
without a call (IntegrityError) carry their class's code and no reason.

ModelForge servers attach a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer: its ``ErrorInfo`` gives a stable ``reason`` (``MODEL_NOT_FOUND``), a ``domain``
(``modelforge.registry``) and ``metadata`` (``{"model": "fraud"}``), and a ``BadRequest``
names the request fields at fault. Branch on ``reason``, never on the message text.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "ClientClosedError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "IntegrityError",
    "InvalidArgumentError",
    "ModelForgeError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "ANSWER_TOO_LARGE_HINT",
    "REQUEST_TOO_LARGE_HINT",
    "UNREACHABLE_HINT",
    "atranslated",
    "error_from_rpc",
    "translated",
    "with_details",
]


class ModelForgeError(Exception):
    """A call to a ModelForge service failed.

    Attributes:
        code: The gRPC status code (the class's ``default_code`` for errors raised without a call).
        details: The server's message: what was wrong and how to fix it (also ``str(error)``).
        reason: A stable UPPER_SNAKE identifier such as ``"MODEL_NOT_FOUND"``, or ``""`` when the
            server sent none (for example when the connection failed before reaching it).
        domain: Which service gave the reason (``"modelforge.registry"``), or ``""``.
        metadata: Facts about the failure (``{"model": "fraud"}``); empty when none.
        field_violations: Request field -> what is wrong with it, from ``google.rpc.BadRequest``.
        status: The whole ``google.rpc.Status`` the server attached, or None.
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(details)
        self.code = code if code is not None else self.default_code
        self.details = details
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: dict[str, str] = dict(field_violations or {})
        self.status = status

    def __str__(self) -> str:
        return self.details

    def __repr__(self) -> str:
        reason = f", reason={self.reason!r}" if self.reason else ""
        return f"{type(self).__name__}({self.details!r}, code={self.code.name}{reason})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments need help to survive pickling (for worker processes).
        return (_rebuild, (type(self), self.details, self.code.name, self.__dict__.copy()))


def _rebuild(cls: type[ModelForgeError], details: str, code: str, state: dict[str, Any]) -> ModelForgeError:
    error = cls(details, code=grpc.StatusCode[code])
    error.__dict__.update(state)
    return error


class InvalidArgumentError(ModelForgeError):
    """The request is malformed (a bad name, a wrong tensor shape ...); retrying it unchanged fails again."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ModelForgeError):
    """The named model, version, alias or job does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ModelForgeError):
    """The thing to create exists already."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ModelForgeError):
    """The system is not in a state that allows the request (e.g. deleting a version an alias points at)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ModelForgeError):
    """A size limit, quota or queue is full."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ModelForgeError):
    """The deadline passed before the work was done."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(ModelForgeError):
    """The service is down or unreachable; retrying later may succeed."""

    default_code = grpc.StatusCode.UNAVAILABLE


class AbortedError(ModelForgeError):
    """A concurrent change got in the way; retrying the whole operation may succeed."""

    default_code = grpc.StatusCode.ABORTED


class CancelledError(ModelForgeError):
    """The call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class ClientClosedError(CancelledError):
    """The client (or the channel passed to it) was closed before this call; no call was made.

    Calls in flight when a client closes end with :class:`CancelledError` instead. Make a new client, or keep the
    call inside the client's ``with`` block.
    """


_CLOSED_CLIENT = (
    "this client is closed (close() was called or its `with` block ended), so the call was not made: "
    "make a new client, or call it inside the client's `with` block"
)
# What grpc raises for a call on a closed channel, blocking and asyncio; neither is an RpcError.
_CLOSED_CHANNEL_MESSAGES = (
    "Cannot invoke RPC on closed channel",
    "Cannot invoke RPC: Channel closed",
    "Channel is closed",
)


class PermissionDeniedError(ModelForgeError):
    """The caller may not do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ModelForgeError):
    """The call carried no valid credentials."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(ModelForgeError):
    """The server failed unexpectedly; its log has the details."""

    default_code = grpc.StatusCode.INTERNAL


class UnimplementedError(ModelForgeError):
    """The server does not implement this call (an older server, or the wrong port)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class IntegrityError(ModelForgeError):
    """Data arrived corrupt or incomplete: a size or sha256 that does not match, or a stream out of order.

    The SDK raises it itself (with code DATA_LOSS) and keeps nothing it received; retrying usually helps.
    """

    default_code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[ModelForgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


# gRPC's own refusals of a message over a channel's or a server's size limit carry no ErrorInfo; the SDK adds
# what to do about them to the message.
_REQUEST_TOO_LARGE = ("CLIENT: Sent message larger than max", "SERVER: Received message larger than max")
_ANSWER_TOO_LARGE = "CLIENT: Received message larger than max"


REQUEST_TOO_LARGE_HINT = (
    "; the request is larger than one message may be: send fewer items per request, or raise the limit "
    "(max_message_bytes= of the client, MODELFORGE_MAX_REQUEST_BYTES of the server)"
)
ANSWER_TOO_LARGE_HINT = (
    "; the answer is larger than this client's max_message_bytes: receive large outputs with "
    "predict_stream (its chunks take MODELFORGE_CHUNK_BYTES of the server, 1 MiB by default), ask for "
    "fewer outputs or items, or raise max_message_bytes"
)
"""What the SDK adds to those refusals' messages; the ``modelforge`` command replaces them with its own advice."""

_OWN_DEADLINE = "Deadline Exceeded"  # gRPC's message when the caller's own deadline passes; the services' say more
DEADLINE_HINT = (
    ": the call did not finish within its timeout; give it longer with timeout= on the call or the client "
    "(None for no limit)"
)


# gRPC's own UNAVAILABLE messages for a service it did not reach: nothing listening, or a name that did not resolve.
_NOT_REACHED = ("failed to connect to all addresses", "errors resolving ")
UNREACHABLE_HINT = (
    "; is the suite running (`modelforge up` starts it), and is the address right (the client's target, else "
    "MODELFORGE_REGISTRY_ADDRESS, MODELFORGE_INFERENCE_ADDRESS or MODELFORGE_JOBS_ADDRESS)?"
)
"""What the SDK adds to gRPC's message when it did not reach the service at all."""


def _size_limit_hint(details: str) -> str:
    if any(message in details for message in _REQUEST_TOO_LARGE):
        return REQUEST_TOO_LARGE_HINT
    if _ANSWER_TOO_LARGE in details:
        return ANSWER_TOO_LARGE_HINT
    return ""


Error = TypeVar("Error", bound=ModelForgeError)


def with_details(error: Error, details: str) -> Error:
    """A copy of ``error`` with another message: the same class, code, reason and metadata, so that callers still
    catch it by kind. Raise it ``from error``."""
    changed = copy.copy(error)  # through __reduce__: every field, and no traceback or cause
    changed.details = details
    changed.args = (details,)
    return changed


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    try:
        return rpc_status.from_call(error)
    except (ValueError, DecodeError, AttributeError, TypeError):
        # A trailer that does not match the call's status, does not parse, or an error that is no Call.
        return None


def error_from_rpc(error: grpc.RpcError) -> ModelForgeError:
    """Builds the ModelForgeError for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``).

    The caller raises it ``from`` the RpcError; :func:`translated` does both.
    """
    code_method = getattr(error, "code", None)
    details_method = getattr(error, "details", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = (details_method() if callable(details_method) else None) or str(error) or code.name
    status = _rich_status(error)
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update((v.field, v.description) for v in bad.field_violations)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not reason:
        details += _size_limit_hint(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not reason and details == _OWN_DEADLINE:
        details += DEADLINE_HINT
    if code == grpc.StatusCode.UNAVAILABLE and not reason and details.startswith(_NOT_REACHED):
        details += UNREACHABLE_HINT
    kind = _BY_CODE.get(code, ModelForgeError)
    return kind(
        details,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        status=status,
    )


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Turns a ``grpc.RpcError`` raised inside the block into the matching ModelForgeError.

    Works for sync calls and, inside ``async def``, for awaited aio calls and ``async for``
    over aio streams. Other exceptions pass through unchanged.

    Raises:
        ModelForgeError: a subclass chosen by the status code, raised from the RpcError.
        ClientClosedError: the call was made on a closed channel.
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc
    except (ValueError, grpc.aio.UsageError) as exc:
        if any(message in str(exc) for message in _CLOSED_CHANNEL_MESSAGES):
            raise ClientClosedError(_CLOSED_CLIENT) from exc
        raise


@contextlib.asynccontextmanager
async def atranslated() -> AsyncIterator[None]:
    """``async with`` form of :func:`translated`, for code that prefers it; the behaviour is the same."""
    with translated():
        yield


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turns an OSError raised inside the block into the same kind about ``path``: the file the caller named, not a
    temporary one the SDK writes beside it."""
    try:
        yield
    except OSError as exc:
        # OSError(errno, ...) builds the same subclass (PermissionError...), about the path the caller gave.
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc

"""The one mapping from error kinds to gRPC status codes, applied to every RPC by :mod:`modelforge_server.handlers`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn, Protocol

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from modelforge_server import errors

log = logging.getLogger("modelforge.status")

_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: its kind's code, INTERNAL for anything unexpected."""
    return next((_CODES[k] for k in type(exc).__mro__ if k in _CODES), grpc.StatusCode.INTERNAL)


# A client takes only so much metadata with a status (gRPC's default: 8 KiB), and a message goes out three times
# (grpc-message, the Status's message, a BadRequest's description). One that quotes what a request sent, a name of
# thousands of characters, would exceed it, and the client would see RESOURCE_EXHAUSTED about metadata instead of
# the error. Messages and metadata values are cut to these sizes, counted as grpc-message carries them.
MAX_MESSAGE_WIRE_BYTES = 1024
MAX_METADATA_WIRE_BYTES = 256
_ELLIPSIS = "…"


def wire_size(text: str) -> int:
    """The bytes `text` takes in grpc-message, which percent-encodes every UTF-8 byte of a character other than
    printable ASCII: an "é" takes 6 bytes, an emoji 12."""
    return sum(1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode("utf-8", "surrogatepass")) for c in text)


def bounded(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` bytes as grpc-message carries it (see :func:`wire_size`); an ellipsis marks a
    cut. Its UTF-8 in the status details then takes at most as much."""
    if len(text) * 12 <= limit or wire_size(text) <= limit:  # no character takes more than 12 bytes
        return text
    room, end = limit - wire_size(_ELLIPSIS), 0
    for end, character in enumerate(text):  # noqa: B007 (end is the cut once the loop stops)
        room -= wire_size(character)
        if room < 0:
            break
    return text[:end] + _ELLIPSIS


def status_for(exc: errors.ServiceError, domain: str) -> status_pb2.Status:
    """A google.rpc.Status carrying ErrorInfo(reason, domain, metadata) and, for a field error, BadRequest."""
    code = code_for(exc)
    message = bounded(str(exc), MAX_MESSAGE_WIRE_BYTES)
    metadata = {key: bounded(value, MAX_METADATA_WIRE_BYTES) for key, value in exc.metadata.items()}
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=domain, metadata=metadata))
    details = [info]
    if exc.field:
        bad = any_pb2.Any()
        field = bounded(exc.field, MAX_METADATA_WIRE_BYTES)  # it may hold a name the request gave: inputs[<name>]
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        bad.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(bad)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


class AbortingContext(Protocol):
    """What `abort` needs of a grpc.aio.ServicerContext: its ``abort`` ends the call by raising, never returning."""

    async def abort(
        self, code: grpc.StatusCode, details: str = ..., trailing_metadata: Sequence[tuple[str, str | bytes]] = ...
    ) -> NoReturn: ...


async def abort(context: AbortingContext, exc: BaseException, domain: str, rpc: str) -> NoReturn:
    """Ends a call of method `rpc` (``/package.Service/Method``) with the status that `exc` maps to."""
    if isinstance(exc, NotImplementedError):
        # The generated servicer base classes raise it for RPCs a service does not implement.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented by this server")
    if not isinstance(exc, errors.ServiceError):
        log.error("unexpected error in %s", rpc, extra={"rpc": rpc}, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; details are in the server log")
    status = status_for(exc, domain)
    await context.abort(code_for(exc), status.message, ((STATUS_DETAILS_KEY, status.SerializeToString()),))

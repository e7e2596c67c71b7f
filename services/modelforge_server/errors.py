"""Kinds of expected failure. status.py maps each kind to one gRPC status code.

Services subclass a kind with a specific error that builds its own message and sets a stable `reason`:

    ServiceError
    ├── InvalidArgument      the request is malformed; retrying it unchanged fails again
    ├── NotFound             the named thing does not exist
    ├── AlreadyExists        the thing to create exists already
    ├── FailedPrecondition   the system is not in a state that allows the request
    ├── ResourceExhausted    a quota, size limit or queue is full
    ├── DeadlineExceeded     the deadline passed before the work was done
    ├── Unavailable          a dependency is down; retrying later may succeed
    ├── Aborted              a concurrent change got in the way; retry the whole operation
    ├── Cancelled            the caller went away
    ├── DataLoss             stored data is gone or damaged; an operator must restore it
    └── Unimplemented        the server does not do what the method asks (a method of a foreign protocol)
"""

from __future__ import annotations

import re


class ServiceError(Exception):
    """Base of every expected failure; carries a stable reason and metadata for clients."""

    reason = "UNSPECIFIED"  # stable UPPER_SNAKE identifier (AIP-193 ErrorInfo.reason)

    def __init__(self, message: str, *, field: str | None = None, **metadata: str) -> None:
        super().__init__(message)
        self.field = field  # the request field at fault, reported as a BadRequest.FieldViolation
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidArgument(ServiceError):
    """The request is malformed; retrying it unchanged will fail."""

    reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """The named thing does not exist."""

    reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The thing to create exists already."""

    reason = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """The system is not in a state that allows the request."""

    reason = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    """A quota, size limit or queue is full."""

    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServiceError):
    """The deadline passed before the work was done."""

    reason = "DEADLINE_EXCEEDED"


class Unavailable(ServiceError):
    """A dependency is down; retrying later may succeed."""

    reason = "UNAVAILABLE"


class Aborted(ServiceError):
    """A concurrent change got in the way; retrying the whole operation may succeed."""

    reason = "ABORTED"


class Cancelled(ServiceError):
    """The caller cancelled the request."""

    reason = "CANCELLED"


class DataLoss(ServiceError):
    """Data the service stored is gone or damaged; retrying does not help until it is restored."""

    reason = "DATA_LOSS"


class Unimplemented(ServiceError):
    """The server does not do what the method asks: a method of a protocol it speaks only in part."""

    reason = "UNIMPLEMENTED"


# Streamed uploads (registry model files, jobs datasets): a header with the file's sha256 and size, then chunks.


class UploadOutOfOrder(InvalidArgument):
    reason = "UPLOAD_OUT_OF_ORDER"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="header")


class InvalidChecksum(InvalidArgument):
    reason = "INVALID_CHECKSUM"

    def __init__(self, value: str) -> None:
        super().__init__(f"header.sha256 must be 64 lowercase hex characters, got {value!r}", field="header.sha256")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def checked_sha256(value: str) -> str:
    """Returns an upload header's sha256, or raises InvalidChecksum unless it is 64 lowercase hex characters (as
    hashlib's hexdigest writes it, and as the stores key content by)."""
    if not _SHA256.fullmatch(value):
        raise InvalidChecksum(value)
    return value


class SizeMismatch(InvalidArgument):
    reason = "SIZE_MISMATCH"

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(
            f"the header announced {expected} bytes but {received} arrived; the upload was truncated or the "
            "header is wrong",
            field="header.size_bytes",
            expected=str(expected),
            received=str(received),
        )


class ChecksumMismatch(InvalidArgument):
    reason = "CHECKSUM_MISMATCH"

    def __init__(self, expected: str, received: str) -> None:
        super().__init__(
            f"the bytes received have sha256 {received}, not {expected} as announced; the file was corrupted "
            "in transit or the header is wrong",
            field="header.sha256",
            expected=expected,
            received=received,
        )


def require(value: str, field: str) -> str:
    """Returns value, or raises InvalidArgument naming the empty required field."""
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    return value

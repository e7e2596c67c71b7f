"""Duration fields of requests (google.protobuf.Duration), checked as protobuf defines them before any use."""

from __future__ import annotations

from google.protobuf import duration_pb2

from modelforge_server.errors import InvalidArgument

__all__ = ["MAX_SECONDS", "seconds"]

MAX_SECONDS = 315_576_000_000  # about 10,000 years: protobuf's bound on Duration.seconds


def seconds(duration: duration_pb2.Duration, field: str) -> float:
    """The duration in seconds.

    Raises:
        InvalidArgument: naming `field`, for a Duration that breaks protobuf's rules (seconds beyond ±MAX_SECONDS,
            nanos of a second or more, seconds and nanos of opposite signs), which converts to nothing sensible or
            fails in the protobuf library, or for a negative one.
    """
    whole, nanos = duration.seconds, duration.nanos
    if abs(whole) > MAX_SECONDS or abs(nanos) > 999_999_999 or whole > 0 > nanos or whole < 0 < nanos:
        raise InvalidArgument(
            f"{field} is not a valid Duration (seconds {whole}, nanos {nanos}): seconds lie within "
            f"±{MAX_SECONDS:,}, nanos within ±999,999,999, and the two have the same sign",
            field=field,
        )
    total = whole + nanos / 1e9
    if total < 0:
        raise InvalidArgument(f"{field} must not be negative, got {total} s", field=field)
    return total

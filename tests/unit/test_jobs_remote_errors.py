"""How the jobs service classes the failures of its calls to inference and the registry."""

from __future__ import annotations

import grpc
import pytest

from modelforge_jobs import errors
from modelforge_jobs.inference_client import translate


def rpc_error(code: grpc.StatusCode, details: str = "boom") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,  # the inference server stopped mid-call
        grpc.StatusCode.ABORTED,
    ],
)
def test_transient_failures_are_retried(code: grpc.StatusCode) -> None:
    assert errors.is_transient(translate(rpc_error(code), "inference service"))


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
    ],
)
def test_permanent_failures_fail_the_job_at_once(code: grpc.StatusCode) -> None:
    assert not errors.is_transient(translate(rpc_error(code), "inference service"))


@pytest.mark.parametrize(
    "details",
    [
        "CLIENT: Sent message larger than max (153600036 vs. 67108864)",  # the worker's own limit
        "SERVER: Received message larger than max (153600036 vs. 67108864)",  # the inference service's
    ],
)
def test_a_batch_too_large_for_one_request_fails_the_job_at_once(details: str) -> None:
    """The same batch is too large on every attempt: RESOURCE_EXHAUSTED, but no passing shortage."""
    error = translate(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, details), "inference service")
    assert isinstance(error, errors.BatchRequestTooLarge)
    assert error.reason == "REQUEST_TOO_LARGE" and "smaller batch_size" in str(error)
    assert not errors.is_transient(error)

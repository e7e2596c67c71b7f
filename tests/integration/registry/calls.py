"""Small helpers for the registry tests: failed calls' status and reason, requests by name."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from modelforge.registry.v1 import registry_pb2 as pb


async def failure(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    """Awaits a call that must fail; returns its status code, ErrorInfo reason and details."""
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), _reason(exc), exc.details() or ""
    raise AssertionError(f"the call succeeded but was expected to fail: {result!r}")


def _reason(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def ref(name: str, *, version: int | None = None, alias: str | None = None) -> pb.ResolveModelRefRequest:
    if version is not None:
        return pb.ResolveModelRefRequest(ref=pb.ModelRef(name=name, version=version))
    if alias is not None:
        return pb.ResolveModelRefRequest(ref=pb.ModelRef(name=name, alias=alias))
    return pb.ResolveModelRefRequest(ref=pb.ModelRef(name=name))

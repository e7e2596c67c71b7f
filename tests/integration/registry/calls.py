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
        return exc.code(), reason_of(exc), exc.details() or ""
    raise AssertionError(f"the call succeeded but was expected to fail: {result!r}")


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in a failed call's google.rpc.Status; "" when there is none."""
    for detail in _details(exc):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def violated_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    """The request fields named by the BadRequest detail of a failed call's google.rpc.Status."""
    fields: list[str] = []
    for detail in _details(exc):
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [violation.field for violation in bad.field_violations]
    return fields


def _details(exc: grpc.aio.AioRpcError) -> list[Any]:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return list(status_pb2.Status.FromString(value).details)
    return []


def ref(name: str, *, version: int | None = None, alias: str | None = None) -> pb.ResolveModelRefRequest:
    if version is not None:
        return pb.ResolveModelRefRequest(ref=pb.ModelRef(name=name, version=version))
    if alias is not None:
        return pb.ResolveModelRefRequest(ref=pb.ModelRef(name=name, alias=alias))
    return pb.ResolveModelRefRequest(ref=pb.ModelRef(name=name))

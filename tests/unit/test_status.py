from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from modelforge_server import errors, status


class WidgetNotFound(errors.NotFound):
    reason = "WIDGET_NOT_FOUND"


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (WidgetNotFound, grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.Aborted, grpc.StatusCode.ABORTED),
        (errors.Cancelled, grpc.StatusCode.CANCELLED),
        (RuntimeError, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_kind_maps_to_one_code(kind: type[Exception], code: grpc.StatusCode) -> None:
    assert status.code_for(kind("x")) is code


def test_status_carries_reason_metadata_and_field_violation() -> None:
    exc = WidgetNotFound("no widget 'w'", field="name", widget="w")
    proto = status.status_for(exc, "modelforge.test")
    assert proto.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert proto.message == "no widget 'w'"
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("WIDGET_NOT_FOUND", "modelforge.test", {"widget": "w"})
    bad = error_details_pb2.BadRequest()
    assert proto.details[1].Unpack(bad)
    assert bad.field_violations[0].field == "name"


def test_a_message_quoting_a_huge_name_is_cut_to_fit_a_clients_metadata_limit() -> None:
    name = "w" * 10_000
    exc = WidgetNotFound(f"no widget {name!r}", field=f"widgets[{name}]", widget=name)
    proto = status.status_for(exc, "modelforge.test")
    limit = status.MAX_MESSAGE_WIRE_BYTES
    assert limit - 12 < status.wire_size(proto.message) <= limit and proto.message.startswith("no widget 'www")
    assert proto.message.endswith("…")
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert proto.details[0].Unpack(info) and proto.details[1].Unpack(bad)
    assert status.wire_size(info.metadata["widget"]) <= status.MAX_METADATA_WIRE_BYTES
    (violation,) = bad.field_violations
    assert status.wire_size(violation.field) <= status.MAX_METADATA_WIRE_BYTES
    assert violation.description == proto.message
    assert len(proto.SerializeToString()) + 3 * len(proto.message) < 8 * 1024  # with grpc-message, UTF-8 encoded
    emoji = status.status_for(WidgetNotFound("no widget " + "😀" * 1000, widget="😀" * 100), "modelforge.test")
    assert status.wire_size(emoji.message) <= limit  # 12 bytes each in grpc-message: 85 of them
    assert len(emoji.SerializeToString()) + status.wire_size(emoji.message) < 8 * 1024
    short = WidgetNotFound("no widget 'w'", widget="w")
    assert status.status_for(short, "modelforge.test").message == "no widget 'w'"  # short ones stay whole


def test_require_names_the_missing_field() -> None:
    assert errors.require("x", "name") == "x"
    with pytest.raises(errors.InvalidArgument, match="name is required") as caught:
        errors.require("", "name")
    assert caught.value.field == "name"

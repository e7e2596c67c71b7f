"""Text the registry cannot store: a NUL character in any string of a request, or in what a model file carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from modelforge.registry.v1 import registry_pb2 as pb
from tests.fixtures.onnx_models import build_add_one, model_bytes
from tests.fixtures.servers import _aiter, upload_model, upload_requests
from tests.integration.registry.calls import failure, violated_fields

NUL = "a\0b"
ONE = model_bytes(build_add_one())

# Each call with a NUL somewhere in its request, and the field the refusal must name.
CALLS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "CreateModel description": (
        lambda stub: stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="m", description=NUL))),
        "model.description",
    ),
    "CreateModel label value": (
        lambda stub: stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="m", labels={"team": NUL}))),
        "model.labels['team']",
    ),
    "CreateModel label key": (
        lambda stub: stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="m", labels={NUL: "x"}))),
        "model.labels['a\\x00b']",
    ),
    "GetModel name": (lambda stub: stub.GetModel(pb.GetModelRequest(name="m\0")), "name"),
    "ListModels prefix": (lambda stub: stub.ListModels(pb.ListModelsRequest(name_prefix=NUL)), "name_prefix"),
    "UpdateModel description": (
        lambda stub: stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name="m", description=NUL), update_mask=field_mask_pb2.FieldMask(paths=["description"])
            )
        ),
        "model.description",
    ),
    "UpdateModelVersion version_label": (
        lambda stub: stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(model="m", version=1, version_label=NUL),
                update_mask=field_mask_pb2.FieldMask(paths=["version_label"]),
            )
        ),
        "model_version.version_label",
    ),
    "DeleteAlias alias": (lambda stub: stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias=NUL)), "alias"),
    "ResolveModelRef alias": (
        lambda stub: stub.ResolveModelRef(pb.ResolveModelRefRequest(ref=pb.ModelRef(name="m", alias=NUL))),
        "ref.alias",
    ),
    "upload header": (
        lambda stub: stub.UploadModelVersion(_aiter(upload_requests("m", ONE, description=NUL))),
        "header.description",
    ),
}


@pytest.mark.parametrize("call", CALLS, ids=str)
async def test_a_nul_in_any_string_is_invalid_argument_naming_the_field(registry_stub, call: str) -> None:
    await upload_model(registry_stub, "m", ONE)
    make, field = CALLS[call]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await make(registry_stub)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NUL character" in (caught.value.details() or "")
    assert violated_fields(caught.value) == [field]
    model = (await registry_stub.GetModel(pb.GetModelRequest(name="m"))).model
    assert (model.description, dict(model.labels), model.latest_version) == ("", {}, 1)


@pytest.mark.parametrize(
    ("where", "edit"),
    [
        ("doc_string", lambda model: setattr(model, "doc_string", NUL)),
        ("metadata_props['source']", lambda model: model.metadata_props.add(key="source", value=NUL)),
        ("producer_name", lambda model: setattr(model, "producer_name", NUL)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_a_model_file_carrying_a_nul_is_refused_and_nothing_is_stored(
    registry_stub, where: str, edit: Callable[[Any], None]
) -> None:
    model = build_add_one()
    edit(model)
    code, reason, details = await failure(upload_model(registry_stub, "carrier", model_bytes(model)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ONNX")
    assert f"its {where} contains a NUL character" in details
    assert (await registry_stub.ListModels(pb.ListModelsRequest())).models == []

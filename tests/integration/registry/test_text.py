"""Text the registry refuses: a NUL character in any string of a request or a model file, text over its limits; and
listings of large items, whose pages are cut to fit one answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from modelforge.registry.v1 import registry_pb2 as pb
from modelforge_registry.domain import DESCRIPTION_MAX, ONNX_TEXT_MAX, VERSION_LABEL_MAX
from modelforge_server.labels import LABELS_MAX
from tests.fixtures.onnx_models import build_add_one, model_bytes
from tests.fixtures.servers import _aiter, registry_settings_for, running_registry, upload_model, upload_requests
from tests.integration.registry.calls import failure, violated_fields

NUL = "a\0b"
KiB, MiB = 1024, 1024 * 1024
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


async def test_descriptions_version_labels_and_label_counts_have_limits(registry_stub) -> None:
    await upload_model(registry_stub, "m", ONE)
    at_most = "d" * DESCRIPTION_MAX
    created = await registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="n", description=at_most)))
    assert created.model.description == at_most
    labels = {f"k{i}": "v" for i in range(LABELS_MAX + 1)}
    too_long = "v" * (VERSION_LABEL_MAX + 1)
    refused = {
        "model.description": registry_stub.CreateModel(
            pb.CreateModelRequest(model=pb.Model(name="o", description=at_most + "d"))
        ),
        "model.labels": registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="o", labels=labels))),
        "model_version.version_label": registry_stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(model="m", version=1, version_label=too_long),
                update_mask=field_mask_pb2.FieldMask(paths=["version_label"]),
            )
        ),
        "model_version.description": registry_stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(model="m", version=1, description=at_most + "d"),
                update_mask=field_mask_pb2.FieldMask(paths=["*"]),
            )
        ),
        "header.version_label": upload_model(registry_stub, "m", ONE, version_label=too_long),
        "header.labels": upload_model(registry_stub, "m", ONE, labels=labels),
    }
    for field, call in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violated_fields(caught.value) == [field]
        assert "at most" in (caught.value.details() or "")
    names = [m.name for m in (await registry_stub.ListModels(pb.ListModelsRequest())).models]
    assert names == ["m", "n"]
    version = (await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version=1))).model_version
    assert (version.description, version.version_label, dict(version.labels)) == ("", "", {})
    assert (await registry_stub.GetModel(pb.GetModelRequest(name="m"))).model.latest_version == 1


async def test_a_model_file_with_more_text_than_a_version_keeps_is_refused(clean_db, tmp_path) -> None:
    settings = registry_settings_for(clean_db, tmp_path / "registry", max_model_bytes=16 * MiB)
    model = build_add_one()
    model.metadata_props.add(key="vocabulary", value="w" * ONNX_TEXT_MAX)
    async with running_registry(settings) as registry:
        code, reason, details = await failure(upload_model(registry.stub, "wordy", model_bytes(model)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ONNX")
        assert f"more than the {ONNX_TEXT_MAX} a version keeps" in details
        assert (await registry.stub.ListModels(pb.ListModelsRequest())).models == []


async def test_pages_of_large_items_are_cut_to_fit_one_answer_and_page_on_from_there(clean_db, tmp_path) -> None:
    limit = 256 * KiB
    settings = registry_settings_for(clean_db, tmp_path / "registry", max_message_bytes=limit)
    async with running_registry(settings) as registry:
        stub = registry.stub
        names = [f"model-{i:02d}" for i in range(30)]
        for name in names:
            await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=name, description="d" * DESCRIPTION_MAX)))
        model = build_add_one()
        for seed in range(6):
            model.doc_string = str(seed) * 100_000
            await upload_model(stub, "wordy", model_bytes(model))

        async def every(call, request, field: str) -> tuple[list[Any], int]:
            seen, pages = [], 0
            while True:
                page = await call(request)
                assert page.ByteSize() <= limit
                seen += list(getattr(page, field))
                pages += 1
                request.page_token = page.next_page_token
                if not request.page_token:
                    return seen, pages

        models, pages = await every(stub.ListModels, pb.ListModelsRequest(page_size=500), "models")
        assert [m.name for m in models] == [*names, "wordy"]
        assert pages > 2
        versions, pages = await every(
            stub.ListModelVersions, pb.ListModelVersionsRequest(model="wordy", page_size=500), "model_versions"
        )
        assert [v.version for v in versions] == [6, 5, 4, 3, 2, 1]
        assert pages > 2


async def test_a_label_filter_no_label_can_match_is_invalid_argument(registry_stub) -> None:
    for labels in ({"": "v"}, {"bad key!": "v"}, {f"k{i}": "v" for i in range(LABELS_MAX + 1)}):
        code, _, _ = await failure(registry_stub.ListModels(pb.ListModelsRequest(labels=labels)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, list(labels)[:2]
    assert (await registry_stub.ListModels(pb.ListModelsRequest(labels={"team": "x"}))).models == []

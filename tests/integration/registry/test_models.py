"""CreateModel, GetModel, ListModels, UpdateModel and DeleteModel over gRPC and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from modelforge.registry.v1 import registry_pb2 as pb
from modelforge_server import paging
from tests.fixtures.servers import upload_model
from tests.integration.registry.calls import failure


async def create(stub, name: str, **fields) -> pb.Model:
    response = await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=name, **fields)))
    return response.model


async def test_create_then_get_returns_the_model(registry_stub) -> None:
    created = await create(registry_stub, "resnet", description="image classifier", labels={"team": "vision"})
    got = (await registry_stub.GetModel(pb.GetModelRequest(name="resnet"))).model
    assert got == created
    assert got.description == "image classifier"
    assert dict(got.labels) == {"team": "vision"}
    assert got.latest_version == 0
    assert got.create_time.seconds > 0 and got.update_time == got.create_time


async def test_get_unknown_model_is_not_found(registry_stub) -> None:
    code, reason, details = await failure(registry_stub.GetModel(pb.GetModelRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reason == "MODEL_NOT_FOUND"
    assert "'nope'" in details


async def test_duplicate_model_already_exists(registry_stub) -> None:
    await create(registry_stub, "dup")
    code, reason, _ = await failure(registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="dup"))))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "MODEL_EXISTS")


@pytest.mark.parametrize("name", ["Upper", "-lead", "trail-", "has_underscore", "sp ace", "a" * 64, "1abc", "é"])
async def test_bad_model_names_are_invalid(registry_stub, name: str) -> None:
    code, reason, _ = await failure(registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=name))))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME")


async def test_a_name_no_model_can_have_is_invalid_on_every_call_not_not_found(registry_stub) -> None:
    bad = "No_Such"
    calls = [
        registry_stub.GetModel(pb.GetModelRequest(name=bad)),
        registry_stub.DeleteModel(pb.DeleteModelRequest(name=bad)),
        registry_stub.UpdateModel(
            pb.UpdateModelRequest(model=pb.Model(name=bad), update_mask=field_mask_pb2.FieldMask(paths=["labels"]))
        ),
        registry_stub.GetModelVersion(pb.GetModelVersionRequest(model=bad, version=1)),
        registry_stub.ListModelVersions(pb.ListModelVersionsRequest(model=bad)),
        registry_stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model=bad, version=1)),
        registry_stub.RestoreModelVersion(pb.RestoreModelVersionRequest(model=bad, version=1)),
        registry_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model=bad, version=1)),
        registry_stub.SetAlias(pb.SetAliasRequest(model=bad, alias="prod", version=1)),
        registry_stub.DeleteAlias(pb.DeleteAliasRequest(model=bad, alias="prod")),
        registry_stub.ResolveModelRef(pb.ResolveModelRefRequest(ref=pb.ModelRef(name=bad))),
    ]
    for call in calls:
        code, reason, details = await failure(call)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME"), details
    watch = registry_stub.WatchModelEvents(pb.WatchModelEventsRequest(model=bad))
    code, reason, _ = await failure(watch.read())
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME")
    await create(registry_stub, "real")
    code, reason, _ = await failure(registry_stub.DeleteAlias(pb.DeleteAliasRequest(model="real", alias="BAD!")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ALIAS")


async def test_missing_names_are_invalid(registry_stub) -> None:
    for call in (
        registry_stub.CreateModel(pb.CreateModelRequest()),
        registry_stub.GetModel(pb.GetModelRequest()),
        registry_stub.DeleteModel(pb.DeleteModelRequest()),
        registry_stub.UpdateModel(pb.UpdateModelRequest(update_mask=field_mask_pb2.FieldMask(paths=["labels"]))),
    ):
        code, _, details = await failure(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "required" in details


async def test_list_models_orders_by_name_and_pages(registry_stub) -> None:
    names = [f"m{i:02d}" for i in range(7)]
    for name in reversed(names):
        await create(registry_stub, name)
    seen, token, pages = [], "", 0
    while True:
        page = await registry_stub.ListModels(pb.ListModelsRequest(page_size=3, page_token=token))
        seen += [m.name for m in page.models]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert seen == names
    assert pages == 3


async def test_list_models_filters_by_prefix_and_labels(registry_stub) -> None:
    await create(registry_stub, "vision-a", labels={"team": "vision", "stage": "prod"})
    await create(registry_stub, "vision-b", labels={"team": "vision"})
    await create(registry_stub, "text-a", labels={"team": "text", "stage": "prod"})
    by_prefix = await registry_stub.ListModels(pb.ListModelsRequest(name_prefix="vision-"))
    assert [m.name for m in by_prefix.models] == ["vision-a", "vision-b"]
    by_label = await registry_stub.ListModels(pb.ListModelsRequest(labels={"stage": "prod"}))
    assert [m.name for m in by_label.models] == ["text-a", "vision-a"]
    both = await registry_stub.ListModels(pb.ListModelsRequest(name_prefix="vision", labels={"stage": "prod"}))
    assert [m.name for m in both.models] == ["vision-a"]
    underscore = await registry_stub.ListModels(pb.ListModelsRequest(name_prefix="vision_"))
    assert list(underscore.models) == []  # a prefix is literal, not a LIKE pattern


async def test_list_models_refuses_bad_page_size_and_token(registry_stub) -> None:
    code, _, _ = await failure(registry_stub.ListModels(pb.ListModelsRequest(page_size=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _, _ = await failure(registry_stub.ListModels(pb.ListModelsRequest(page_token="not a token")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for key in ([7], ["a", "b"], [None]):  # decodes, but is not a model name
        listing = registry_stub.ListModels(pb.ListModelsRequest(page_token=paging.encode(key, pb.ListModelsRequest())))
        code, _, message = await failure(listing)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token does not belong to this listing" in message


async def test_pagination_returns_each_model_once_while_others_are_created(registry_stub) -> None:
    existing = [f"base-{i:03d}" for i in range(40)]
    for name in existing:
        await create(registry_stub, name)
    stop = asyncio.Event()

    async def create_more() -> None:
        i = 0
        while not stop.is_set():
            await create(registry_stub, f"new-{i:03d}")  # sorts after "base-", some before the cursor: "a-"
            await create(registry_stub, f"a-{i:03d}")
            i += 1

    creator = asyncio.create_task(create_more())
    try:
        seen: list[str] = []
        token = ""
        while True:
            page = await registry_stub.ListModels(pb.ListModelsRequest(page_size=5, page_token=token))
            seen += [m.name for m in page.models]
            if not (token := page.next_page_token):
                break
    finally:
        stop.set()
        await creator
    assert len(seen) == len(set(seen)), "a model was returned twice"
    assert seen == sorted(seen)
    assert set(existing) <= set(seen), "a model that existed throughout was skipped"


async def test_update_model_changes_only_masked_fields(registry_stub) -> None:
    created = await create(registry_stub, "upd", description="old", labels={"a": "1"})
    response = await registry_stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name="upd", description="new", labels={"b": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    assert response.model.description == "new"
    assert dict(response.model.labels) == {"a": "1"}
    assert response.model.update_time.ToDatetime() >= created.update_time.ToDatetime()
    everything = await registry_stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name="upd", description="", labels={"b": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["*"]),
        )
    )
    assert everything.model.description == ""
    assert dict(everything.model.labels) == {"b": "2"}


async def test_update_model_refuses_bad_masks_and_unknown_models(registry_stub) -> None:
    await create(registry_stub, "upd")
    for paths in ([], ["name"], ["latest_version"], ["aliases"]):
        code, reason, _ = await failure(
            registry_stub.UpdateModel(
                pb.UpdateModelRequest(model=pb.Model(name="upd"), update_mask=field_mask_pb2.FieldMask(paths=paths))
            )
        )
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE_MASK"), paths
    code, _, _ = await failure(
        registry_stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name="ghost"), update_mask=field_mask_pb2.FieldMask(paths=["description"])
            )
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_delete_empty_model(registry_stub) -> None:
    await create(registry_stub, "gone")
    response = await registry_stub.DeleteModel(pb.DeleteModelRequest(name="gone"))
    assert response.deleted_versions == 0
    code, _, _ = await failure(registry_stub.GetModel(pb.GetModelRequest(name="gone")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _ = await failure(registry_stub.DeleteModel(pb.DeleteModelRequest(name="gone")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_delete_model_with_versions_needs_force(registry, mlp, add_one) -> None:
    stub = registry.stub
    await upload_model(stub, "busy", mlp.data)
    await upload_model(stub, "busy", add_one.data)
    await upload_model(stub, "other", add_one.data)  # shares a file with busy:2
    await stub.SetAlias(pb.SetAliasRequest(model="busy", alias="production", version=1))
    code, reason, _ = await failure(stub.DeleteModel(pb.DeleteModelRequest(name="busy")))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_HAS_VERSIONS")

    response = await stub.DeleteModel(pb.DeleteModelRequest(name="busy", force=True))
    assert response.deleted_versions == 2
    code, _, _ = await failure(stub.GetModel(pb.GetModelRequest(name="busy")))
    assert code == grpc.StatusCode.NOT_FOUND
    blobs = registry.settings.blob_root
    assert not (blobs / mlp.sha256[:2] / mlp.sha256).exists()
    assert (blobs / add_one.sha256[:2] / add_one.sha256).exists(), "a file another model uses was removed"

    recreated = await upload_model(stub, "busy", mlp.data)
    assert recreated.version == 1  # a new model starts its own numbering

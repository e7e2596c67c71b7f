"""Versions and aliases: get, resolve, list, update, archive/restore, delete, SetAlias/DeleteAlias."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.protobuf import field_mask_pb2

from modelforge.registry.v1 import registry_pb2 as pb
from tests.fixtures.onnx_models import build_add_one, model_bytes
from tests.fixtures.servers import upload_model
from tests.integration.registry.calls import failure, ref


@pytest.fixture
async def three_versions(registry_stub) -> list[pb.ModelVersion]:
    """Model "m" with versions 1, 2 and 3 (distinct files)."""
    return [await upload_model(registry_stub, "m", model_bytes(build_add_one(width=w))) for w in (1, 2, 3)]


async def test_get_unknown_model_or_version_is_not_found(registry_stub, three_versions) -> None:
    code, reason, _ = await failure(registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="x", version=1)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    code, reason, _ = await failure(registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version=9)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    code, _, _ = await failure(registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version=0)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _, _ = await failure(registry_stub.GetModelVersion(pb.GetModelVersionRequest(version=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_resolve_by_number_alias_and_latest(registry_stub, three_versions) -> None:
    assert (await registry_stub.ResolveModelRef(ref("m"))).model_version.version == 3
    assert (await registry_stub.ResolveModelRef(ref("m", version=2))).model_version.version == 2
    await registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=1))
    resolved = (await registry_stub.ResolveModelRef(ref("m", alias="production"))).model_version
    assert resolved.version == 1
    assert list(resolved.aliases) == ["production"]


async def test_resolve_failures(registry_stub, three_versions) -> None:
    cases = [
        (ref("nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (ref("m", version=7), grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND"),
        (ref("m", alias="staging"), grpc.StatusCode.NOT_FOUND, "ALIAS_NOT_FOUND"),
        (ref("m", alias="Bad Alias"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ALIAS"),
        (ref("m", version=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
        (ref(""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ]
    for request, code, reason in cases:
        got_code, got_reason, _ = await failure(registry_stub.ResolveModelRef(request))
        assert (got_code, got_reason) == (code, reason), request


async def test_model_without_ready_versions_has_no_latest(registry_stub) -> None:
    await registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="empty")))
    code, reason, _ = await failure(registry_stub.ResolveModelRef(ref("empty")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NO_READY_VERSION")


async def test_list_versions_newest_first_with_pages_and_state_filter(registry_stub, three_versions) -> None:
    await registry_stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="m", version=2))
    seen, token = [], ""
    while True:
        page = await registry_stub.ListModelVersions(
            pb.ListModelVersionsRequest(model="m", page_size=2, page_token=token)
        )
        seen += [v.version for v in page.model_versions]
        if not (token := page.next_page_token):
            break
    assert seen == [3, 2, 1]
    ready = await registry_stub.ListModelVersions(pb.ListModelVersionsRequest(model="m", state=pb.VERSION_STATE_READY))
    assert [v.version for v in ready.model_versions] == [3, 1]
    archived = await registry_stub.ListModelVersions(
        pb.ListModelVersionsRequest(model="m", state=pb.VERSION_STATE_ARCHIVED)
    )
    assert [v.version for v in archived.model_versions] == [2]
    code, _, _ = await failure(registry_stub.ListModelVersions(pb.ListModelVersionsRequest(model="zzz")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _ = await failure(registry_stub.ListModelVersions(pb.ListModelVersionsRequest(model="m", page_size=-5)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _, details = await failure(registry_stub.ListModelVersions(pb.ListModelVersionsRequest(model="m", state=7)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "state 7 is not a VersionState; use one of VERSION_STATE_READY, VERSION_STATE_ARCHIVED" in details
    # A token is of its listing: another model's, or another state's, is refused rather than paged from.
    first = await registry_stub.ListModelVersions(pb.ListModelVersionsRequest(model="m", page_size=1))
    for other in (
        pb.ListModelVersionsRequest(model="n"),
        pb.ListModelVersionsRequest(model="m", state=pb.VERSION_STATE_READY),
    ):
        other.page_token = first.next_page_token
        code, _, details = await failure(registry_stub.ListModelVersions(other))
        assert (code, "page_token came with other filters" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)


async def test_update_version_changes_masked_fields(registry_stub, three_versions) -> None:
    response = await registry_stub.UpdateModelVersion(
        pb.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(
                model="m", version=2, description="tuned", labels={"k": "v"}, version_label="2.1.0", sha256="ignored"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "version_label"]),
        )
    )
    updated = response.model_version
    assert (updated.description, updated.version_label, dict(updated.labels)) == ("tuned", "2.1.0", {})
    assert updated.sha256 == three_versions[1].sha256
    for paths, code in ((["state"], grpc.StatusCode.INVALID_ARGUMENT), ([], grpc.StatusCode.INVALID_ARGUMENT)):
        got, _, _ = await failure(
            registry_stub.UpdateModelVersion(
                pb.UpdateModelVersionRequest(
                    model_version=pb.ModelVersion(model="m", version=2),
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                )
            )
        )
        assert got == code
    got, _, _ = await failure(
        registry_stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(model="m", version=42), update_mask=field_mask_pb2.FieldMask(paths=["*"])
            )
        )
    )
    assert got == grpc.StatusCode.NOT_FOUND


async def test_archived_version_is_never_latest_nor_aliased(registry_stub, three_versions) -> None:
    archived = await registry_stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="m", version=3))
    assert archived.model_version.state == pb.VERSION_STATE_ARCHIVED
    assert (await registry_stub.ResolveModelRef(ref("m"))).model_version.version == 2
    assert (await registry_stub.GetModel(pb.GetModelRequest(name="m"))).model.latest_version == 2
    assert (await registry_stub.ResolveModelRef(ref("m", version=3))).model_version.version == 3  # by number: yes
    code, reason, _ = await failure(registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="prod", version=3)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_ARCHIVED")

    restored = await registry_stub.RestoreModelVersion(pb.RestoreModelVersionRequest(model="m", version=3))
    assert restored.model_version.state == pb.VERSION_STATE_READY
    assert (await registry_stub.ResolveModelRef(ref("m"))).model_version.version == 3
    again = await registry_stub.RestoreModelVersion(pb.RestoreModelVersionRequest(model="m", version=3))
    assert again.model_version.state == pb.VERSION_STATE_READY


async def test_archiving_an_aliased_version_fails(registry_stub, three_versions) -> None:
    await registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="prod", version=1))
    code, reason, details = await failure(
        registry_stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="m", version=1))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_HAS_ALIASES")
    assert "prod" in details
    code, _, _ = await failure(registry_stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="m", version=8)))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_deleting_an_aliased_version_fails(registry_stub, three_versions) -> None:
    await registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="prod", version=2))
    code, reason, _ = await failure(
        registry_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="m", version=2))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_HAS_ALIASES")
    await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version=2))  # still there


async def test_delete_version_removes_unused_file_and_never_reuses_its_number(registry, three_versions) -> None:
    stub = registry.stub
    blob = registry.settings.blob_root / three_versions[2].sha256[:2] / three_versions[2].sha256
    assert blob.exists()
    response = await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="m", version=3))
    assert response.blob_deleted
    assert not blob.exists()
    code, _, _ = await failure(stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version=3)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _ = await failure(stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="m", version=3)))
    assert code == grpc.StatusCode.NOT_FOUND
    again = await upload_model(stub, "m", model_bytes(build_add_one(width=3)))
    assert again.version == 4
    assert blob.exists()


async def test_delete_version_keeps_a_file_another_version_uses(registry, add_one) -> None:
    await upload_model(registry.stub, "a", add_one.data)
    await upload_model(registry.stub, "b", add_one.data)
    response = await registry.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="a", version=1))
    assert not response.blob_deleted
    assert (registry.settings.blob_root / add_one.sha256[:2] / add_one.sha256).exists()


async def test_set_move_and_delete_alias(registry_stub, three_versions) -> None:
    first = await registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=1))
    assert (first.model_version.version, first.previous_version) == (1, 0)
    moved = await registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=2))
    assert (moved.model_version.version, moved.previous_version) == (2, 1)
    assert list(moved.model_version.aliases) == ["production"]
    await registry_stub.SetAlias(pb.SetAliasRequest(model="m", alias="canary", version=3))
    model = (await registry_stub.GetModel(pb.GetModelRequest(name="m"))).model
    assert dict(model.aliases) == {"production": 2, "canary": 3}
    deleted = await registry_stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="production"))
    assert deleted.previous_version == 2
    code, reason, _ = await failure(registry_stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="production")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ALIAS_NOT_FOUND")
    code, _, _ = await failure(registry_stub.ResolveModelRef(ref("m", alias="production")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_set_alias_failures(registry_stub, three_versions) -> None:
    cases = [
        (pb.SetAliasRequest(model="m", alias="prod", version=9), grpc.StatusCode.NOT_FOUND),
        (pb.SetAliasRequest(model="zz", alias="prod", version=1), grpc.StatusCode.NOT_FOUND),
        (pb.SetAliasRequest(model="m", alias="Prod!", version=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SetAliasRequest(model="m", alias="1st", version=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SetAliasRequest(model="m", alias="", version=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SetAliasRequest(model="m", alias="prod", version=0), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        got, _, _ = await failure(registry_stub.SetAlias(request))
        assert got == code, request


async def test_alias_moved_while_readers_resolve_is_never_missing_or_archived(registry_stub) -> None:
    versions = [await upload_model(registry_stub, "hot", model_bytes(build_add_one(width=w))) for w in (1, 2, 3, 4)]
    numbers = [v.version for v in versions]
    await registry_stub.SetAlias(pb.SetAliasRequest(model="hot", alias="production", version=numbers[0]))
    done = asyncio.Event()
    resolved: list[int] = []

    async def reader() -> None:
        while not done.is_set():
            got = (await registry_stub.ResolveModelRef(ref("hot", alias="production"))).model_version
            assert got.state == pb.VERSION_STATE_READY
            assert "production" in got.aliases
            resolved.append(got.version)

    async def mover() -> None:
        # Move the alias around while archiving and restoring the versions it just left.
        for round_ in range(30):
            target = numbers[round_ % 4]
            previous = (
                await registry_stub.SetAlias(pb.SetAliasRequest(model="hot", alias="production", version=target))
            ).previous_version
            if previous != target:
                await registry_stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="hot", version=previous))
                await registry_stub.RestoreModelVersion(pb.RestoreModelVersionRequest(model="hot", version=previous))
        done.set()

    await asyncio.gather(mover(), *(reader() for _ in range(8)))
    assert resolved and set(resolved) <= set(numbers)


async def test_changes_to_what_is_served_are_logged(registry, add_one, caplog: pytest.LogCaptureFixture) -> None:
    stub = registry.stub
    for _ in range(2):
        await upload_model(stub, "logged", add_one.data)
    with caplog.at_level(logging.INFO, logger="modelforge.registry"):
        await stub.SetAlias(pb.SetAliasRequest(model="logged", alias="production", version=1))
        await stub.SetAlias(pb.SetAliasRequest(model="logged", alias="production", version=2))
        await stub.SetAlias(pb.SetAliasRequest(model="logged", alias="production", version=2))  # no change
        await stub.DeleteAlias(pb.DeleteAliasRequest(model="logged", alias="production"))
        await stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="logged", version=1))
        await stub.RestoreModelVersion(pb.RestoreModelVersionRequest(model="logged", version=1))
        await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="logged", version=1))
        await stub.DeleteModel(pb.DeleteModelRequest(name="logged", force=True))
    assert [r.getMessage() for r in caplog.records if r.name == "modelforge.registry"] == [
        "logged@production -> 1 (new)",
        "logged@production -> 2 (was 1)",
        "deleted alias logged@production (was 2)",
        "archived logged:1",
        "restored logged:1",
        "deleted logged:1",  # its file stays: version 2 is the same file
        "deleted model logged and 1 version(s)",
    ]

"""DownloadModelVersion streams, and WatchModelEvents seen from every replica."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest

from modelforge.registry.v1 import registry_pb2 as pb
from tests.fixtures.servers import upload_model
from tests.integration.registry.calls import failure, reason_of

E = pb.ModelEventType


async def download(stub, **selector) -> tuple[pb.ModelVersion, bytes, int]:
    header, parts = None, []
    async for message in stub.DownloadModelVersion(pb.DownloadModelVersionRequest(ref=pb.ModelRef(**selector))):
        if message.WhichOneof("content") == "model_version":
            assert header is None and not parts, "the header must come first, once"
            header = message.model_version
        else:
            parts.append(message.chunk)
    assert header is not None
    return header, b"".join(parts), len(parts)


async def test_download_streams_header_then_chunks(registry, mlp) -> None:
    await upload_model(registry.stub, "dl", mlp.data)
    header, data, chunks = await download(registry.stub, name="dl", version=1)
    assert (header.version, header.sha256, header.size_bytes) == (1, mlp.sha256, mlp.size)
    assert hashlib.sha256(data).hexdigest() == header.sha256
    assert chunks == -(-mlp.size // registry.settings.chunk_bytes)  # chunks of MODELFORGE_CHUNK_BYTES
    await registry.stub.SetAlias(pb.SetAliasRequest(model="dl", alias="prod", version=1))
    by_alias, _, _ = await download(registry.stub, name="dl", alias="prod")
    latest, _, _ = await download(registry.stub, name="dl")
    assert by_alias.version == latest.version == 1


async def test_download_unknown_is_not_found(registry_stub, add_one) -> None:
    await upload_model(registry_stub, "dl", add_one.data)
    for selector in ({"name": "nope"}, {"name": "dl", "version": 5}, {"name": "dl", "alias": "prod"}):
        code, _, _ = await failure(download(registry_stub, **selector))
        assert code == grpc.StatusCode.NOT_FOUND, selector
    code, _, _ = await failure(download(registry_stub))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_file_missing_from_the_blob_store_is_data_loss_not_a_missing_version(registry, add_one, caplog) -> None:
    await upload_model(registry.stub, "lost", add_one.data)
    (registry.settings.blob_root / add_one.sha256[:2] / add_one.sha256).unlink()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await download(registry.stub, name="lost")
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert reason_of(caught.value) == "MODEL_FILE_MISSING"
    assert f"the file of lost:1 (sha256 {add_one.sha256}) is missing" in (caught.value.details() or "")
    assert any(r.levelname == "ERROR" and "missing from the blob store" in r.getMessage() for r in caplog.records)
    # The version itself is still there, and a deleted one is still NOT_FOUND.
    assert (await registry.stub.GetModelVersion(pb.GetModelVersionRequest(model="lost", version=1))).model_version
    await registry.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="lost", version=1))
    code, reason, _ = await failure(download(registry.stub, name="lost", version=1))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")


async def next_event(stream) -> pb.ModelEvent:
    return (await asyncio.wait_for(stream.read(), 30)).event


async def test_a_watcher_on_one_replica_sees_changes_made_through_another(
    registry, registry_replica, add_one, mlp
) -> None:
    watch_all = registry.stub.WatchModelEvents(pb.WatchModelEventsRequest())
    watch_one = registry.stub.WatchModelEvents(pb.WatchModelEventsRequest(model="watched"))
    try:
        assert (await next_event(watch_all)).type == E.MODEL_EVENT_TYPE_WATCH_STARTED
        assert (await next_event(watch_one)).type == E.MODEL_EVENT_TYPE_WATCH_STARTED
        other = registry_replica.stub  # every change below goes through the other replica
        await upload_model(other, "unwatched", add_one.data)
        await upload_model(other, "watched", add_one.data)
        await upload_model(other, "watched", mlp.data)
        await other.SetAlias(pb.SetAliasRequest(model="watched", alias="prod", version=2))
        await other.SetAlias(pb.SetAliasRequest(model="watched", alias="prod", version=1))
        await other.DeleteAlias(pb.DeleteAliasRequest(model="watched", alias="prod"))
        await other.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="watched", version=2))
        await other.RestoreModelVersion(pb.RestoreModelVersionRequest(model="watched", version=2))
        await other.DeleteModelVersion(pb.DeleteModelVersionRequest(model="watched", version=2))
        await other.DeleteModel(pb.DeleteModelRequest(name="watched", force=True))

        expected = [
            (E.MODEL_EVENT_TYPE_MODEL_CREATED, 0, ""),
            (E.MODEL_EVENT_TYPE_VERSION_CREATED, 1, ""),
            (E.MODEL_EVENT_TYPE_VERSION_CREATED, 2, ""),
            (E.MODEL_EVENT_TYPE_ALIAS_SET, 2, "prod"),
            (E.MODEL_EVENT_TYPE_ALIAS_SET, 1, "prod"),
            (E.MODEL_EVENT_TYPE_ALIAS_DELETED, 1, "prod"),
            (E.MODEL_EVENT_TYPE_VERSION_ARCHIVED, 2, ""),
            (E.MODEL_EVENT_TYPE_VERSION_RESTORED, 2, ""),
            (E.MODEL_EVENT_TYPE_VERSION_DELETED, 2, ""),
            (E.MODEL_EVENT_TYPE_MODEL_DELETED, 0, ""),
        ]
        seen = []
        for _ in expected:
            event = await next_event(watch_one)
            assert event.model == "watched"
            assert event.event_time.seconds > 0
            seen.append((event.type, event.version, event.alias))
        assert seen == expected

        everything = [await next_event(watch_all) for _ in range(len(expected) + 2)]
        assert [(e.model, e.type) for e in everything[:2]] == [
            ("unwatched", E.MODEL_EVENT_TYPE_MODEL_CREATED),
            ("unwatched", E.MODEL_EVENT_TYPE_VERSION_CREATED),
        ]
        assert [(e.type, e.version, e.alias) for e in everything[2:]] == expected
    finally:
        watch_all.cancel()
        watch_one.cancel()


async def test_failed_changes_publish_no_event(registry, registry_replica, not_onnx, add_one) -> None:
    watch = registry_replica.stub.WatchModelEvents(pb.WatchModelEventsRequest(model="quiet"))
    try:
        assert (await next_event(watch)).type == E.MODEL_EVENT_TYPE_WATCH_STARTED
        await failure(upload_model(registry.stub, "quiet", not_onnx.data))  # refused: no event
        await upload_model(registry.stub, "quiet", add_one.data)
        assert (await next_event(watch)).type == E.MODEL_EVENT_TYPE_MODEL_CREATED
        assert (await next_event(watch)).type == E.MODEL_EVENT_TYPE_VERSION_CREATED
    finally:
        watch.cancel()

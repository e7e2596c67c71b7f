"""ModelFileCache against a real registry: verified downloads, sharing, LRU eviction with pins, corrupt files."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import resource
import signal
from pathlib import Path

import grpc
import pytest

from modelforge.registry.v1 import registry_pb2_grpc
from modelforge_inference import files
from modelforge_inference.domain import ResolvedModel
from modelforge_inference.files import (
    ModelDirectoryInUse,
    ModelFileCache,
    ModelFileCacheFailed,
    ModelFileCorrupt,
    ModelFileTooLarge,
)
from modelforge_inference.registry_client import RegistryNotFound, RegistryUnavailable, resolved_model
from modelforge_server import status
from modelforge_server.errors import ServiceError
from tests.fixtures.disks import small_disk  # noqa: F401  # a fixture: room for one of two 345 KB models
from tests.fixtures.onnx_models import build_mlp, model_bytes
from tests.fixtures.servers import upload_model as upload
from tests.integration.inference import test_resolver as harness
from tests.integration.inference.test_resolver import Registry, add_one_bytes

# The registry fixtures of the resolver tests: an in-process registry, a counted stub and an admin stub.
restartable_registry = harness.restartable_registry
stub = harness.stub
admin = harness.admin


async def add_versions(admin: registry_pb2_grpc.RegistryServiceStub, *widths: int) -> list[ResolvedModel]:
    return [resolved_model(await upload(admin, "adder", add_one_bytes(width))) for width in widths]


def entries(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


async def test_downloads_verifies_and_names_the_file_by_sha256(
    admin, restartable_registry: Registry, stub, tmp_path: Path
) -> None:
    [model] = await add_versions(admin, 4)
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    path = await cache.path_for(model)
    assert path == tmp_path / "models" / model.sha256
    assert path.read_bytes() == add_one_bytes(4)
    assert entries(tmp_path / "models") == {model.sha256}
    assert cache.used_bytes == model.size_bytes
    assert model.sha256 in cache

    assert await cache.path_for(model) == path
    assert restartable_registry.counter.calls["DownloadModelVersion"] == 1


async def test_concurrent_requests_share_one_download(
    admin, restartable_registry: Registry, stub, tmp_path: Path
) -> None:
    [model] = await add_versions(admin, 4)
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    paths = await asyncio.gather(*(cache.path_for(model) for _ in range(10)))
    assert set(paths) == {tmp_path / "models" / model.sha256}
    assert restartable_registry.counter.calls["DownloadModelVersion"] == 1


async def test_files_present_at_start_are_adopted_and_partial_ones_removed(admin, stub, tmp_path: Path) -> None:
    [model] = await add_versions(admin, 4)
    directory = tmp_path / "models"
    first = ModelFileCache(stub, directory, max_bytes=1 << 20)
    await first.path_for(model)
    first.close()
    (directory / f".{model.sha256}.dead.part").write_bytes(b"half a file")

    second = ModelFileCache(stub, directory, max_bytes=1 << 20)
    assert entries(directory) == {model.sha256}
    assert second.files() == [model.sha256]


async def test_a_directory_another_cache_holds_is_refused_and_its_download_in_progress_left_alone(
    admin, stub, tmp_path: Path
) -> None:
    [model] = await add_versions(admin, 4)
    directory = tmp_path / "models"
    first = ModelFileCache(stub, directory, max_bytes=1 << 20)
    partial = directory / f".{model.sha256}.in-progress.part"  # as a download of the first leaves it meanwhile
    partial.write_bytes(b"half a file")

    with pytest.raises(ModelDirectoryInUse) as caught:  # another process (a replica) given the same directory
        ModelFileCache(stub, directory, max_bytes=1 << 20)

    assert str(caught.value).startswith(f"the model file cache {directory} is in use by another inference process")
    assert partial.exists()  # its scan would have deleted the first one's download as a leftover
    first.close()
    assert ModelFileCache(stub, directory, max_bytes=1 << 20).files() == []


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
async def test_a_file_changed_on_disk_is_downloaded_again_before_a_session_reads_it(
    admin, restartable_registry: Registry, stub, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    [model] = await add_versions(admin, 4)
    directory = tmp_path / "models"
    await ModelFileCache(stub, directory, max_bytes=1 << 20).path_for(model)
    path = directory / model.sha256
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[-10] ^= 0xFF  # in the weights: the file still parses, as a model with other weights
    else:
        del data[100:]
    path.write_bytes(data)

    # Found on disk at start:
    cache = ModelFileCache(stub, directory, max_bytes=1 << 20)
    assert await cache.path_for(model) == path
    assert path.read_bytes() == add_one_bytes(4)
    assert cache.used_bytes == model.size_bytes
    # Held already, while running:
    path.write_bytes(data)
    assert await cache.path_for(model) == path
    assert path.read_bytes() == add_one_bytes(4)
    assert restartable_registry.counter.calls["DownloadModelVersion"] == 3
    assert entries(directory) == {model.sha256}
    assert "changed on disk" in caplog.text


async def test_least_recently_used_unpinned_files_are_evicted(
    admin, restartable_registry: Registry, stub, tmp_path: Path
) -> None:
    a, b, c = await add_versions(admin, 4, 5, 6)
    directory = tmp_path / "models"
    cache = ModelFileCache(stub, directory, max_bytes=a.size_bytes + b.size_bytes + c.size_bytes - 1)

    await cache.path_for(a)
    await cache.path_for(b)
    await cache.path_for(a)  # b is now the least recently used
    await cache.path_for(c)
    assert entries(directory) == {a.sha256, c.sha256}
    assert cache.files() == [a.sha256, c.sha256]
    assert cache.used_bytes <= cache.max_bytes

    async with cache.pinned(a) as path:  # a is the least recently used now, but in use
        assert cache.is_pinned(a.sha256)
        await cache.path_for(b)
        assert path.exists()
        assert entries(directory) == {a.sha256, b.sha256}
    assert not cache.is_pinned(a.sha256)
    assert restartable_registry.counter.calls["DownloadModelVersion"] == 4


async def test_pinned_files_may_overshoot_the_bound_rather_than_fail(admin, stub, tmp_path: Path) -> None:
    a, b = await add_versions(admin, 4, 5)
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=max(a.size_bytes, b.size_bytes))
    async with cache.pinned(a):
        assert (await cache.path_for(b)).exists()
        assert entries(tmp_path / "models") == {a.sha256, b.sha256}
    await cache.path_for(a)
    assert entries(tmp_path / "models") == {a.sha256}


async def test_a_file_larger_than_the_cache_is_resource_exhausted(admin, stub, tmp_path: Path) -> None:
    [model] = await add_versions(admin, 4)
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=model.size_bytes - 1)
    with pytest.raises(ModelFileTooLarge) as caught:
        await cache.path_for(model)
    assert status.code_for(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert entries(tmp_path / "models") == set()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"sha256": "0" * 64}, id="sha256"),
        pytest.param({"size_bytes": 10}, id="size"),
    ],
)
async def test_a_file_that_does_not_match_its_record_leaves_nothing(
    admin, stub, tmp_path: Path, change: dict[str, object]
) -> None:
    [model] = await add_versions(admin, 4)
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    with pytest.raises(ModelFileCorrupt) as caught:
        await cache.path_for(dataclasses.replace(model, **change))
    assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "MODEL_FILE_CORRUPT"
    assert entries(tmp_path / "models") == set()
    assert cache.used_bytes == 0


async def test_corrupted_bytes_fail_the_sha256_check_and_leave_nothing(
    admin, restartable_registry: Registry, stub, tmp_path: Path
) -> None:
    [model] = await add_versions(admin, 4)
    blob = restartable_registry.settings.blob_root / model.sha256[:2] / model.sha256
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))

    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    with pytest.raises(ModelFileCorrupt) as caught:
        await cache.path_for(model)
    assert hashlib.sha256(data).hexdigest() in str(caught.value)
    assert entries(tmp_path / "models") == set()


async def test_a_file_lost_from_the_registrys_blob_store_is_data_loss_passed_through(
    admin, restartable_registry: Registry, stub, tmp_path: Path
) -> None:
    [model] = await add_versions(admin, 4)
    (restartable_registry.settings.blob_root / model.sha256[:2] / model.sha256).unlink()
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    with pytest.raises(ServiceError) as caught:
        await cache.path_for(model)
    # Not "registry unavailable": a client that retries UNAVAILABLE would load it again and again.
    assert status.code_for(caught.value) == grpc.StatusCode.DATA_LOSS
    assert caught.value.reason == "MODEL_FILE_MISSING"
    assert entries(tmp_path / "models") == set()


async def test_an_unknown_version_is_not_found(admin, stub, tmp_path: Path) -> None:
    [model] = await add_versions(admin, 4)
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    with pytest.raises(RegistryNotFound) as caught:
        await cache.path_for(dataclasses.replace(model, version=9))
    assert status.code_for(caught.value) == grpc.StatusCode.NOT_FOUND
    assert entries(tmp_path / "models") == set()


async def holding_two_of_three(
    admin: registry_pb2_grpc.RegistryServiceStub, stub: registry_pb2_grpc.RegistryServiceStub, directory: Path
) -> tuple[ModelFileCache, list[ResolvedModel]]:
    """A cache one byte too small for three versions' files, holding a and b (a the least recently used): c
    fits only once a goes."""
    a, b, c = await add_versions(admin, 4, 5, 6)
    cache = ModelFileCache(stub, directory, max_bytes=a.size_bytes + b.size_bytes + c.size_bytes - 1)
    await cache.path_for(a)
    await cache.path_for(b)
    return cache, [a, b, c]


def bytes_on_disk(directory: Path) -> int:
    return sum(entry.stat().st_size for entry in directory.iterdir())


async def test_a_full_disk_is_unavailable_and_leaves_no_partial_file(admin, stub, tmp_path: Path) -> None:
    model = resolved_model(await upload(admin, "mlp", model_bytes(build_mlp())))
    limit = 100_000  # a file may not grow past this: writes fail as on a full disk (EFBIG rather than ENOSPC)
    assert model.size_bytes > 2 * limit
    cache = ModelFileCache(stub, tmp_path / "models", max_bytes=1 << 20)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), rather than the signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(ModelFileCacheFailed) as caught:
            await cache.path_for(model)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "MODEL_FILE_CACHE_FAILED"
    assert "check the disk" in str(caught.value)
    assert entries(tmp_path / "models") == set()  # the partial file went
    assert cache.used_bytes == 0

    assert (await cache.path_for(model)).read_bytes() == model_bytes(build_mlp())  # the disk has room again


async def test_a_file_downloaded_again_while_its_eviction_runs_stays(
    admin, stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "models"
    cache, (a, b, c) = await holding_two_of_three(admin, stub, directory)
    deleting, finish = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    unlink = files._unlink

    def slow_unlink(paths: list[Path]) -> None:  # freeing a large file's blocks takes a while
        loop.call_soon_threadsafe(deleting.set)
        asyncio.run_coroutine_threadsafe(finish.wait(), loop).result(10)
        unlink(paths)

    monkeypatch.setattr(files, "_unlink", slow_unlink)
    evicting = asyncio.ensure_future(cache.path_for(c))  # evicts a, the least recently used
    await asyncio.wait_for(deleting.wait(), 10)
    assert a.sha256 not in cache
    monkeypatch.setattr(files, "_unlink", unlink)
    path = await cache.path_for(a)  # wanted again while its old file is being deleted: downloaded again
    finish.set()
    await evicting

    assert path.read_bytes() == add_one_bytes(4)
    assert {a.sha256, c.sha256} <= entries(directory)
    assert cache.used_bytes == bytes_on_disk(directory)


async def test_an_eviction_the_disk_refuses_is_unavailable_and_keeps_the_count_true(
    admin, stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "models"
    cache, (a, b, c) = await holding_two_of_three(admin, stub, directory)
    replace = os.replace

    def refuse_a(source: Path, target: Path) -> None:  # as a read-only or failing disk would
        if Path(source).name == a.sha256:
            raise PermissionError(13, "Permission denied", str(source))
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", refuse_a)
    with pytest.raises(ModelFileCacheFailed) as caught:
        await cache.path_for(c)
    assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert "Permission denied" in str(caught.value)
    assert cache.files() == [a.sha256, b.sha256]
    assert cache.used_bytes == bytes_on_disk(directory)


class _StallAfterHeader(grpc.aio.UnaryStreamClientInterceptor):
    """Passes a download's first message (the version header) through, then holds the rest back, as a registry
    whose blob store hangs while its connection stays up would."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)

        async def stalled():
            yield await call.read()
            await asyncio.sleep(3600)

        return stalled()


async def test_a_download_that_stalls_is_unavailable_after_the_call_timeout(
    admin, restartable_registry: Registry, tmp_path: Path
) -> None:
    [model] = await add_versions(admin, 4)
    async with grpc.aio.insecure_channel(restartable_registry.address, interceptors=[_StallAfterHeader()]) as channel:
        stalling = registry_pb2_grpc.RegistryServiceStub(channel)
        cache = ModelFileCache(stalling, tmp_path / "models", 1 << 20, stall_seconds=0.2)
        with pytest.raises(RegistryUnavailable) as caught:
            await asyncio.wait_for(cache.path_for(model), 30)
    assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert "sent nothing for 0.2 s" in str(caught.value)
    assert entries(tmp_path / "models") == set()


async def test_a_full_disk_evicts_unused_files_to_store_a_new_one_and_fails_only_when_none_can_go(
    admin, stub, small_disk: Path
) -> None:
    first, second = [
        resolved_model(await upload(admin, f"mlp-{seed}", model_bytes(build_mlp(seed=seed)))) for seed in (0, 1)
    ]
    cache = ModelFileCache(stub, small_disk / "models", max_bytes=1 << 30)  # the bound is far: the disk is not
    try:
        await cache.path_for(first)

        async with cache.pinned(first):  # in use: it cannot go, so there is no room
            with pytest.raises(ModelFileCacheFailed) as caught:
                await cache.path_for(second)
        assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
        assert "No space left on device" in str(caught.value)
        assert entries(small_disk / "models") == {first.sha256}  # the partial download went

        path = await cache.path_for(second)  # unused now: evicted to make room, where every retry used to fail

        assert path.read_bytes() == model_bytes(build_mlp(seed=1))
        assert entries(small_disk / "models") == {second.sha256}
        assert cache.files() == [second.sha256]
    finally:
        cache.close()

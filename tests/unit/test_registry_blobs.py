"""The content-addressed blob store on a real directory, without servers."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from modelforge_registry.blobs import BlobStore

SMALL = b"small model bytes"
LARGE = os.urandom(200 * 1024)  # written in a worker thread (chunks of 64 KiB or more)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    blobs = BlobStore(tmp_path / "blobs")
    blobs.open()
    return blobs


async def put(store: BlobStore, data: bytes, *, chunk: int = 64 * 1024) -> str:
    staged = store.stage()
    for start in range(0, len(data), chunk):
        await staged.write(data[start : start + chunk])
    await staged.finish()
    assert (staged.size, staged.sha256) == (len(data), sha(data))
    await store.place(staged, staged.sha256)
    staged.discard()  # what the registry does whatever happened; nothing is left to remove
    return staged.sha256


def files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


async def test_put_hashes_while_writing_and_moves_the_file_to_its_content_address(store: BlobStore) -> None:
    for data in (SMALL, LARGE):
        digest = await put(store, data, chunk=5 if data is SMALL else 70 * 1024)
        assert store.path(digest) == store.root / digest[:2] / digest
        assert store.path(digest).read_bytes() == data
    assert list(store.incoming.iterdir()) == []  # staging files were renamed, not copied


async def test_the_same_bytes_are_stored_once(store: BlobStore) -> None:
    first = await put(store, LARGE)
    second = await put(store, LARGE, chunk=1000)
    assert first == second
    assert files(store.root) == [Path(first[:2]) / first]
    assert store.path(first).read_bytes() == LARGE


async def test_a_staged_file_is_invisible_until_placed_and_discard_removes_it(store: BlobStore) -> None:
    staged = store.stage()
    await staged.write(SMALL)
    assert staged.path.parent == store.incoming
    assert not store.path(sha(SMALL)).exists()
    staged.discard()
    staged.discard()  # safe twice
    assert files(store.root) == []


async def test_remove_deletes_the_file_and_tolerates_a_missing_one(store: BlobStore) -> None:
    digest = await put(store, SMALL)
    await store.remove(digest)
    assert not store.path(digest).exists()
    await store.remove(digest)
    await store.remove(sha(b"never stored"))


async def test_read_streams_chunks_and_a_missing_file_raises_at_once(store: BlobStore) -> None:
    digest = await put(store, LARGE)
    chunks = [chunk async for chunk in await store.read(digest, 64 * 1024)]
    assert [len(c) for c in chunks] == [64 * 1024] * 3 + [len(LARGE) - 3 * 64 * 1024]
    assert b"".join(chunks) == LARGE
    with pytest.raises(FileNotFoundError):
        await store.read(sha(b"absent"), 1024)


async def test_open_removes_the_staged_files_no_upload_holds_whatever_their_age(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    store.open()
    dead = store.incoming / "upload-dead.part"
    dead.write_bytes(b"left a second ago by a process that died mid-upload")  # as `up` restarts a registry at once
    live = store.stage()  # an upload in progress, here or on another replica sharing the directory
    await live.write(b"being written")
    store.open()
    assert sorted(p.name for p in store.incoming.iterdir()) == [live.path.name]
    await live.finish()
    store.open()  # finished but not placed yet (validation): still held
    assert live.path.exists()
    live.discard()
    assert list(store.incoming.iterdir()) == []


async def test_stored_before_lists_old_files_at_their_content_address_only(store: BlobStore) -> None:
    old, new = await put(store, SMALL), await put(store, LARGE)
    two_hours_ago = time.time() - 7200
    os.utime(store.path(old), (two_hours_ago, two_hours_ago))
    stray = store.root / old[:2] / "notes.txt"
    stray.write_bytes(b"not a blob")
    os.utime(stray, (two_hours_ago, two_hours_ago))
    assert store.stored_before(time.time() - 3600) == [old]
    assert store.stored_before(time.time() + 60) == sorted([old, new])

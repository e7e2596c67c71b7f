"""The registry removes orphaned files from its blob store, unrecorded and untouched for an hour: at start, and
then every hour."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from modelforge.registry.v1 import registry_pb2 as pb
from modelforge_registry.blobs import BlobStore
from modelforge_registry.events import EventHub
from modelforge_registry.registry import ModelRegistry
from modelforge_registry.store import RegistryStore
from modelforge_server import db, tasks
from tests.fixtures.polling import eventually
from tests.fixtures.servers import MiB, running_registry, upload_model

TWO_HOURS_AGO = time.time() - 7200


def blob(root: Path, data: bytes, *, old: bool) -> Path:
    """Writes `data` at its content address, as a placed file whose version never committed would be."""
    digest = hashlib.sha256(data).hexdigest()
    path = root / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    return path


async def test_a_starting_registry_removes_old_unrecorded_files_only(registry_settings, mlp, add_one) -> None:
    root = registry_settings.blob_root
    async with running_registry(registry_settings) as first:
        await upload_model(first.stub, "kept", mlp.data)
    recorded = root / mlp.sha256[:2] / mlp.sha256
    os.utime(recorded, (TWO_HOURS_AGO, TWO_HOURS_AGO))  # old, but a version uses it
    orphan = blob(root, add_one.data, old=True)  # placed by a replica that died before committing
    in_progress = blob(root, b"placed by an upload that has not committed yet", old=False)
    misplaced = root / "00" / hashlib.sha256(b"not at its address").hexdigest()
    stray = root / "ab" / "README"
    for path, data in ((misplaced, b"not at its address"), (stray, b"an operator's note")):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))

    async with running_registry(registry_settings) as second:
        assert not orphan.exists()
        assert recorded.exists() and in_progress.exists()
        assert misplaced.exists() and stray.exists()  # not ours to judge: only content addresses are swept
        data = b""
        async for message in second.stub.DownloadModelVersion(
            pb.DownloadModelVersionRequest(ref=pb.ModelRef(name="kept"))
        ):
            data += message.chunk
        assert data == mlp.data
        # The orphan's content can be uploaded again; the fresh file then belongs to a version.
        await upload_model(second.stub, "revived", add_one.data)
        assert orphan.read_bytes() == add_one.data


async def test_a_running_registry_sweeps_again_every_interval(db_pool, tmp_path: Path, add_one) -> None:
    """A file orphaned while the registry runs (its replica died after placing it) goes at a later sweep, not at
    the next restart."""
    await db.migrate(db_pool, schema="registry", package="modelforge_registry.migrations")
    blobs = BlobStore(tmp_path / "blobs")
    blobs.open()
    registry = ModelRegistry(RegistryStore(db_pool), blobs, EventHub(""), max_model_bytes=MiB, chunk_bytes=MiB)
    sweeps = asyncio.create_task(registry.sweep_orphans_every(0.05))
    try:
        await asyncio.sleep(0.2)  # a few sweeps of nothing
        orphan = blob(tmp_path / "blobs", add_one.data, old=True)
        await eventually(lambda: not orphan.exists(), "a sweep to remove the orphan")
    finally:
        assert await tasks.stop(sweeps)

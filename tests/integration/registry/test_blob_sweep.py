"""At start the registry removes orphaned files from its blob store: unrecorded and untouched for an hour."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from modelforge.registry.v1 import registry_pb2 as pb
from tests.fixtures.servers import running_registry, upload_model

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

"""Model files on disk, content-addressed by sha256, written through staged temporary files and atomic renames."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO

from modelforge_registry.domain import SHA256_HEX

# Chunks at least this large are written and hashed in a worker thread rather than on the event loop.
_THREAD_THRESHOLD = 64 * 1024
# A stored file this old that no version records is left over by a process that died between placing it and
# recording it (see ModelRegistry.sweep_orphans).
STALE_SECONDS = 3600.0


class StagedFile:
    """A temporary file that an upload fills; it hashes the bytes as they arrive.

    The upload holds an exclusive lock on it (flock) until the file is closed: a staged file nobody holds locked
    belongs to an upload whose process died, whatever its age (see BlobStore.open).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "xb")  # noqa: SIM115  # closed by discard()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        if not _still_at(path, self._file.fileno()):  # a replica's sweep took it before the lock did
            self._file.close()
            raise _Swept(path)

    async def write(self, chunk: bytes) -> None:
        if len(chunk) >= _THREAD_THRESHOLD:
            await asyncio.to_thread(self._write, chunk)
        else:
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def finish(self) -> None:
        """Flushes the bytes to disk. The file stays open, and locked, until discard(): through validation and
        placing, so that no replica's sweep takes it for a dead upload's."""
        await asyncio.to_thread(self._finish)

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def discard(self) -> None:
        """Closes the file (letting go of its lock) and removes it if it is still staged (not placed); safe to call
        more than once."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Swept(Exception):
    """A staged file was removed between its creation and its lock."""


def _still_at(path: Path, descriptor: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _remove_unless_locked(path: Path) -> None:
    with open(path, "rb") as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # an upload in progress holds it
        path.unlink()


class BlobStore:
    """Files under root/<sha256[:2]>/<sha256>; uploads are staged in root/.incoming on the same file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"

    def open(self) -> None:
        """Creates the directories and removes staged files left by a process that died mid-upload.

        Replicas may share the directory: a staged file counts as left over when no upload holds its lock, which
        a process that dies lets go of (see StagedFile), so an upload in progress on another replica keeps its file.
        """
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():
            with contextlib.suppress(OSError):
                _remove_unless_locked(leftover)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def stored_before(self, cutoff: float) -> list[str]:
        """The sha256 of every stored file last modified before `cutoff` (a time.time() value).

        Only files at their content address count; anything else in the directory is left alone.
        """
        found = []
        for shard in self.root.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for entry in shard.iterdir():
                if not (SHA256_HEX.fullmatch(entry.name) and entry.name.startswith(shard.name)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        found.append(entry.name)
        return sorted(found)

    def stage(self) -> StagedFile:
        """A new empty temporary file for one upload, locked by it."""
        for _ in range(3):
            with contextlib.suppress(_Swept):
                return StagedFile(self.incoming / f"upload-{uuid.uuid4().hex}.part")
        return StagedFile(self.incoming / f"upload-{uuid.uuid4().hex}.part")  # a fourth sweep in a row raises

    async def place(self, staged: StagedFile, sha256: str) -> None:
        """Moves a finished staged file to its content address (atomically; identical bytes may already be there)."""
        await asyncio.to_thread(self._place, staged.path, self.path(sha256))

    @staticmethod
    def _place(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def remove(self, sha256: str) -> None:
        await asyncio.to_thread(self._remove, self.path(sha256))

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    async def read(self, sha256: str, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        """Opens the file now (FileNotFoundError if missing) and returns an iterator over its chunks."""
        handle = await asyncio.to_thread(open, self.path(sha256), "rb")
        return self._chunks(handle, chunk_bytes)

    @staticmethod
    async def _chunks(handle: BinaryIO, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                yield chunk
        finally:
            handle.close()

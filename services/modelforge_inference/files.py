"""ModelFileCache: model files on local disk, named by their sha256, fetched from the registry when missing.

A file is downloaded (DownloadModelVersion) into a temporary file in the cache directory, checked against the
version's size and sha256 (hashed off the event loop), and moved into place with ``os.replace``: a file under its
final name was whole and verified when it arrived. A file held (or found in the directory at start) is hashed
again before each session is built from it, and downloaded again if it changed on disk. A download that does not
verify leaves nothing behind and raises :class:`ModelFileCorrupt` (UNAVAILABLE: retrying may succeed).
Concurrent requests for one sha256 share one download.

The directory holds at most ``max_bytes``: before a download, least recently used files are deleted until the new
one fits. A file that is *pinned* (:meth:`ModelFileCache.pinned`, held while an ONNX Runtime session is created
from it) is never deleted; if pinned files alone exceed the bound, the cache overshoots it until they are
unpinned, rather than fail a load. Sessions read the whole file when they are created, so a file may go once
its session exists.

The directory belongs to one process at a time (a lock on it, held until :meth:`ModelFileCache.close`): a second
one would delete the first's downloads in progress as leftovers, and evict files it is about to read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from opentelemetry.util.types import AttributeValue

from modelforge._convert import hash_file
from modelforge.registry.v1 import registry_pb2_grpc
from modelforge_inference.domain import ResolvedModel
from modelforge_inference.registry_client import ModelFileCorrupt, RegistryClient
from modelforge_server import errors, locks, telemetry
from modelforge_server.flights import SingleFlight
from modelforge_server.settings import SettingsError

__all__ = ["ModelDirectoryInUse", "ModelFileCache", "ModelFileCacheFailed", "ModelFileCorrupt", "ModelFileTooLarge"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARTIAL = ".part"
_EVICTED = ".evicted"


class ModelDirectoryInUse(SettingsError):
    """Another process holds the model file cache's directory: the process cannot start until it gets one of its own."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            f"the model file cache {directory} is in use by another inference process; give each process its own "
            "MODELFORGE_MODEL_DIR (or MODELFORGE_DATA_DIR)"
        )


class ModelFileTooLarge(errors.ResourceExhausted):
    reason = "MODEL_FILE_TOO_LARGE"

    def __init__(self, model: ResolvedModel, max_bytes: int) -> None:
        super().__init__(
            f"{model.name}:{model.version} is {model.size_bytes} bytes, more than the model file cache holds "
            f"({max_bytes} bytes, MODELFORGE_MODEL_CACHE_BYTES); raise that limit to serve it",
            model=model.name,
            version=str(model.version),
        )


class ModelFileCacheFailed(errors.Unavailable):
    reason = "MODEL_FILE_CACHE_FAILED"

    def __init__(self, model: ResolvedModel, directory: Path, exc: OSError) -> None:
        super().__init__(
            f"could not store the file of {model.name}:{model.version} in {directory}: {exc.strerror or exc}; "
            "check the disk of the inference server",
            model=model.name,
            version=str(model.version),
        )


def _write_and_hash(file: BinaryIO, digest: Any, chunk: bytes) -> None:
    file.write(chunk)
    digest.update(chunk)


def _finish(file: BinaryIO, partial: Path, final: Path) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(partial, final)


def _discard(file: BinaryIO | None, partial: Path) -> None:
    """Removes a download that will not be kept. Closing may fail the way the write before it did (a full disk
    cannot take the buffered rest either); the file goes all the same."""
    try:
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
    finally:
        try:
            partial.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the partial download %s: %s", partial, exc)


def _disk_full(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # renamed out of the cache already: the next start removes it
            log.warning("could not delete the evicted model file %s: %s", path, exc)


class ModelFileCache:
    """Verified model files on local disk, by sha256, bounded in size, least recently used evicted first.

    Args:
        registry: A RegistryServiceStub on a grpc.aio channel.
        directory: Where the files live; created if missing, and locked for this cache until :meth:`close`.
            Files in it named by a sha256 are adopted (and verified when first used), leftovers of interrupted
            downloads are removed. This scan runs in the constructor, once, before serving.
        max_bytes: The most bytes of files kept (pinned files aside).
        stall_seconds: The longest a download waits for the registry's next message before it fails.
    """

    def __init__(
        self,
        registry: registry_pb2_grpc.RegistryServiceStub,
        directory: Path,
        max_bytes: int,
        *,
        stall_seconds: float = 10.0,
    ) -> None:
        self._registry = RegistryClient(registry, call_timeout=stall_seconds)
        self._directory = Path(directory)
        self._max_bytes = max_bytes
        self._files: collections.OrderedDict[str, int] = collections.OrderedDict()  # sha256 -> size, LRU first
        self._pins: collections.Counter[str] = collections.Counter()
        self._reserved = 0  # bytes of downloads in progress
        self._flights: SingleFlight[str, Path] = SingleFlight()
        self._tracer = telemetry.tracer(__name__)
        self._unlock = self._lock()
        try:
            self._scan()
        except BaseException:
            self._unlock()
            raise

    def close(self) -> None:
        """Lets go of the directory, for another process (or cache) to take over."""
        self._unlock()

    def _lock(self) -> weakref.finalize[Any, Any]:
        """Locks the directory for this cache (until close, or until the cache is garbage collected, or this
        process ends, however it ends).

        Raises:
            ModelDirectoryInUse: another process (or another cache of this one) holds it.
        """
        self._directory.mkdir(parents=True, exist_ok=True)
        descriptor = locks.hold(self._directory)
        if descriptor is None:
            raise ModelDirectoryInUse(self._directory)
        return weakref.finalize(self, os.close, descriptor)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the files held (downloads in progress excluded)."""
        return sum(self._files.values())

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._files

    def files(self) -> list[str]:
        """The sha256 of every file held, least recently used first."""
        return list(self._files)

    def is_pinned(self, sha256: str) -> bool:
        return self._pins[sha256] > 0

    # -- use -------------------------------------------------------------------------------------------------

    async def path_for(self, model: ResolvedModel) -> Path:
        """The local path of model's file, downloading it first if needed. Not pinned: see :meth:`pinned`.

        Raises:
            ModelFileCorrupt: the downloaded bytes do not match the version's size or sha256.
            ModelFileTooLarge: the file alone is larger than the cache.
            RegistryNotFound, RegistryUnavailable: from the registry.
            ModelFileCacheFailed: the local disk failed.
        """
        async with self.pinned(model) as path:
            return path

    @contextlib.asynccontextmanager
    async def pinned(self, model: ResolvedModel) -> AsyncIterator[Path]:
        """``async with cache.pinned(model) as path:`` the file at path is not evicted inside the block."""
        sha256 = model.sha256
        self._pins[sha256] += 1
        try:
            yield await self._ensure(model)
        finally:
            self._pins[sha256] -= 1
            if self._pins[sha256] <= 0:
                del self._pins[sha256]
                if sha256 in self._files:
                    self._files.move_to_end(sha256)  # its use ends now: it is the most recently used
                if self.used_bytes + self._reserved > self._max_bytes:
                    try:
                        await self._make_room(keep=sha256)  # back within the bound now that others may go
                    except OSError as exc:  # the caller's file is there all the same; the next download tries again
                        log.warning("could not evict model files from %s: %s", self._directory, exc)

    async def _ensure(self, model: ResolvedModel) -> Path:
        sha256 = model.sha256
        if not _SHA256.fullmatch(sha256):
            raise ModelFileCorrupt(model, f"{sha256!r} is not a lowercase hex sha256")
        path = self._directory / sha256
        if sha256 in self._files:
            if path.is_file():
                self._files.move_to_end(sha256)
                return await self._flights.run(sha256, lambda: self._verified(model, path))
            log.warning("model file %s vanished from %s; downloading it again", sha256, self._directory)
            del self._files[sha256]
        return await self._flights.run(sha256, lambda: self._download(model))

    async def _verified(self, model: ResolvedModel, path: Path) -> Path:
        """The file at ``path`` if its bytes still hash to its name; else it is downloaded again.

        A file held is checked each time a session is built from it (ONNX Runtime reads it whole then anyway;
        hashing adds about 0.6 s per GB on a 2-core machine here):
        a file changed on disk, by a failing disk or by hand, would otherwise load as a model with other weights
        and answer wrongly, or fail every load, across restarts. Files just downloaded were checked as they came.
        """
        try:
            actual, size = await asyncio.to_thread(hash_file, path)
        except FileNotFoundError:
            actual, size = "", 0
        except OSError as exc:  # a failing disk: as a download that cannot be stored
            raise ModelFileCacheFailed(model, self._directory, exc) from exc
        if actual == model.sha256:
            return path
        log.warning(
            "model file %s in %s changed on disk (%d bytes hashing to %s); downloading it again",
            model.sha256,
            self._directory,
            size,
            actual or "nothing: it is gone",
        )
        self._files.pop(model.sha256, None)
        _unlink([path])
        return await self._download(model)

    # -- filling and evicting --------------------------------------------------------------------------------

    async def _download(self, model: ResolvedModel) -> Path:
        size = model.size_bytes
        if size > self._max_bytes:
            raise ModelFileTooLarge(model, self._max_bytes)
        self._reserved += size
        attributes: dict[str, AttributeValue] = {
            "modelforge.model": model.name,
            "modelforge.version": model.version,
            "modelforge.bytes": size,
        }
        try:
            with self._tracer.start_as_current_span("model download", attributes=attributes):
                try:
                    return await self._fetch(model)
                except ModelFileCacheFailed as exc:
                    if not _disk_full(exc.__cause__) or not await self._room_on_disk(model):
                        raise
                    return await self._fetch(model)  # once more, with unused files gone
        finally:
            self._reserved -= size

    async def _room_on_disk(self, model: ResolvedModel) -> bool:
        """After a download found the disk full before the cache's bound: evicts unused files, least recently used
        first, until the disk has room for ``model``'s file; whether any went (and a new try is worth it)."""
        try:
            needed = model.size_bytes - shutil.disk_usage(self._directory).free
            evicted = await self._make_room(beyond=max(needed, 1))
        except OSError as exc:
            log.warning("could not evict model files from %s: %s", self._directory, exc)
            return False
        if evicted:
            log.warning(
                "the disk of %s is full before the model file cache's bound (MODELFORGE_MODEL_CACHE_BYTES): "
                "evicted %d unused files to store the file of %s:%d",
                self._directory,
                evicted,
                model.name,
                model.version,
            )
        return evicted > 0

    async def _fetch(self, model: ResolvedModel) -> Path:
        size = model.size_bytes
        try:
            await self._make_room()
        except OSError as exc:
            raise ModelFileCacheFailed(model, self._directory, exc) from exc
        final = self._directory / model.sha256
        partial = self._directory / f".{model.sha256}.{secrets.token_hex(4)}{_PARTIAL}"
        digest = hashlib.sha256()
        file: BinaryIO | None = None
        try:
            file = await asyncio.to_thread(partial.open, "wb")
            received = 0
            async with contextlib.aclosing(self._registry.download(model)) as chunks:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise ModelFileCorrupt(model, f"more than the {size} bytes recorded arrived")
                    await asyncio.to_thread(_write_and_hash, file, digest, chunk)
            if received != size:
                raise ModelFileCorrupt(model, f"{received} bytes arrived, {size} recorded")
            if digest.hexdigest() != model.sha256:
                raise ModelFileCorrupt(model, f"the bytes hash to {digest.hexdigest()}, not {model.sha256}")
            await asyncio.to_thread(_finish, file, partial, final)
        except BaseException as exc:
            await asyncio.shield(asyncio.to_thread(_discard, file, partial))  # never raises
            if isinstance(exc, OSError):
                raise ModelFileCacheFailed(model, self._directory, exc) from exc
            raise
        self._files[model.sha256] = size
        log.info("stored the file of %s:%d (%d bytes) as %s", model.name, model.version, size, final)
        return final

    async def _make_room(self, keep: str = "", beyond: int = 0) -> int:
        """Evicts least recently used, unpinned files until the downloads in progress fit (or nothing can go), and
        `beyond` bytes more (a disk fuller than the bound allows for); returns how many files went.

        Each victim is renamed out of its sha256 name here, on the loop and before any await, and deleted on a
        thread after: a download of the same file that starts meanwhile writes a new file under that name, which
        the deletion cannot reach. (Renaming is a metadata change; freeing a large file's blocks is what takes
        time.)

        keep: a file not to delete, the one whose path a caller is about to get.

        Raises:
            OSError: a victim could not be renamed; it stays, and is counted, as do the files after it.
        """
        excess = self.used_bytes + self._reserved - self._max_bytes
        if beyond:
            excess = max(excess, 0) + beyond
        victims: list[str] = []
        for sha256, size in self._files.items():
            if excess <= 0:
                break
            if sha256 == keep or self._pins[sha256] > 0 or sha256 in self._flights:
                continue
            victims.append(sha256)
            excess -= size
        doomed: list[Path] = []
        try:
            for sha256 in victims:
                evicted = self._directory / f".{sha256}.{secrets.token_hex(4)}{_EVICTED}"
                with contextlib.suppress(FileNotFoundError):  # gone already: nothing left to delete
                    os.replace(self._directory / sha256, evicted)
                    doomed.append(evicted)
                del self._files[sha256]
                log.info("evicted model file %s from %s", sha256, self._directory)
        finally:
            if doomed:
                await asyncio.shield(asyncio.to_thread(_unlink, doomed))
        if excess > 0 and not beyond:
            log.warning(
                "model file cache over its %d bytes by %d: the remaining files are in use", self._max_bytes, excess
            )
        return len(victims)

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for entry in os.scandir(self._directory):
            if entry.name.endswith((_PARTIAL, _EVICTED)):  # an interrupted download or eviction
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            elif _SHA256.fullmatch(entry.name) and entry.is_file():
                stat = entry.stat()
                found.append((stat.st_mtime, entry.name, stat.st_size))
        for _, sha256, size in sorted(found):
            self._files[sha256] = size
        excess = self.used_bytes - self._max_bytes
        while excess > 0 and self._files:
            sha256, size = self._files.popitem(last=False)
            _unlink([self._directory / sha256])
            log.info("evicted model file %s from %s", sha256, self._directory)
            excess -= size

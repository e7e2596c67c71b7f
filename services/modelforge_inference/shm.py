"""System shared memory regions that V2 clients on the server's host register, so tensors skip the socket.

A client creates a POSIX shared memory object, registers a slice of it under a name (SystemSharedMemoryRegister),
and then names that region, an offset and a byte size in an input's or requested output's parameters. Inputs
are read straight from the mapping; outputs are written into it, and the answer carries only their metadata.
This is the Open Inference Protocol's system shared memory extension, as Triton serves it; ModelForge answers
it only when started with ``MODELFORGE_ALLOW_CLIENT_SHM=true``, since a registered key lets a client read and
write any shared memory object the server's user can open.

A region's mapping lives as long as the last view into it: unregistering a region that a running request still
reads or writes only forgets its name, and the memory is unmapped when that request lets go of it.

Touching a mapping past the end of its object raises SIGBUS, which would end the server: a region keeps its
object open, and every slice checks first that the object still holds the region (a client may truncate it after
registering), refusing the request if it does not. A client that cuts it short while a request is using it can
still end the server; that is why the extension is off unless the clients on the host are trusted.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

from modelforge_inference.errors import (
    InvalidSharedMemoryRegion,
    SharedMemoryKeyNotFound,
    SharedMemoryOff,
    SharedMemoryRegionExists,
    SharedMemoryRegionNotFound,
    SharedMemoryRegionsFull,
)

__all__ = ["Region", "SharedMemoryRegions"]

# Where Linux keeps POSIX shared memory objects: shm_open("/name") opens /dev/shm/name.
SHM_DIRECTORY = Path("/dev/shm")


def region_limit() -> int:
    """How many regions a server holds at once: each keeps two file descriptors (its object's, and its mapping's),
    so at most an eighth of the process's descriptors, and 1,024 at most, are theirs; sockets and model files keep
    the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 8))


@dataclass(frozen=True)
class Region:
    """A registered slice of a shared memory object: ``byte_size`` bytes from ``offset`` of object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    memory: memoryview = field(repr=False, compare=False)
    descriptor: int = field(repr=False, compare=False)  # the object, open, to check that it still holds the region


class SharedMemoryRegions:
    """The regions registered on this server, by name. Used from the event loop only."""

    def __init__(self, *, enabled: bool, directory: Path = SHM_DIRECTORY, max_regions: int | None = None) -> None:
        self.enabled = enabled
        self._directory = directory
        self._regions: dict[str, Region] = {}
        self._max_regions = region_limit() if max_regions is None else max_regions

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Maps ``byte_size`` bytes from ``offset`` of the shared memory object ``key`` under ``name``.

        Raises:
            SharedMemoryOff: the server does not take client shared memory.
            InvalidSharedMemoryRegion: an empty name, a malformed key, a zero size, or a slice past the object's end.
            SharedMemoryRegionExists: ``name`` is registered already.
            SharedMemoryKeyNotFound: no shared memory object ``key`` exists on this host.
            SharedMemoryRegionsFull: the server holds as many regions as it may, or has no file descriptor left.
        """
        self._check_enabled()
        if not name:
            raise InvalidSharedMemoryRegion(name, "name is required")
        if name in self._regions:
            raise SharedMemoryRegionExists(name, self._regions[name].key)
        if len(self._regions) >= self._max_regions:
            raise SharedMemoryRegionsFull(
                name, f"{len(self._regions)} regions are registered, the most this server holds"
            )
        path = self._directory / _object_name(name, key)
        if byte_size <= 0:
            raise InvalidSharedMemoryRegion(name, "byte_size must be more than 0")
        try:
            # Not through a link: anyone may put one in /dev/shm, and it would give requests the server's access to
            # whatever file it names.
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SharedMemoryKeyNotFound(name, key) from None
        except PermissionError:
            raise InvalidSharedMemoryRegion(
                name, f"the server may not open shared memory object {key!r} for reading and writing"
            ) from None
        except OSError as exc:  # a directory, a device, ...: nothing a region can map
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise SharedMemoryRegionsFull(name, "the server has no file descriptor left to open it") from None
            if exc.errno == errno.ELOOP:
                raise InvalidSharedMemoryRegion(
                    name, f"shared memory object {key!r} is a symbolic link; register the object itself"
                ) from None
            raise InvalidSharedMemoryRegion(
                name, f"shared memory object {key!r} cannot be opened as one: {exc.strerror}"
            ) from None
        try:
            size = os.fstat(descriptor).st_size
            if offset + byte_size > size:
                raise InvalidSharedMemoryRegion(
                    name,
                    f"offset {offset} + byte_size {byte_size} runs past the end of shared memory object {key!r}, "
                    f"which holds {size} bytes",
                )
            # mmap offsets must be a multiple of the allocation granularity: map from the one at or below offset.
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapping = mmap.mmap(descriptor, offset + byte_size - start, offset=start)
            except (OSError, OverflowError) as exc:  # more than the address space or memory map allows
                why = getattr(exc, "strerror", None) or exc
                raise InvalidSharedMemoryRegion(
                    name, f"{byte_size} bytes of shared memory object {key!r} cannot be mapped: {why}"
                ) from None
        except BaseException:
            os.close(descriptor)
            raise
        view = memoryview(mapping)[offset - start : offset - start + byte_size]
        region = Region(name, key, offset, byte_size, view, descriptor)
        self._regions[name] = region
        return region

    def unregister(self, name: str) -> None:
        """Forgets region ``name``, or every region when ``name`` is empty; an unknown name is no error."""
        self._check_enabled()
        names = list(self._regions) if not name else [name] if name in self._regions else []
        for each in names:
            os.close(self._regions.pop(each).descriptor)  # the mapping goes with the last view into it

    def close(self) -> None:
        """Forgets every region (at shutdown); views that requests still hold stay mapped."""
        while self._regions:
            os.close(self._regions.popitem()[1].descriptor)

    def status(self, name: str) -> list[Region]:
        """Region ``name``, or every region when ``name`` is empty.

        Raises:
            SharedMemoryRegionNotFound: no region ``name`` is registered.
        """
        if not name:
            self._check_enabled()
            return list(self._regions.values())
        return [self._find(name)]

    def slice(self, name: str, offset: int, byte_size: int, *, tensor: str) -> memoryview:
        """``byte_size`` bytes from ``offset`` within region ``name``, for tensor ``tensor`` (to name in errors).

        The view keeps the mapping alive while the caller holds it, even if the region is unregistered meanwhile.

        Raises:
            SharedMemoryRegionNotFound: no region ``name`` is registered.
            InvalidSharedMemoryRegion: the slice runs past the region, or the object no longer holds the region.
        """
        region = self._find(name)
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidSharedMemoryRegion(
                name,
                f"tensor {tensor!r} asks for bytes {offset} to {offset + byte_size} but the region holds "
                f"{region.byte_size}; set shared_memory_offset and shared_memory_byte_size within it",
            )
        size = os.fstat(region.descriptor).st_size
        if size < region.offset + region.byte_size:
            raise InvalidSharedMemoryRegion(
                name,
                f"shared memory object {region.key!r} was cut to {size} bytes after the region was registered over "
                f"bytes {region.offset} to {region.offset + region.byte_size}; unregister the region and register "
                "it again",
            )
        return region.memory[offset : offset + byte_size]

    def _find(self, name: str) -> Region:
        self._check_enabled()
        region = self._regions.get(name)
        if region is None:
            raise SharedMemoryRegionNotFound(name)
        return region

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryOff()


_NAME_MAX = 255  # bytes in a file name under /dev/shm


def _object_name(region: str, key: str) -> str:
    """The file name under /dev/shm of POSIX shared memory key ``key`` ("/name" or "name")."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > _NAME_MAX:
        raise InvalidSharedMemoryRegion(
            region, f"key {key!r} is not a POSIX shared memory name; use '/name' as given to shm_open"
        )
    return name

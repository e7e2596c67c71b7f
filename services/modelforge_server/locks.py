"""Exclusive locks a process holds on a path through an open descriptor (flock): released when the descriptor is
closed, or when the process ends, however it ends, so a lock never outlives its holder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["hold"]


def hold(path: Path) -> int | None:
    """A descriptor holding an exclusive lock on `path` (a directory, or a file, created if missing; close the
    descriptor to let go); None when another open descriptor, of this process or another, holds the lock.

    Raises:
        OSError: the path cannot be opened or created.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY if path.is_dir() else os.O_RDWR | os.O_CREAT
    descriptor = os.open(path, flags, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor

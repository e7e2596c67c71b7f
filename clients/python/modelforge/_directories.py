"""The directories the SDK makes for a file it writes (a download, a job's result), so that a write that fails or
is interrupted removes them again and leaves the file system as it found it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MadeDirectories"]


class MadeDirectories:
    """The missing directories above a target file: made by :meth:`make`, removed by :meth:`remove`."""

    def __init__(self) -> None:
        self._made: list[Path] = []  # outermost first

    def make(self, target: Path) -> None:
        """Makes every missing directory above ``target``; one made meanwhile by something else is not ours."""
        missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                continue
            self._made.append(directory)

    def remove(self) -> None:
        """Removes the directories made, innermost first, stopping at one that something else has put a file in."""
        for directory in reversed(self._made):
            try:
                directory.rmdir()
            except OSError:
                break
        self._made.clear()

"""A model reference as a request carried it: a name plus a version number, an alias, or neither.

The registry and the jobs service hold this plain value and check its fields themselves, so that a bad one is
answered with INVALID_ARGUMENT naming the request field. The SDK's ``modelforge.ModelRef`` is the client-side
twin: it validates as it is built and raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelRef"]


@dataclass(frozen=True)
class ModelRef:
    """A model name plus a version number, an alias, or neither (the newest READY version)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name

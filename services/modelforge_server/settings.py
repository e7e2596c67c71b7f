"""Settings from MODELFORGE_* environment variables, cast by annotation and checked once at start."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "MODELFORGE_"
MiB = 1024 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

S = TypeVar("S")


class SettingsError(ValueError):
    """A MODELFORGE_* variable is malformed; the message names the variable and what it takes."""


@dataclass(frozen=True)
class ServerSettings:
    """What every service process reads; each service subclasses it with its own port and fields."""

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path = Path(".modelforge")
    database_url: str | None = None
    redis_url: str | None = None
    log_level: str = "INFO"
    max_message_bytes: int = 64 * MiB
    grace_seconds: float = 10.0
    chunk_bytes: int = 1 * MiB
    # The event loop of a service process: "auto" (uvloop when installed, else asyncio's), "uvloop" or "asyncio".
    event_loop: str = "auto"
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def from_env(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Builds the settings dataclass `cls` from MODELFORGE_<FIELD> variables; overrides win over the environment."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        key = PREFIX + f.name.upper()
        raw = env.get(key)
        if raw is None:
            continue
        values[f.name] = _cast(key, raw, hints[f.name])
    return cls(**values)


def _cast(key: str, raw: str, hint: Any) -> Any:
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    text = raw.strip()
    if optional and text == "":
        return None
    try:
        if hint is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected one of true/false, 1/0, yes/no, on/off")
        if hint is int:
            return _parse_int(text)
        if hint is float:
            return float(text)
        if hint is Path:
            if not text:
                raise ValueError("expected a path")
            return Path(text).expanduser()
        if typing.get_origin(hint) is dict:
            return _parse_mapping(text)
        if typing.get_origin(hint) is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        return text
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r} is invalid: {exc}") from None


_SUFFIXES = {"KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "K": 1000, "M": 1000**2, "G": 1000**3}


def _parse_int(text: str) -> int:
    """Accepts plain integers, underscores, and byte suffixes such as 64MiB."""
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)].strip().replace("_", "")) * factor
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError("expected an integer (suffixes KiB, MiB, GiB allowed)") from None


def _parse_mapping(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected comma-separated key=value pairs")
        result[key.strip()] = value.strip()
    return result

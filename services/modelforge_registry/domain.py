"""The registry's vocabulary: models, versions, aliases, signatures and events, as plain dataclasses."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")

# Matched with fullmatch (a trailing newline does not pass).
MODEL_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Labels follow modelforge_server.labels, as on every service.
DESCRIPTION_MAX = 16_384  # characters; a longer model card belongs in a file, named by a label
VERSION_LABEL_MAX = 128  # characters: a semver, a git commit, a run id
# Text a version keeps from its ONNX file (doc_string, metadata_props, names), in UTF-8 bytes: it travels in every
# answer that holds the version, so it must stay far below the message limit.
ONNX_TEXT_MAX = 4 * 1024 * 1024


class VersionState(enum.StrEnum):
    READY = "READY"
    ARCHIVED = "ARCHIVED"


class EventType(enum.StrEnum):
    WATCH_STARTED = "WATCH_STARTED"
    MODEL_CREATED = "MODEL_CREATED"
    MODEL_UPDATED = "MODEL_UPDATED"
    MODEL_DELETED = "MODEL_DELETED"
    VERSION_CREATED = "VERSION_CREATED"
    VERSION_UPDATED = "VERSION_UPDATED"
    VERSION_ARCHIVED = "VERSION_ARCHIVED"
    VERSION_RESTORED = "VERSION_RESTORED"
    VERSION_DELETED = "VERSION_DELETED"
    ALIAS_SET = "ALIAS_SET"
    ALIAS_DELETED = "ALIAS_DELETED"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output; dtype is a DataType name without prefix ("FLOAT32"); -1 marks a dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim_names: tuple[str, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


@dataclass(frozen=True)
class OperatorSet:
    domain: str
    version: int


@dataclass(frozen=True)
class OnnxInfo:
    """Facts read from an ONNX file."""

    ir_version: int = 0
    opset_imports: tuple[OperatorSet, ...] = ()
    producer_name: str = ""
    producer_version: str = ""
    graph_name: str = ""
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    labels: dict[str, str]
    aliases: dict[str, int]
    latest_version: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    state: VersionState
    sha256: str
    size_bytes: int
    signature: Signature
    onnx: OnnxInfo
    description: str
    labels: dict[str, str]
    version_label: str
    aliases: tuple[str, ...]
    create_time: datetime


@dataclass(frozen=True)
class NewModel:
    name: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelChanges:
    """The fields an UpdateModel replaces; None leaves a field as it is."""

    description: str | None = None
    labels: dict[str, str] | None = None


@dataclass(frozen=True)
class VersionChanges:
    """The fields an UpdateModelVersion replaces; None leaves a field as it is."""

    description: str | None = None
    labels: dict[str, str] | None = None
    version_label: str | None = None


@dataclass(frozen=True)
class UploadHeader:
    """What an upload announces before its bytes."""

    model: str
    sha256: str
    size_bytes: int
    create_model: bool = False
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    version_label: str = ""


@dataclass(frozen=True)
class StoredFile:
    """A validated file ready to become a version: where it is staged and what it holds."""

    sha256: str
    size_bytes: int
    signature: Signature
    onnx: OnnxInfo


@dataclass(frozen=True)
class ModelFilter:
    name_prefix: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; last_key is the sort key of the last item, set only when more items follow."""

    items: list[T]
    last_key: list[object] | None = None


def model_key(model: Model) -> list[object]:
    """The sort key of a model in listings, as page tokens hold it."""
    return [model.name]


def version_key(version: ModelVersion) -> list[object]:
    """The sort key of a version in its model's listing (newest first), as page tokens hold it."""
    return [version.version]


@dataclass(frozen=True)
class Inventory:
    """What the database holds, counted: the registry's gauges."""

    models: int
    versions: dict[VersionState, int]
    blobs: int
    blob_bytes: int


@dataclass(frozen=True)
class ModelEvent:
    type: EventType
    model: str = ""
    version: int = 0
    alias: str = ""
    event_time: datetime | None = None

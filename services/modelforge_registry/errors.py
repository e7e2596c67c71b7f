"""The registry's specific errors; each is one of modelforge_server's kinds and builds its own message."""

from __future__ import annotations

from modelforge_server.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


class InvalidModelName(InvalidArgument):
    reason = "INVALID_MODEL_NAME"

    def __init__(self, name: str, field: str = "name") -> None:
        super().__init__(
            f"model name {name!r} is invalid: use 1 to 63 characters of a-z, 0-9 and '-', "
            "starting with a letter and not ending with '-'",
            field=field,
            model=name,
        )


class InvalidAlias(InvalidArgument):
    reason = "INVALID_ALIAS"

    def __init__(self, alias: str, field: str = "alias") -> None:
        super().__init__(
            f"alias {alias!r} is invalid: use 1 to 63 characters of a-z, 0-9, '-' and '_', starting with a letter",
            field=field,
            alias=alias,
        )


class InvalidVersionNumber(InvalidArgument):
    reason = "INVALID_VERSION"

    def __init__(self, version: int, field: str = "version") -> None:
        super().__init__(f"version must be a positive number, got {version}", field=field)


class InvalidUpdateMask(InvalidArgument):
    reason = "INVALID_UPDATE_MASK"

    def __init__(self, path: str, allowed: tuple[str, ...]) -> None:
        if not path:
            message = f"update_mask is required: name the fields to change ({', '.join(allowed)}, or '*')"
        else:
            message = f"update_mask names {path!r}, which cannot be changed; use {', '.join(allowed)}, or '*'"
        super().__init__(message, field="update_mask")


class ModelNotFound(NotFound):
    reason = "MODEL_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r}; `modelforge models ls` shows the names", model=name)


class ModelExists(AlreadyExists):
    reason = "MODEL_EXISTS"

    def __init__(self, name: str) -> None:
        super().__init__(f"a model named {name!r} exists already; choose another name", model=name)


class VersionNotFound(NotFound):
    reason = "VERSION_NOT_FOUND"

    def __init__(self, model: str, version: int) -> None:
        super().__init__(
            f"model {model!r} has no version {version}; `modelforge models ls {model}` lists its versions",
            model=model,
            version=str(version),
        )


class AliasNotFound(NotFound):
    reason = "ALIAS_NOT_FOUND"

    def __init__(self, model: str, alias: str) -> None:
        super().__init__(
            f"model {model!r} has no alias {alias!r}; `modelforge models show {model}` lists its aliases",
            model=model,
            alias=alias,
        )


class NoReadyVersion(NotFound):
    reason = "NO_READY_VERSION"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} has no READY version; upload one or restore an archived one", model=model)


class ModelHasVersions(FailedPrecondition):
    reason = "MODEL_HAS_VERSIONS"

    def __init__(self, name: str, count: int) -> None:
        super().__init__(
            f"model {name!r} still has {count} version(s); delete them first, or pass force "
            "(`modelforge models rm --force`) to delete everything",
            model=name,
        )


class VersionHasAliases(FailedPrecondition):
    reason = "VERSION_HAS_ALIASES"

    def __init__(self, model: str, version: int, aliases: list[str]) -> None:
        super().__init__(
            f"version {version} of {model!r} is the target of alias(es) {', '.join(aliases)}; "
            "move or delete them first",
            model=model,
            version=str(version),
            aliases=",".join(aliases),
        )


class VersionArchived(FailedPrecondition):
    reason = "VERSION_ARCHIVED"

    def __init__(self, model: str, version: int) -> None:
        super().__init__(
            f"version {version} of {model!r} is ARCHIVED; restore it before pointing an alias at it",
            model=model,
            version=str(version),
        )


class ModelTooLarge(ResourceExhausted):
    reason = "MODEL_TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the model file passes the registry's limit of {limit} bytes (at least {size} bytes); "
            "the operator can raise MODELFORGE_MAX_MODEL_BYTES",
            limit=str(limit),
        )


class InvalidOnnx(InvalidArgument):
    reason = "INVALID_ONNX"

    def __init__(self, why: str) -> None:
        super().__init__(f"the file is not a valid ONNX model: {why}")


class NotServable(InvalidOnnx):
    """A model that no inference replica could ever serve, whatever the request: the runtime check's refusal, from
    the model's signature."""

    reason = "MODEL_NOT_SERVABLE"

    def __init__(self, why: str) -> None:
        InvalidArgument.__init__(
            self,
            f"ModelForge cannot serve this model: {why} (a registry with MODELFORGE_RUNTIME_CHECK=false stores it, "
            "for another runtime)",
        )


class ExternalDataRefused(InvalidArgument):
    reason = "EXTERNAL_DATA"

    def __init__(self, tensor: str, location: str, escapes: bool) -> None:
        where = "a path outside the model's directory" if escapes else "a separate file"
        super().__init__(
            f"tensor {tensor!r} keeps its data in {where} ({location!r}); the registry stores single-file models: "
            "save the model with all tensors inside it (onnx.save(model, path, save_as_external_data=False))",
            tensor=tensor,
            location=location,
        )


class ModelFileMissing(DataLoss):
    reason = "MODEL_FILE_MISSING"

    def __init__(self, model: str, version: int, sha256: str) -> None:
        super().__init__(
            f"the file of {model}:{version} (sha256 {sha256}) is missing from the registry's blob store: restore the "
            "blob store from a backup, or push the model again as a new version",
            model=model,
            version=str(version),
            sha256=sha256,
        )


class BlobStoreFailed(Unavailable):
    reason = "BLOB_STORE_FAILED"

    def __init__(self, doing: str, why: str) -> None:
        super().__init__(
            f"the registry could not {doing} in its blob store ({why}); check the disk and the permissions of the "
            "blob directory (MODELFORGE_BLOB_DIR), then retry"
        )


class DatabaseUnavailable(Unavailable):
    reason = "DATABASE_UNAVAILABLE"

    def __init__(self, detail: str = "") -> None:
        why = f" ({detail})" if detail else ""
        super().__init__(f"the registry cannot reach PostgreSQL right now{why}; retry later")


class WatchInterrupted(Unavailable):
    """A watch ended because events may have been missed: the registry's feed broke, or (`behind`, the number of
    events it fell behind) the watcher read too slowly."""

    reason = "WATCH_INTERRUPTED"

    def __init__(self, *, behind: int = 0) -> None:
        if behind:
            super().__init__(
                f"this watch fell {behind} events behind and was ended, so events were missed: read them as they "
                "come, then watch again"
            )
        else:
            super().__init__(
                "the registry lost its event feed from PostgreSQL, so events may have been missed; watch again"
            )


class ReplicaStopping(Unavailable):
    reason = "REPLICA_STOPPING"

    def __init__(self) -> None:
        super().__init__("this registry replica is shutting down; watch again (another replica will answer)")

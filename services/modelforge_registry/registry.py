"""The registry's behaviour: models, versions, aliases, uploads and downloads, over the store and the blob store."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from modelforge_registry import onnxfile
from modelforge_registry.blobs import STALE_SECONDS, BlobStore
from modelforge_registry.domain import (
    ALIAS_NAME,
    DESCRIPTION_MAX,
    MODEL_NAME,
    VERSION_LABEL_MAX,
    Model,
    ModelChanges,
    ModelEvent,
    ModelFilter,
    ModelVersion,
    NewModel,
    Page,
    StoredFile,
    UploadHeader,
    VersionChanges,
    VersionState,
)
from modelforge_registry.errors import (
    BlobStoreFailed,
    InvalidAlias,
    InvalidModelName,
    InvalidVersionNumber,
    ModelFileMissing,
    ModelTooLarge,
)
from modelforge_registry.events import EventHub
from modelforge_registry.metrics import RegistryMetrics
from modelforge_registry.store import RegistryStore
from modelforge_server import labels as labels_rules
from modelforge_server import telemetry
from modelforge_server.errors import ChecksumMismatch, InvalidArgument, SizeMismatch, checked_sha256, require
from modelforge_server.labels import InvalidLabel
from modelforge_server.metrics import Metrics
from modelforge_server.refs import ModelRef
from modelforge_server.serving_labels import bad_labels, serving_label

log = logging.getLogger("modelforge.registry")


def check_model_name(name: str, field: str = "name") -> str:
    if not MODEL_NAME.fullmatch(name):
        raise InvalidModelName(name, field)
    return name


def check_alias(alias: str, field: str = "alias") -> str:
    if not ALIAS_NAME.fullmatch(alias):
        raise InvalidAlias(alias, field)
    return alias


def check_labels(
    labels: dict[str, str] | None, field: str = "labels", *, serving: bool = True
) -> dict[str, str] | None:
    """Labels as every service takes them (modelforge_server.labels), and the serving labels
    (modelforge.io/max-batch-size ...) with values the inference service takes, only where `serving` (a version's
    labels: the inference service reads no model's)."""
    labels_rules.check_labels(labels, field)
    for key in labels or {}:
        if not serving and serving_label(key) is not None:
            raise InvalidLabel(
                key,
                "it configures serving, which is set per version: set it on a version (NAME:VERSION or NAME@ALIAS)",
                field,
            )
    if bad := bad_labels(labels or {}):
        raise InvalidLabel(bad[0].key, f"it configures serving and takes {bad[0].takes}, not {bad[0].value!r}", field)
    return labels


def check_text(text: str | None, field: str, maximum: int) -> None:
    """Refuses a description or version label longer than `maximum` characters (None: not being changed)."""
    if text is not None and len(text) > maximum:
        raise InvalidArgument(f"{field} has {len(text)} characters; at most {maximum} are allowed", field=field)


def check_version(version: int, field: str = "version") -> int:
    if version <= 0:
        raise InvalidVersionNumber(version, field)
    return version


class ModelRegistry:
    """Stores ONNX models as numbered, immutable versions with movable aliases."""

    def __init__(
        self,
        store: RegistryStore,
        blobs: BlobStore,
        events: EventHub,
        *,
        max_model_bytes: int,
        chunk_bytes: int,
        metrics: Metrics | None = None,
        runtime_check: bool = True,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._max_model_bytes = max_model_bytes
        # Files being validated at once: one of the largest size accepted, or several smaller ones.
        inspect = functools.partial(onnxfile.inspect_file, runtime_check=runtime_check)
        self._inspections = onnxfile.Inspections(max_model_bytes, inspect)
        self._chunk_bytes = chunk_bytes
        self._metrics = RegistryMetrics(
            metrics if metrics is not None else Metrics(process_collector=False), store.inventory
        )
        self._tracer = telemetry.tracer(__name__)

    async def ping(self) -> None:
        """Raises unless the database answers; the health check."""
        await self._store.ping()

    # Models

    async def create_model(self, new: NewModel) -> Model:
        check_model_name(new.name, "model.name")
        check_text(new.description, "model.description", DESCRIPTION_MAX)
        check_labels(new.labels, "model.labels", serving=False)
        return await self._store.create_model(new)

    async def get_model(self, name: str) -> Model:
        return await self._store.get_model(check_model_name(name))

    async def list_models(self, where: ModelFilter, *, limit: int, after: list[Any] | None) -> Page[Model]:
        labels_rules.check_labels(where.labels)  # a filter no model's labels can match is a mistake, said so
        return await self._store.list_models(where, limit=limit, after=_first(after))

    async def update_model(self, name: str, changes: ModelChanges) -> Model:
        check_model_name(name, "model.name")
        check_text(changes.description, "model.description", DESCRIPTION_MAX)
        check_labels(changes.labels, "model.labels", serving=False)
        return await self._store.update_model(name, changes)

    async def delete_model(self, name: str, *, force: bool) -> int:
        """Deletes the model; with force also its versions, aliases and the files nothing else uses."""
        count, unused = await self._store.delete_model(check_model_name(name), force=force)
        log.info("deleted model %s and %d version(s)", name, count)
        for sha256 in unused:
            await self._collect(sha256)
        return count

    # Versions

    async def upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> ModelVersion:
        """Receives, checks and stores a new version; on any failure (or cancellation) nothing is left behind.

        The announced size is checked against the size limit first, and enforced as bytes arrive; the sha256, and
        the ONNX file itself, are checked once all bytes are in; then the file moves into the blob store and the
        version row is inserted in one transaction. Every call counts once in
        ``modelforge_registry_uploads_total``, by its result.
        """
        try:
            version = await self._upload(header, chunks)
        except BaseException as exc:
            self._metrics.upload_ended(exc)
            raise
        self._metrics.upload_ended(None)
        return version

    async def _upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> ModelVersion:
        check_model_name(require(header.model, "header.model"), "header.model")
        check_text(header.description, "header.description", DESCRIPTION_MAX)
        check_text(header.version_label, "header.version_label", VERSION_LABEL_MAX)
        check_labels(header.labels, "header.labels")
        checked_sha256(header.sha256)
        if header.size_bytes == 0:
            raise InvalidArgument(
                "the file is empty (header.size_bytes is 0): push an ONNX model", field="header.size_bytes"
            )
        if header.size_bytes < 0:
            raise InvalidArgument("header.size_bytes must be the file's size in bytes", field="header.size_bytes")
        if header.size_bytes > self._max_model_bytes:
            raise ModelTooLarge(header.size_bytes, self._max_model_bytes)
        if not header.create_model:
            await self._store.get_model(header.model)  # NOT_FOUND before any byte is read
        attributes: dict[str, str | int] = {"modelforge.model": header.model}
        with _blob_store("stage the upload"):
            staged = self._blobs.stage()
        try:
            async for chunk in chunks:
                self._metrics.received(len(chunk))
                if staged.size + len(chunk) > header.size_bytes:  # at most the size limit, checked above
                    raise SizeMismatch(header.size_bytes, staged.size + len(chunk))
                with _blob_store("write the upload"):
                    await staged.write(chunk)
            with _blob_store("write the upload"):
                await staged.finish()
            if staged.size != header.size_bytes:
                raise SizeMismatch(header.size_bytes, staged.size)
            if staged.sha256 != header.sha256:
                raise ChecksumMismatch(header.sha256, staged.sha256)
            attributes["modelforge.size_bytes"] = staged.size
            with self._tracer.start_as_current_span("upload validation", attributes=attributes):
                signature, info = await self._inspections.inspect(staged.path, staged.size)
            file = StoredFile(sha256=staged.sha256, size_bytes=staged.size, signature=signature, onnx=info)
            placed = False

            async def place() -> None:
                nonlocal placed
                placed = True
                with (
                    self._tracer.start_as_current_span("blob write", attributes=attributes),
                    _blob_store("store the file"),
                ):
                    await self._blobs.place(staged, file.sha256)

            try:
                version = await self._store.add_version(header, file, place)
            except BaseException:
                if placed:  # the transaction did not commit: drop the file unless another version has it
                    with contextlib.suppress(BlobStoreFailed), _blob_store("remove the file of a version not stored"):
                        await self._collect(file.sha256)  # else left to sweep_orphans
                raise
        finally:
            staged.discard()
        log.info("stored %s:%d (%d bytes, sha256 %s)", version.model, version.version, file.size_bytes, file.sha256)
        return version

    async def get_version(self, model: str, version: int) -> ModelVersion:
        return await self._store.get_version(check_model_name(model, "model"), check_version(version))

    async def resolve(self, ref: ModelRef) -> ModelVersion:
        """The version a reference points at now: by number, by alias, or the newest READY one."""
        check_model_name(ref.name, "ref.name")
        if ref.version is not None:
            check_version(ref.version, "ref.version")
        if ref.alias is not None:
            check_alias(ref.alias, "ref.alias")
        return await self._store.resolve(ref)

    async def list_versions(
        self, model: str, state: VersionState | None, *, limit: int, after: list[Any] | None
    ) -> Page[ModelVersion]:
        check_model_name(model, "model")
        return await self._store.list_versions(model, state, limit=limit, before=_first(after))

    async def update_version(self, model: str, version: int, changes: VersionChanges) -> ModelVersion:
        check_model_name(model, "model_version.model")
        check_text(changes.description, "model_version.description", DESCRIPTION_MAX)
        check_text(changes.version_label, "model_version.version_label", VERSION_LABEL_MAX)
        check_labels(changes.labels, "model_version.labels")
        return await self._store.update_version(model, check_version(version), changes)

    async def archive(self, model: str, version: int) -> ModelVersion:
        check_model_name(model, "model")
        archived, changed = await self._store.set_state(model, check_version(version), VersionState.ARCHIVED)
        if changed:
            log.info("archived %s:%d", model, version)
        return archived

    async def restore(self, model: str, version: int) -> ModelVersion:
        check_model_name(model, "model")
        restored, changed = await self._store.set_state(model, check_version(version), VersionState.READY)
        if changed:
            log.info("restored %s:%d", model, version)
        return restored

    async def delete_version(self, model: str, version: int) -> bool:
        """Deletes the version; returns True when its file went too, because no other version used it."""
        unused = await self._store.delete_version(check_model_name(model, "model"), check_version(version))
        log.info("deleted %s:%d%s", model, version, " and its file" if unused is not None else "")
        if unused is not None:
            await self._collect(unused)
        return unused is not None

    async def download(self, ref: ModelRef) -> tuple[ModelVersion, AsyncGenerator[bytes, None]]:
        """The resolved version and its file's chunks; the file is opened before this returns."""
        version = await self.resolve(ref)
        try:
            chunks = await self._blobs.read(version.sha256, self._chunk_bytes)
        except FileNotFoundError:
            # Deleted between the lookup and the open, or lost from the blob store while its version stays.
            await self._store.get_version(version.model, version.version)  # NOT_FOUND if it was deleted
            log.error(
                "the file of %s:%d (sha256 %s) is missing from the blob store",
                version.model,
                version.version,
                version.sha256,
            )
            raise ModelFileMissing(version.model, version.version, version.sha256) from None
        except OSError as exc:
            log.error("cannot read the file of %s:%d from the blob store: %s", version.model, version.version, exc)
            raise BlobStoreFailed("read the file", exc.strerror or str(exc)) from None
        return version, chunks

    # Aliases

    async def set_alias(self, model: str, alias: str, version: int) -> tuple[ModelVersion, int]:
        check_model_name(model, "model")
        check_alias(alias)
        pointed, previous = await self._store.set_alias(model, alias, check_version(version))
        if previous != version:
            log.info("%s@%s -> %d (%s)", model, alias, version, f"was {previous}" if previous else "new")
        return pointed, previous

    async def delete_alias(self, model: str, alias: str) -> int:
        previous = await self._store.delete_alias(check_model_name(model, "model"), check_alias(alias))
        log.info("deleted alias %s@%s (was %d)", model, alias, previous)
        return previous

    # Events

    async def watch(self, model: str = "") -> AsyncIterator[ModelEvent]:
        """WATCH_STARTED, then every change committed through any replica (of `model` if given)."""
        if model:
            check_model_name(model, "model")
        self._metrics.watch_opened()
        try:
            async with contextlib.aclosing(self._events.watch(model)) as events:
                async for event in events:
                    yield event
        finally:
            self._metrics.watch_closed()

    async def sweep_orphans(self, *, min_age_seconds: float = STALE_SECONDS) -> int:
        """Removes stored files that no version records and nobody wrote for `min_age_seconds`; returns how many.

        Such files are left when a process dies between placing a file and committing (or dropping) its version.
        Replicas may share the blob directory, so a file younger than that may belong to an upload in progress;
        each removal also holds the file's lock, as uploads do while they place and record it.
        """
        candidates = await asyncio.to_thread(self._blobs.stored_before, time.time() - min_age_seconds)
        if not candidates:
            return 0
        recorded = await self._store.recorded_blobs(candidates)
        removed = 0
        for sha256 in candidates:
            if sha256 in recorded:
                continue
            try:
                removed += await self._collect(sha256)
            except OSError as exc:
                log.warning("cannot remove the orphaned file %s: %s", sha256, exc)
        if removed:
            log.info("removed %d orphaned file(s) from the blob store", removed)
        return removed

    async def sweep_orphans_every(self, interval: float) -> None:
        """Sweeps orphaned files every `interval` seconds, for ever: a process that died between placing a file and
        committing its version left it there, and a registry that keeps running would otherwise never look again."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_orphans()
            except Exception as exc:  # PostgreSQL or the disk out of reach: the next sweep tries again
                log.warning("the sweep of orphaned files failed: %s", exc)

    async def _collect(self, sha256: str) -> bool:
        """Removes a file from disk if no committed version records it, under the file's lock; True if it did."""
        async with self._store.blob_lock(sha256) as recorded:
            if not recorded:
                await self._blobs.remove(sha256)
        return not recorded


@contextlib.contextmanager
def _blob_store(doing: str) -> Iterator[None]:
    """An OSError of the blob store's disk (permissions, a full or read-only file system) as UNAVAILABLE
    BLOB_STORE_FAILED, logged for the operator; the upload leaves nothing, as on any failure."""
    try:
        yield
    except OSError as exc:
        log.error("blob store: cannot %s: %s", doing, exc)
        raise BlobStoreFailed(doing, exc.strerror or str(exc)) from None


def _first(key: list[Any] | None) -> Any:
    """The single sort key inside a page token (checked for its type by paging.decode), or None."""
    return None if key is None else key[0]

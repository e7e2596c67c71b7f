"""Every SQL statement of the registry. Returns domain objects and raises the registry's errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from modelforge_registry.domain import (
    EventType,
    Inventory,
    Model,
    ModelChanges,
    ModelFilter,
    ModelVersion,
    NewModel,
    OnnxInfo,
    OperatorSet,
    Page,
    Signature,
    StoredFile,
    TensorSpec,
    UploadHeader,
    VersionChanges,
    VersionState,
    model_key,
    version_key,
)
from modelforge_registry.errors import (
    AliasNotFound,
    DatabaseUnavailable,
    ModelExists,
    ModelHasVersions,
    ModelNotFound,
    NoReadyVersion,
    VersionArchived,
    VersionHasAliases,
    VersionNotFound,
)
from modelforge_server import db
from modelforge_server.errors import Aborted
from modelforge_server.refs import ModelRef

# The PostgreSQL channel on which every replica publishes and hears model events.
EVENTS_CHANNEL = "modelforge_registry_events"

_MODEL_SELECT = """
SELECT m.name, m.description, m.labels,
       COALESCE((SELECT jsonb_object_agg(a.alias, a.version) FROM registry.aliases a WHERE a.model = m.name),
                '{}'::jsonb) AS aliases,
       COALESCE((SELECT max(v.version) FROM registry.versions v WHERE v.model = m.name AND v.state = 'READY'),
                0) AS latest_version,
       m.create_time, m.update_time
  FROM registry.models m
"""

_VERSION_SELECT = """
SELECT v.model, v.version, v.state, v.sha256, v.size_bytes, v.signature, v.onnx, v.description, v.labels,
       v.version_label,
       ARRAY(SELECT a.alias FROM registry.aliases a
              WHERE a.model = v.model AND a.version = v.version ORDER BY a.alias) AS aliases,
       v.create_time
  FROM registry.versions v
"""

_NOTIFY = """
SELECT pg_notify(%(channel)s, json_build_object(
    'type', %(type)s::text, 'model', %(model)s::text, 'version', %(version)s::bigint,
    'alias', %(alias)s::text, 'event_time', statement_timestamp())::text)
"""


@dataclass
class _VersionRow:
    """A registry.versions row as stored; signature and onnx are JSON documents."""

    model: str
    version: int
    state: str
    sha256: str
    size_bytes: int
    signature: dict[str, Any]
    onnx: dict[str, Any]
    description: str
    labels: dict[str, str]
    version_label: str
    aliases: list[str]
    create_time: datetime

    def to_domain(self) -> ModelVersion:
        return ModelVersion(
            model=self.model,
            version=self.version,
            state=VersionState(self.state),
            sha256=self.sha256,
            size_bytes=self.size_bytes,
            signature=_signature_from_json(self.signature),
            onnx=_onnx_from_json(self.onnx),
            description=self.description,
            labels=self.labels,
            version_label=self.version_label,
            aliases=tuple(self.aliases),
            create_time=self.create_time,
        )


def _spec_from_json(doc: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=doc["name"], dtype=doc["dtype"], shape=tuple(doc["shape"]), dim_names=tuple(doc["dim_names"])
    )


def _signature_from_json(doc: dict[str, Any]) -> Signature:
    return Signature(
        inputs=tuple(_spec_from_json(s) for s in doc.get("inputs", [])),
        outputs=tuple(_spec_from_json(s) for s in doc.get("outputs", [])),
    )


def _onnx_from_json(doc: dict[str, Any]) -> OnnxInfo:
    return OnnxInfo(
        ir_version=doc.get("ir_version", 0),
        opset_imports=tuple(OperatorSet(**o) for o in doc.get("opset_imports", [])),
        producer_name=doc.get("producer_name", ""),
        producer_version=doc.get("producer_version", ""),
        graph_name=doc.get("graph_name", ""),
        doc_string=doc.get("doc_string", ""),
        metadata_props=doc.get("metadata_props", {}),
    )


class RegistryStore:
    """Every SQL statement of the registry.

    Locking: every write to a model's versions or aliases first locks the model's row, then (for files) takes a
    transaction-scoped advisory lock on the sha256. Always in that order, so writers cannot deadlock; readers
    take no locks and see one consistent snapshot per statement.
    """

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def _connection(self, *, bounded: bool = True) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for one operation, bounded by the pool's operation timeout unless `bounded` is False
        (see `db.connection`)."""
        try:
            async with db.connection(self._pool, bounded=bounded) as conn:
                yield conn
        except psycopg.errors.TransactionRollback as exc:
            raise Aborted("a concurrent change got in the way; retry the request") from exc
        except db.OperationTimedOut as exc:
            raise DatabaseUnavailable(f"PostgreSQL did not answer within {exc.seconds:g} s") from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable() from exc

    @asynccontextmanager
    async def _transaction(self, *, bounded: bool = True) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._connection(bounded=bounded) as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def _transaction_around_disk(self) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], db.Bound]]:
        """A transaction around work on the disk: PostgreSQL's part is bounded by the operation timeout, except
        while the yielded bound is `paused()` for the disk's part."""
        async with self._connection(bounded=False) as conn:
            with db.bound(conn, getattr(self._pool, "operation_timeout", None)) as postgres:
                async with conn.transaction():
                    yield conn, postgres

    async def ping(self) -> None:
        """Raises unless PostgreSQL answers."""
        await db.ping(self._pool)

    async def inventory(self) -> Inventory:
        """Models, versions by state and stored files, counted in one snapshot."""
        async with self._connection() as conn:
            cur = await conn.execute(
                """
                SELECT (SELECT count(*) FROM registry.models),
                       (SELECT COALESCE(jsonb_object_agg(state, n), '{}'::jsonb)
                          FROM (SELECT state, count(*) AS n FROM registry.versions GROUP BY state) s),
                       (SELECT count(*) FROM registry.blobs),
                       (SELECT COALESCE(sum(size_bytes), 0) FROM registry.blobs)
                """
            )
            row = await cur.fetchone()
        assert row is not None
        models, versions, blobs, blob_bytes = row
        return Inventory(
            models=int(models),
            versions={VersionState(state): int(n) for state, n in versions.items()},
            blobs=int(blobs),
            blob_bytes=int(blob_bytes),
        )

    # Models

    async def create_model(self, new: NewModel) -> Model:
        async with self._transaction() as conn:
            try:
                await conn.execute(
                    "INSERT INTO registry.models (name, description, labels) VALUES (%s, %s, %s)",
                    (new.name, new.description, Jsonb(new.labels)),
                )
            except psycopg.errors.UniqueViolation:
                raise ModelExists(new.name) from None
            await _notify(conn, EventType.MODEL_CREATED, new.name)
            return await _model(conn, new.name)

    async def get_model(self, name: str) -> Model:
        async with self._connection() as conn:
            return await _model(conn, name)

    async def list_models(self, where: ModelFilter, *, limit: int, after: str | None) -> Page[Model]:
        async with self._connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
            await cur.execute(
                _MODEL_SELECT
                + """
                 WHERE (%(after)s::text IS NULL OR m.name > %(after)s)
                   AND starts_with(m.name, %(prefix)s)
                   AND m.labels @> %(labels)s
                 ORDER BY m.name
                 LIMIT %(limit)s
                """,
                {"after": after, "prefix": where.name_prefix, "labels": Jsonb(where.labels), "limit": limit + 1},
            )
            rows = await cur.fetchall()
        more = len(rows) > limit
        items = rows[:limit]
        return Page(items=items, last_key=model_key(items[-1]) if more else None)

    async def update_model(self, name: str, changes: ModelChanges) -> Model:
        async with self._transaction() as conn:
            cur = await conn.execute(
                """
                UPDATE registry.models
                   SET description = COALESCE(%(description)s, description),
                       labels = COALESCE(%(labels)s, labels),
                       update_time = now()
                 WHERE name = %(name)s
                RETURNING name
                """,
                {
                    "name": name,
                    "description": changes.description,
                    "labels": None if changes.labels is None else Jsonb(changes.labels),
                },
            )
            if await cur.fetchone() is None:
                raise ModelNotFound(name)
            await _notify(conn, EventType.MODEL_UPDATED, name)
            return await _model(conn, name)

    async def delete_model(self, name: str, *, force: bool) -> tuple[int, list[str]]:
        """Deletes the model (and with force its versions and aliases); returns (versions deleted, files to drop)."""
        async with self._transaction() as conn:
            await _lock_model(conn, name)
            cur = await conn.execute(
                "SELECT count(*), COALESCE(array_agg(DISTINCT sha256), '{}') FROM registry.versions WHERE model = %s",
                (name,),
            )
            row = await cur.fetchone()
            assert row is not None
            count, shas = int(row[0]), sorted(row[1])
            if count and not force:
                raise ModelHasVersions(name, count)
            await conn.execute("DELETE FROM registry.models WHERE name = %s", (name,))
            unused = [sha for sha in shas if await _drop_blob_if_unused(conn, sha)]
            await _notify(conn, EventType.MODEL_DELETED, name)
        return count, unused

    # Versions

    async def add_version(
        self, header: UploadHeader, file: StoredFile, place: Callable[[], Awaitable[None]]
    ) -> ModelVersion:
        """Allocates the next version number and inserts the version; `place` puts the file in the blob store
        while the file's lock is held. All of it happens in one transaction, or none of it. PostgreSQL's part is
        bounded by the operation timeout before `place` and again after it; writing the file takes as long as the
        disk needs."""
        async with self._transaction_around_disk() as (conn, postgres):
            version = await _next_version(conn, header.model, create=header.create_model)
            await _lock_blob(conn, file.sha256)
            await conn.execute(
                "INSERT INTO registry.blobs (sha256, size_bytes) VALUES (%s, %s) ON CONFLICT (sha256) DO NOTHING",
                (file.sha256, file.size_bytes),
            )
            await conn.execute(
                """
                INSERT INTO registry.versions
                    (model, version, state, sha256, size_bytes, signature, onnx, description, labels, version_label)
                VALUES (%s, %s, 'READY', %s, %s, %s, %s, %s, %s, %s)
                """,
                (
                    header.model,
                    version,
                    file.sha256,
                    file.size_bytes,
                    Jsonb(asdict(file.signature)),
                    Jsonb(asdict(file.onnx)),
                    header.description,
                    Jsonb(header.labels),
                    header.version_label,
                ),
            )
            with postgres.paused():  # the disk's time, not PostgreSQL's
                await place()
            await _notify(conn, EventType.VERSION_CREATED, header.model, version)
            return await _version(conn, header.model, version)

    @asynccontextmanager
    async def blob_lock(self, sha256: str) -> AsyncIterator[bool]:
        """Holds the file's lock for the block; yields whether a registry.blobs row records the file. The block,
        which works on the disk, is not bounded by the operation timeout; taking the lock and ending are."""
        async with self._transaction_around_disk() as (conn, postgres):
            await _lock_blob(conn, sha256)
            cur = await conn.execute("SELECT 1 FROM registry.blobs WHERE sha256 = %s", (sha256,))
            recorded = await cur.fetchone() is not None
            with postgres.paused():
                yield recorded

    async def recorded_blobs(self, sha256s: list[str]) -> set[str]:
        """Those of `sha256s` that a registry.blobs row records (which some version uses, or is about to)."""
        async with self._connection() as conn:
            cur = await conn.execute("SELECT sha256 FROM registry.blobs WHERE sha256 = ANY(%s)", (sha256s,))
            return {row[0] for row in await cur.fetchall()}

    async def get_version(self, model: str, version: int) -> ModelVersion:
        async with self._connection() as conn:
            return await _version(conn, model, version)

    async def resolve(self, ref: ModelRef) -> ModelVersion:
        async with self._connection() as conn:
            if ref.version is not None:
                return await _version(conn, ref.name, ref.version)
            async with conn.cursor(row_factory=class_row(_VersionRow)) as cur:
                if ref.alias is not None:
                    await cur.execute(
                        _VERSION_SELECT
                        + """
                          JOIN registry.aliases al ON al.model = v.model AND al.version = v.version
                         WHERE al.model = %s AND al.alias = %s
                        """,
                        (ref.name, ref.alias),
                    )
                else:
                    await cur.execute(
                        _VERSION_SELECT + " WHERE v.model = %s AND v.state = 'READY' ORDER BY v.version DESC LIMIT 1",
                        (ref.name,),
                    )
                row = await cur.fetchone()
            if row is not None:
                return row.to_domain()
            await _model(conn, ref.name)  # raises ModelNotFound when that is the reason
            if ref.alias is not None:
                raise AliasNotFound(ref.name, ref.alias)
            raise NoReadyVersion(ref.name)

    async def list_versions(
        self, model: str, state: VersionState | None, *, limit: int, before: int | None
    ) -> Page[ModelVersion]:
        async with self._connection() as conn:
            async with conn.cursor(row_factory=class_row(_VersionRow)) as cur:
                await cur.execute(
                    _VERSION_SELECT
                    + """
                     WHERE v.model = %(model)s
                       AND (%(before)s::bigint IS NULL OR v.version < %(before)s)
                       AND (%(state)s::text IS NULL OR v.state = %(state)s)
                     ORDER BY v.version DESC
                     LIMIT %(limit)s
                    """,
                    {"model": model, "before": before, "state": state and state.value, "limit": limit + 1},
                )
                rows = await cur.fetchall()
            if not rows:
                await _model(conn, model)  # NOT_FOUND for an unknown model rather than an empty list
        more = len(rows) > limit
        items = [row.to_domain() for row in rows[:limit]]
        return Page(items=items, last_key=version_key(items[-1]) if more else None)

    async def update_version(self, model: str, version: int, changes: VersionChanges) -> ModelVersion:
        async with self._transaction() as conn:
            cur = await conn.execute(
                """
                UPDATE registry.versions
                   SET description = COALESCE(%(description)s, description),
                       labels = COALESCE(%(labels)s, labels),
                       version_label = COALESCE(%(version_label)s, version_label)
                 WHERE model = %(model)s AND version = %(version)s
                RETURNING version
                """,
                {
                    "model": model,
                    "version": version,
                    "description": changes.description,
                    "labels": None if changes.labels is None else Jsonb(changes.labels),
                    "version_label": changes.version_label,
                },
            )
            if await cur.fetchone() is None:
                await _missing_version(conn, model, version)
            await _notify(conn, EventType.VERSION_UPDATED, model, version)
            return await _version(conn, model, version)

    async def set_state(self, model: str, version: int, state: VersionState) -> tuple[ModelVersion, bool]:
        """Moves a version to `state`; returns it and whether anything changed. No alias may point at ARCHIVED."""
        async with self._transaction() as conn:
            await _lock_model(conn, model)
            current = await _version(conn, model, version)
            if current.state == state:
                return current, False
            if state == VersionState.ARCHIVED and current.aliases:
                raise VersionHasAliases(model, version, list(current.aliases))
            await conn.execute(
                "UPDATE registry.versions SET state = %s WHERE model = %s AND version = %s",
                (state.value, model, version),
            )
            event = EventType.VERSION_ARCHIVED if state == VersionState.ARCHIVED else EventType.VERSION_RESTORED
            await _notify(conn, event, model, version)
            return await _version(conn, model, version), True

    async def delete_version(self, model: str, version: int) -> str | None:
        """Deletes the version; returns its sha256 when no other version uses that file any more."""
        async with self._transaction() as conn:
            await _lock_model(conn, model)
            current = await _version(conn, model, version)
            if current.aliases:
                raise VersionHasAliases(model, version, list(current.aliases))
            await conn.execute("DELETE FROM registry.versions WHERE model = %s AND version = %s", (model, version))
            unused = await _drop_blob_if_unused(conn, current.sha256)
            await _notify(conn, EventType.VERSION_DELETED, model, version)
        return current.sha256 if unused else None

    # Aliases

    async def set_alias(self, model: str, alias: str, version: int) -> tuple[ModelVersion, int]:
        """Points the alias at a READY version; returns the version and the previous target (0 if new)."""
        async with self._transaction() as conn:
            await _lock_model(conn, model)
            target = await _version(conn, model, version)
            if target.state != VersionState.READY:
                raise VersionArchived(model, version)
            cur = await conn.execute(
                "SELECT version FROM registry.aliases WHERE model = %s AND alias = %s", (model, alias)
            )
            row = await cur.fetchone()
            previous = int(row[0]) if row else 0
            await conn.execute(
                """
                INSERT INTO registry.aliases (model, alias, version) VALUES (%s, %s, %s)
                ON CONFLICT (model, alias) DO UPDATE SET version = EXCLUDED.version, update_time = now()
                """,
                (model, alias, version),
            )
            await _notify(conn, EventType.ALIAS_SET, model, version, alias)
            return await _version(conn, model, version), previous

    async def delete_alias(self, model: str, alias: str) -> int:
        async with self._transaction() as conn:
            await _lock_model(conn, model)
            cur = await conn.execute(
                "DELETE FROM registry.aliases WHERE model = %s AND alias = %s RETURNING version", (model, alias)
            )
            row = await cur.fetchone()
            if row is None:
                raise AliasNotFound(model, alias)
            await _notify(conn, EventType.ALIAS_DELETED, model, int(row[0]), alias)
            return int(row[0])


async def _model(conn: psycopg.AsyncConnection[Any], name: str) -> Model:
    async with conn.cursor(row_factory=class_row(Model)) as cur:
        await cur.execute(_MODEL_SELECT + " WHERE m.name = %s", (name,))
        model = await cur.fetchone()
    if model is None:
        raise ModelNotFound(name)
    return model


async def _version(conn: psycopg.AsyncConnection[Any], model: str, version: int) -> ModelVersion:
    async with conn.cursor(row_factory=class_row(_VersionRow)) as cur:
        await cur.execute(_VERSION_SELECT + " WHERE v.model = %s AND v.version = %s", (model, version))
        row = await cur.fetchone()
    if row is None:
        await _missing_version(conn, model, version)
    assert row is not None
    return row.to_domain()


async def _missing_version(conn: psycopg.AsyncConnection[Any], model: str, version: int) -> None:
    """Raises ModelNotFound or VersionNotFound, whichever is the reason a version was not found."""
    cur = await conn.execute("SELECT 1 FROM registry.models WHERE name = %s", (model,))
    if await cur.fetchone() is None:
        raise ModelNotFound(model)
    raise VersionNotFound(model, version)


async def _lock_model(conn: psycopg.AsyncConnection[Any], name: str) -> None:
    cur = await conn.execute("SELECT 1 FROM registry.models WHERE name = %s FOR UPDATE", (name,))
    if await cur.fetchone() is None:
        raise ModelNotFound(name)


async def _next_version(conn: psycopg.AsyncConnection[Any], model: str, *, create: bool) -> int:
    """Takes the model's next version number, creating the model first when `create` (and announcing it). A model
    deleted by another transaction between the two statements is created again, as the upload asked."""
    for _ in range(3):
        if create:
            cur = await conn.execute(
                "INSERT INTO registry.models (name) VALUES (%s) ON CONFLICT (name) DO NOTHING RETURNING name", (model,)
            )
            if await cur.fetchone() is not None:
                await _notify(conn, EventType.MODEL_CREATED, model)
        cur = await conn.execute(
            "UPDATE registry.models SET next_version = next_version + 1 WHERE name = %s RETURNING next_version - 1",
            (model,),
        )
        row = await cur.fetchone()
        if row is not None:
            return int(row[0])
        if not create:
            raise ModelNotFound(model)
    raise Aborted(f"model {model!r} was deleted and created again meanwhile, more than once; retry the upload")


async def _lock_blob(conn: psycopg.AsyncConnection[Any], sha256: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"modelforge.blob.{sha256}",))


async def _drop_blob_if_unused(conn: psycopg.AsyncConnection[Any], sha256: str) -> bool:
    """Deletes the file's row when no version uses it any more; returns whether it did."""
    await _lock_blob(conn, sha256)
    cur = await conn.execute(
        """
        DELETE FROM registry.blobs b
         WHERE b.sha256 = %s AND NOT EXISTS (SELECT 1 FROM registry.versions v WHERE v.sha256 = b.sha256)
        RETURNING sha256
        """,
        (sha256,),
    )
    return await cur.fetchone() is not None


async def _notify(
    conn: psycopg.AsyncConnection[Any], event: EventType, model: str, version: int = 0, alias: str = ""
) -> None:
    """Publishes the event to every replica when (and only if) the transaction commits."""
    await conn.execute(
        _NOTIFY,
        {"channel": EVENTS_CHANNEL, "type": event.value, "model": model, "version": version, "alias": alias},
    )

"""Every SQL statement of the jobs service. Returns domain objects and raises domain errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from modelforge_jobs.domain import (
    Dataset,
    InputRecord,
    Job,
    JobError,
    JobFilter,
    JobSpec,
    JobState,
    Page,
    Priority,
    Progress,
    ResultRecord,
    TensorInfo,
    Waiting,
)
from modelforge_jobs.errors import DatasetInUse, DatasetNotFound, DependencyUnavailable, JobNotFound
from modelforge_server import db
from modelforge_server.refs import ModelRef

T = TypeVar("T")

_JOB_COLUMNS = """
    id, request_id, model_name, ref_version, ref_alias, model_version, state, dataset_id, items_total, batch_size,
    batches_total, items_done, batches_done, priority, labels, max_attempts, time_limit_seconds, attempt_count,
    worker_id, create_time, start_time, finish_time, update_time, queued_since, queued_seconds, inference_seconds,
    run_start_time, run_items_start, error_code, error_reason, error_message, queued_reason, inline_input,
    COALESCE(input_dataset_id, dataset_id) AS input_dataset_id, input_digest,
    CASE WHEN enqueue_time > '-infinity' THEN greatest(enqueue_time, now()) END AS next_run_time, now() AS now
"""
# next_run_time: when the job's message is due; enqueue_time is -infinity for a message that could not be sent.
# input_dataset_id is unset in rows written before migration 0005 filled it, or by a version older than it (a
# replica during a rolling upgrade): dataset_id, while the dataset lives, says the same.

_LIVE = ("QUEUED", "RUNNING")
# Where PostgreSQL announces job changes (migration 0003's trigger): the payload is the job id.
CHANGES_CHANNEL = "modelforge_jobs_changed"


def _seconds(start: datetime | None, end: datetime) -> float:
    return max((end - start).total_seconds(), 0.0) if start is not None else 0.0


def _job(row: dict[str, Any]) -> Job:
    state = JobState(row["state"])
    done, total = row["items_done"], row["items_total"]
    rate = 0.0
    if state is JobState.RUNNING and row["run_start_time"] is not None:
        elapsed = _seconds(row["run_start_time"], row["update_time"])
        run_items = done - row["run_items_start"]
        if elapsed > 0 and run_items > 0:
            rate = run_items / elapsed
    remaining = (total - done) / rate if rate > 0 else (0.0 if state is JobState.COMPLETED else None)
    queued_reason = (row["queued_reason"] or "") if state is JobState.QUEUED else ""
    error = None
    if row["error_code"] is not None and state is JobState.FAILED:
        error = JobError(row["error_code"], row["error_reason"] or "", row["error_message"] or "")
    return Job(
        id=row["id"],
        model_ref=ModelRef(row["model_name"], row["ref_version"], row["ref_alias"]),
        model_version=row["model_version"],
        state=state,
        progress=Progress(done, total, row["batches_done"], row["batches_total"], rate, remaining),
        dataset_id=row["dataset_id"],
        batch_size=row["batch_size"],
        priority=Priority(row["priority"]),
        labels=dict(row["labels"]),
        max_attempts=row["max_attempts"],
        time_limit=row["time_limit_seconds"],
        attempt_count=row["attempt_count"],
        worker_id=row["worker_id"],
        create_time=row["create_time"],
        start_time=row["start_time"],
        finish_time=row["finish_time"],
        update_time=row["update_time"],
        queued_seconds=row["queued_seconds"] + _seconds(row["queued_since"], row["now"]),
        inference_seconds=row["inference_seconds"],
        error=error,
        request_id=row["request_id"],
        queued_reason=queued_reason,
        next_run_time=row["next_run_time"] if queued_reason else None,
        input_dataset_id=row["input_dataset_id"],
        inline_input=row["inline_input"],
        input_digest=row["input_digest"],
    )


def _dataset(row: dict[str, Any]) -> Dataset:
    return Dataset(
        id=row["id"],
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        item_count=row["item_count"],
        record_count=row["record_count"],
        tensors=tuple(TensorInfo(t["name"], t["dtype"], tuple(t["item_shape"])) for t in row["tensors"]),
        display_name=row["display_name"],
        labels=dict(row["labels"]),
        create_time=row["create_time"],
    )


@contextlib.asynccontextmanager
async def listen_for_changes(database_url: str) -> AsyncIterator[AsyncIterator[UUID]]:
    """A connection of its own that LISTENs for job changes; yields, once listening, the ids of changed jobs as
    their transactions commit. DependencyUnavailable when PostgreSQL cannot be reached or the connection breaks."""
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANGES_CHANNEL)))

            async def changes() -> AsyncIterator[UUID]:
                try:
                    async for notify in conn.notifies():
                        with contextlib.suppress(ValueError):
                            yield UUID(notify.payload)
                except psycopg.OperationalError as exc:
                    raise DependencyUnavailable("database", type(exc).__name__) from exc

            yield changes()
    except psycopg.OperationalError as exc:
        raise DependencyUnavailable("database", type(exc).__name__) from exc


# Some batches' outputs and the job's progress, in one statement. `job` locks the row only if the job is RUNNING on
# this worker (re-checked on the newest row version when a cancel or the reaper committed meanwhile), so the outputs
# are stored and counted together or not at all; the primary key of jobs.results makes a batch stored before count
# for nothing (ON CONFLICT DO NOTHING), so a redelivered batch is never written or counted twice. The lock is held
# until the commit at the end of the statement: a cancel waits for at most one write, then wins. The batches arrive
# as parallel arrays, one element per batch, so that a write of many batches is still one round trip and one commit;
# they travel in binary (%b): psycopg's text form of a bytea array would escape every output byte in Python.
_STORE_BATCHES = """
    WITH job AS (
        SELECT id FROM jobs.jobs
        WHERE id = %(id)s AND state = 'RUNNING' AND worker_id = %(worker)s
        FOR NO KEY UPDATE
    ), stored AS (
        INSERT INTO jobs.results (job_id, batch_index, first_item, item_count, record)
        SELECT job.id, b.batch_index, b.first_item, b.item_count, b.record
        FROM job CROSS JOIN unnest(%(indexes)b::bigint[], %(firsts)b::bigint[], %(counts)b::integer[],
            %(records)b::bytea[]) AS b (batch_index, first_item, item_count, record)
        ON CONFLICT DO NOTHING
        RETURNING item_count
    ), progress AS (
        UPDATE jobs.jobs j SET
            items_done = j.items_done + COALESCE((SELECT sum(item_count) FROM stored), 0),
            batches_done = j.batches_done + (SELECT count(*) FROM stored),
            inference_seconds = j.inference_seconds + %(seconds)s,
            heartbeat_time = now(), update_time = now()
        FROM job WHERE j.id = job.id
        RETURNING j.id
    )
    SELECT EXISTS (SELECT 1 FROM progress) AS stored, set_config('synchronous_commit', 'off', true)
"""
# set_config(..., true) lasts until the end of the statement's own transaction, so only this commit is asynchronous.
# Why a write's commit need not wait for its WAL to reach disk: if the worker dies, PostgreSQL still writes the
# commit out (within wal_writer_delay), so nothing acknowledged is lost. If PostgreSQL itself crashes, the last
# batches committed this way may be lost, outputs and progress together (WAL replays in order, so what survives is
# a consistent prefix): the job is then redelivered, or still RUNNING and reaped, and its runner stores those
# batches again, which is safe because storing is idempotent. Nothing that a client can rely on is lost: the job's
# COMPLETED commit is synchronous, and a synchronous commit flushes all WAL before it, every batch included.


class JobStore:
    """The jobs, datasets and their records, inline inputs and per-batch results in the `jobs` schema."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def _cursor(
        self, *, transaction: bool = False, bounded: bool = True
    ) -> AsyncIterator[psycopg.AsyncCursor[dict[str, Any]]]:
        """A dict-row cursor for one operation, bounded by the pool's operation timeout unless `bounded` is False
        (see `db.connection`); PostgreSQL going away becomes Unavailable here, at the boundary."""
        try:
            async with db.connection(self._pool, bounded=bounded) as conn:
                if transaction:
                    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                        yield cur
                else:
                    async with conn.cursor(row_factory=dict_row) as cur:
                        yield cur
        except db.OperationTimedOut as exc:
            raise DependencyUnavailable("database", f"no answer within {exc.seconds:g} s") from exc
        except PoolTimeout as exc:
            raise DependencyUnavailable("database", "no connection to PostgreSQL could be had") from exc
        except psycopg.OperationalError as exc:
            raise DependencyUnavailable("database", "the connection to PostgreSQL failed") from exc

    # --- submission and reads -----------------------------------------------------------------------------

    async def insert_job(
        self,
        job_id: UUID,
        spec: JobSpec,
        *,
        model_version: int,
        items_total: int,
        batches_total: int,
        input_digest: bytes | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Inserts a QUEUED job (and its inline input) and returns it with True; for a request_id seen before,
        returns that job and False. `input_digest`: the input's sha256, which a repeat of the request_id must match
        (Job.input_digest). DatasetNotFound when the dataset has been deleted since it was read: the
        insert's reference to it waits for a deletion in progress and then fails, so a deletion that saw no live
        job reading the dataset cannot leave this one without its input."""
        async with self._cursor(transaction=True) as cur:
            try:
                await cur.execute(
                    f"""
                    INSERT INTO jobs.jobs (id, request_id, inline_input, model_name, ref_version, ref_alias,
                        model_version, state, dataset_id, input_dataset_id, items_total, batch_size, batches_total,
                        priority, labels, max_attempts, time_limit_seconds, queued_since, trace_context,
                        input_digest)
                    VALUES (%(id)s, %(request_id)s, %(inline)s, %(name)s, %(ref_version)s, %(ref_alias)s,
                        %(model_version)s, 'QUEUED', %(dataset_id)s, %(dataset_id)s, %(items_total)s, %(batch_size)s,
                        %(batches_total)s,
                        %(priority)s, %(labels)s, %(max_attempts)s, %(time_limit)s, now(), %(trace)s,
                        %(input_digest)s)
                    ON CONFLICT (request_id) DO NOTHING
                    RETURNING {_JOB_COLUMNS}
                    """,
                    {
                        "id": job_id,
                        "request_id": spec.request_id,
                        "inline": spec.inline_input is not None,
                        "name": spec.model_ref.name,
                        "ref_version": spec.model_ref.version,
                        "ref_alias": spec.model_ref.alias,
                        "model_version": model_version,
                        "dataset_id": spec.dataset_id,
                        "items_total": items_total,
                        "batch_size": spec.batch_size,
                        "batches_total": batches_total,
                        "priority": int(spec.priority),
                        "labels": Jsonb(spec.labels),
                        "max_attempts": spec.max_attempts,
                        "time_limit": spec.time_limit,
                        "trace": Jsonb(dict(trace)) if trace else None,
                        "input_digest": input_digest,
                    },
                )
            except psycopg.errors.ForeignKeyViolation:
                raise DatasetNotFound(str(spec.dataset_id)) from None
            row = await cur.fetchone()
            if row is not None and spec.inline_input is not None:
                await cur.execute(
                    "INSERT INTO jobs.inputs (job_id, record) VALUES (%s, %s)", (job_id, spec.inline_input)
                )
        if row is not None:
            return _job(row), True
        async with self._cursor() as cur:
            await cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs.jobs WHERE request_id = %s", (spec.request_id,))
            row = await cur.fetchone()
        if row is None:  # deleted between the two statements
            raise JobNotFound(f"request_id={spec.request_id}")
        return _job(row), False

    async def get_job_by_request_id(self, request_id: str) -> Job | None:
        async with self._cursor() as cur:
            await cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs.jobs WHERE request_id = %s", (request_id,))
            row = await cur.fetchone()
        return _job(row) if row is not None else None

    async def get_job(self, job_id: UUID) -> Job:
        async with self._cursor() as cur:
            await cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs.jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
        if row is None:
            raise JobNotFound(str(job_id))
        return _job(row)

    async def list_jobs(self, where: JobFilter, *, limit: int, after: list[Any] | None) -> Page[Job]:
        clauses: list[str] = ["TRUE"]
        params: list[object] = []
        if where.state is not None:
            clauses.append("state = %s")
            params.append(where.state.value)
        if where.model:
            clauses.append("model_name = %s")
            params.append(where.model)
        if where.labels:
            clauses.append("labels @> %s")
            params.append(Jsonb(where.labels))
        return await self._newest_first(f"SELECT {_JOB_COLUMNS} FROM jobs.jobs", clauses, params, limit, after, _job)

    async def _newest_first(
        self,
        select: str,
        clauses: list[str],
        params: list[object],
        limit: int,
        after: list[Any] | None,
        item: Callable[[dict[str, Any]], T],
    ) -> Page[T]:
        """One page of a listing by create_time and id, newest first; `after` is the last listed row's pair."""
        if after is not None:
            clauses = [*clauses, "(create_time, id) < (%s::timestamptz, %s::uuid)"]
            params = [*params, after[0], after[1]]
        async with self._cursor() as cur:
            await cur.execute(
                f"{select} WHERE {' AND '.join(clauses)} ORDER BY create_time DESC, id DESC LIMIT %s",
                (*params, limit + 1),
            )
            rows = await cur.fetchall()
        items = [item(row) for row in rows[:limit]]
        last = [rows[limit - 1]["create_time"].isoformat(), str(rows[limit - 1]["id"])] if len(rows) > limit else None
        return Page(items, last)

    # --- state changes from the API -----------------------------------------------------------------------

    async def cancel(self, job_id: UUID) -> Job | None:
        """Cancels a QUEUED or RUNNING job; None when the job is in another state."""
        async with self._cursor() as cur:
            await cur.execute(
                f"""
                UPDATE jobs.jobs SET state = 'CANCELLED', finish_time = now(), update_time = now(),
                    queued_seconds = queued_seconds + COALESCE(EXTRACT(EPOCH FROM now() - queued_since), 0),
                    queued_since = NULL
                WHERE id = %s AND state IN ('QUEUED', 'RUNNING')
                RETURNING {_JOB_COLUMNS}
                """,
                (job_id,),
            )
            row = await cur.fetchone()
        return _job(row) if row is not None else None

    async def requeue_finished(self, job_id: UUID, *, trace: Mapping[str, str] | None = None) -> Job | None:
        """Makes a FAILED or CANCELLED job QUEUED again with a fresh attempt budget; None in other states, and when
        the dataset the job reads has been deleted.

        The dataset's row is share-locked while the job is queued, as a new job's reference to it would be: a
        deletion in progress either finishes first (and the job stays as it was), or waits and then finds the job
        live and refuses."""
        async with self._cursor() as cur:
            await cur.execute(
                f"""
                UPDATE jobs.jobs SET state = 'QUEUED', finish_time = NULL, update_time = now(), attempt_count = 0,
                    queued_since = now(), enqueue_time = now(), error_code = NULL, error_reason = NULL,
                    error_message = NULL, queued_reason = NULL, trace_context = %s
                WHERE id = %s AND state IN ('FAILED', 'CANCELLED')
                  AND (inline_input
                       OR EXISTS (SELECT 1 FROM jobs.datasets d WHERE d.id = jobs.jobs.dataset_id FOR KEY SHARE))
                RETURNING {_JOB_COLUMNS}
                """,
                (Jsonb(dict(trace)) if trace else None, job_id),
            )
            row = await cur.fetchone()
        return _job(row) if row is not None else None

    async def delete_job(self, job_id: UUID) -> int | None:
        """Deletes a terminal job with its input and results; returns its items done, None if it is live."""
        async with self._cursor() as cur:
            await cur.execute(
                "DELETE FROM jobs.jobs WHERE id = %s AND state IN ('COMPLETED', 'FAILED', 'CANCELLED')"
                " RETURNING items_done",
                (job_id,),
            )
            row = await cur.fetchone()
        return row["items_done"] if row is not None else None

    async def results(self, job_id: UUID, *, after: int, limit: int, max_bytes: int) -> list[ResultRecord]:
        """The stored batches with an index above `after`, in order: at most `limit` of them, and no more than
        `max_bytes` of records (but always one), so that a page of large batches stays small in memory. The sizes
        come first, from the records' TOAST headers, without reading them."""
        async with self._cursor() as cur:
            await cur.execute(
                "SELECT batch_index, octet_length(record) AS size FROM jobs.results"
                " WHERE job_id = %s AND batch_index > %s ORDER BY batch_index LIMIT %s",
                (job_id, after, limit),
            )
            sizes = await cur.fetchall()
            if not sizes:
                return []
            last, total = sizes[0]["batch_index"], 0
            for row in sizes:
                total += row["size"]
                if total > max_bytes and row is not sizes[0]:
                    break
                last = row["batch_index"]
            await cur.execute(
                "SELECT batch_index, first_item, item_count, record FROM jobs.results"
                " WHERE job_id = %s AND batch_index > %s AND batch_index <= %s ORDER BY batch_index",
                (job_id, after, last),
            )
            rows = await cur.fetchall()
        return [ResultRecord(r["batch_index"], r["first_item"], r["item_count"], bytes(r["record"])) for r in rows]

    # --- the worker's side ----------------------------------------------------------------------------------

    async def claim(self, job_id: UUID, worker_id: str, *, stale_after: float) -> Job | None:
        """Makes a QUEUED job (or a RUNNING one whose worker stopped heartbeating, with an attempt left: one without
        is the reaper's to fail) RUNNING on this worker.

        A job RUNNING on this very worker is taken too, its attempt not counted again: the caller runs no such job
        (see JobRunner.run), so an earlier run of it here ended without putting it back, because PostgreSQL was out
        of reach, and its message came again. None when the job is gone, finished, cancelled or running elsewhere:
        the message is then a duplicate.
        """
        async with self._cursor() as cur:
            await cur.execute(
                f"""
                UPDATE jobs.jobs SET state = 'RUNNING', worker_id = %(worker)s, heartbeat_time = now(),
                    attempt_count = attempt_count
                        + CASE WHEN state = 'RUNNING' AND worker_id = %(worker)s THEN 0 ELSE 1 END,
                    start_time = COALESCE(start_time, now()),
                    queued_seconds = queued_seconds + COALESCE(EXTRACT(EPOCH FROM now() - queued_since), 0),
                    queued_since = NULL, run_start_time = now(), run_items_start = items_done, update_time = now(),
                    queued_reason = NULL
                WHERE id = %(id)s AND (state = 'QUEUED' OR (state = 'RUNNING' AND worker_id = %(worker)s)
                    OR (state = 'RUNNING' AND heartbeat_time < now() - make_interval(secs => %(stale)s)
                        AND attempt_count < max_attempts))
                RETURNING {_JOB_COLUMNS}
                """,
                {"id": job_id, "worker": worker_id, "stale": stale_after},
            )
            row = await cur.fetchone()
        return _job(row) if row is not None else None

    async def inline_input(self, job_id: UUID) -> bytes | None:
        async with self._cursor() as cur:
            await cur.execute("SELECT record FROM jobs.inputs WHERE job_id = %s", (job_id,))
            row = await cur.fetchone()
        return bytes(row["record"]) if row is not None else None

    async def done_batches(self, job_id: UUID) -> set[int]:
        async with self._cursor() as cur:
            await cur.execute("SELECT batch_index FROM jobs.results WHERE job_id = %s", (job_id,))
            return {row["batch_index"] for row in await cur.fetchall()}

    async def store_batches(
        self, job_id: UUID, worker_id: str, batches: Sequence[ResultRecord], inference_seconds: float
    ) -> JobState | None:
        """Stores some batches' outputs and the progress atomically, if the job is still RUNNING here.

        Returns RUNNING when stored (a batch stored before counts for nothing: none is written twice), otherwise
        the job's state now (CANCELLED, or RUNNING elsewhere as None after the reaper gave it away).

        One statement, committed on its own (the pool's connections autocommit): the job's row is locked from the
        check to the commit at the end of the statement and no longer, so writers take turns for that instant only,
        never across a round trip to this process. Its commit does not wait for the WAL flush (see _STORE_BATCHES).
        """
        async with self._cursor() as cur:
            await cur.execute(
                _STORE_BATCHES,
                {
                    "id": job_id,
                    "worker": worker_id,
                    "indexes": [b.batch_index for b in batches],
                    "firsts": [b.first_item for b in batches],
                    "counts": [b.item_count for b in batches],
                    "records": [b.record for b in batches],
                    "seconds": inference_seconds,
                },
            )
            row = await cur.fetchone()
        if row is not None and row["stored"]:
            return JobState.RUNNING
        # Not RUNNING on this worker any more (the statement stored nothing): say what the job is now.
        async with self._cursor() as cur:
            await cur.execute("SELECT state FROM jobs.jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
        if row is None or row["state"] == "RUNNING":
            return None
        return JobState(row["state"])

    async def heartbeat(self, job_id: UUID, worker_id: str) -> bool:
        """Refreshes the heartbeat; False when the job is no longer RUNNING on this worker."""
        async with self._cursor() as cur:
            await cur.execute(
                "UPDATE jobs.jobs SET heartbeat_time = now() WHERE id = %s AND state = 'RUNNING' AND worker_id = %s",
                (job_id, worker_id),
            )
            return cur.rowcount == 1

    async def complete(self, job_id: UUID, worker_id: str) -> bool:
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE jobs.jobs SET state = 'COMPLETED', finish_time = now(), update_time = now()
                WHERE id = %s AND state = 'RUNNING' AND worker_id = %s AND batches_done = batches_total
                """,
                (job_id, worker_id),
            )
            return cur.rowcount == 1

    async def fail(self, job_id: UUID, worker_id: str | None, error: JobError) -> bool:
        """Marks the job FAILED with the error: a RUNNING job of this worker, or (worker None) a QUEUED one."""
        condition = "state = 'QUEUED'" if worker_id is None else "state = 'RUNNING' AND worker_id = %(worker)s"
        async with self._cursor() as cur:
            await cur.execute(
                f"""
                UPDATE jobs.jobs SET state = 'FAILED', finish_time = now(), update_time = now(),
                    queued_seconds = queued_seconds + COALESCE(EXTRACT(EPOCH FROM now() - queued_since), 0),
                    queued_since = NULL, error_code = %(code)s, error_reason = %(reason)s, error_message = %(message)s
                WHERE id = %(id)s AND {condition}
                """,
                {
                    "id": job_id,
                    "worker": worker_id,
                    "code": error.code,
                    "reason": error.reason,
                    "message": error.message,
                },
            )
            return cur.rowcount == 1

    async def release(
        self, job_id: UUID, worker_id: str, *, retry_in: float, reason: str, refund: bool = False
    ) -> bool:
        """Puts a RUNNING job of this worker back to QUEUED, to run again after `retry_in` seconds, saying why:
        after a transient failure, or (`refund`: the attempt is not counted) while a dependency is out of reach or
        because the worker is stopping."""
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE jobs.jobs SET state = 'QUEUED', queued_since = now(), update_time = now(),
                    enqueue_time = now() + make_interval(secs => %(retry_in)s), queued_reason = %(reason)s,
                    attempt_count = attempt_count - CASE WHEN %(refund)s THEN 1 ELSE 0 END
                WHERE id = %(id)s AND state = 'RUNNING' AND worker_id = %(worker)s
                """,
                {"retry_in": retry_in, "reason": reason, "refund": refund, "id": job_id, "worker": worker_id},
            )
            return cur.rowcount == 1

    async def mark_unsent(self, *job_ids: UUID) -> None:
        """Records that the jobs' messages could not be sent, so that the next maintenance pass sends them."""
        async with self._cursor() as cur:
            await cur.execute("UPDATE jobs.jobs SET enqueue_time = '-infinity' WHERE id = ANY(%s)", (list(job_ids),))

    # --- maintenance ----------------------------------------------------------------------------------------

    async def reap(self, *, stale_after: float) -> list[Waiting]:
        """Requeues RUNNING jobs whose worker stopped heartbeating, and fails those out of attempts.

        Returns the requeued jobs, whose messages the caller sends again.
        """
        params = {"stale": stale_after}
        stale = "state = 'RUNNING' AND heartbeat_time < now() - make_interval(secs => %(stale)s)"
        async with self._cursor(transaction=True) as cur:
            await cur.execute(
                f"""
                UPDATE jobs.jobs SET state = 'FAILED', finish_time = now(), update_time = now(),
                    error_code = 'UNAVAILABLE', error_reason = 'WORKER_LOST',
                    error_message = 'the worker running the job stopped, and the job has no attempts left'
                WHERE {stale} AND attempt_count >= max_attempts
                """,
                params,
            )
            await cur.execute(
                f"""
                UPDATE jobs.jobs SET state = 'QUEUED', queued_since = now(), update_time = now(), enqueue_time = now(),
                    queued_reason = 'its worker stopped heartbeating; the run counts as an attempt'
                WHERE {stale}
                RETURNING id, priority, trace_context
                """,
                params,
            )
            rows = await cur.fetchall()
        return [Waiting(row["id"], Priority(row["priority"]), False, row["trace_context"]) for row in rows]

    async def unsent(self, *, older_than: float) -> list[Waiting]:
        """QUEUED jobs whose message went out `older_than` seconds ago or more and was not picked up, and those marked
        unsent; takes them for the caller (none is returned again before `older_than`), who resends the lost ones."""
        async with self._cursor() as cur:
            await cur.execute(
                """
                WITH due AS (
                    SELECT id, enqueue_time = '-infinity' AS marked FROM jobs.jobs
                    WHERE state = 'QUEUED' AND enqueue_time < now() - make_interval(secs => %s)
                    FOR UPDATE SKIP LOCKED)
                UPDATE jobs.jobs j SET enqueue_time = now() FROM due WHERE j.id = due.id
                RETURNING j.id, j.priority, due.marked, j.trace_context
                """,
                (older_than,),
            )
            rows = await cur.fetchall()
        return [Waiting(row["id"], Priority(row["priority"]), row["marked"], row["trace_context"]) for row in rows]

    async def census(self) -> tuple[dict[JobState, int], float]:
        """The number of jobs in each state, and the combined items per second of the RUNNING ones."""
        async with self._cursor() as cur:
            await cur.execute(
                """
                SELECT state, count(*) AS n, COALESCE(sum(
                    CASE WHEN state = 'RUNNING' AND update_time > run_start_time AND items_done > run_items_start
                    THEN (items_done - run_items_start) / EXTRACT(EPOCH FROM update_time - run_start_time)
                    END), 0)::float8 AS rate
                FROM jobs.jobs GROUP BY state
                """
            )
            rows = await cur.fetchall()
        return {JobState(row["state"]): row["n"] for row in rows}, sum(row["rate"] for row in rows)

    async def expire(self, *, retention: float) -> tuple[int, int]:
        """Deletes jobs finished more than `retention` seconds ago, and datasets uploaded as long ago that no job
        left reads or read (their records go with them): a dataset stays `retention` after the last job that read
        it finished, so that job can still be retried. Returns the numbers of jobs and datasets deleted. Not bounded
        by the operation timeout: a first pass over a large backlog may take long, and a pass cut short would be
        undone."""
        params = {"retention": retention}
        async with self._cursor(transaction=True, bounded=False) as cur:
            await cur.execute(
                "DELETE FROM jobs.jobs WHERE finish_time < now() - make_interval(secs => %(retention)s)", params
            )
            jobs = cur.rowcount
            await cur.execute(
                """
                DELETE FROM jobs.datasets d
                WHERE create_time < now() - make_interval(secs => %(retention)s)
                  AND NOT EXISTS (SELECT 1 FROM jobs.jobs j WHERE j.dataset_id = d.id)
                """,
                params,
            )
            datasets = cur.rowcount
        return jobs, datasets

    # --- datasets -------------------------------------------------------------------------------------------

    async def insert_dataset(self, dataset: Dataset, records: AsyncIterable[InputRecord]) -> Dataset:
        """Inserts the dataset and all its records in one transaction: all of it, or (on any failure or
        cancellation) nothing. The records are copied in as they come, never all in memory; so the operation
        timeout does not bound it: the upload sets its pace."""
        async with self._cursor(transaction=True, bounded=False) as cur:
            await cur.execute(
                """
                INSERT INTO jobs.datasets (id, sha256, size_bytes, item_count, record_count, tensors, display_name,
                    labels)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                RETURNING *
                """,
                (
                    dataset.id,
                    dataset.sha256,
                    dataset.size_bytes,
                    dataset.item_count,
                    dataset.record_count,
                    Jsonb(
                        [{"name": t.name, "dtype": t.dtype, "item_shape": list(t.item_shape)} for t in dataset.tensors]
                    ),
                    dataset.display_name,
                    Jsonb(dataset.labels),
                ),
            )
            row = await cur.fetchone()
            async with cur.copy(
                "COPY jobs.dataset_records (dataset_id, record_index, first_item, item_count, record)"
                " FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["uuid", "int4", "int8", "int4", "bytea"])
                async for r in records:
                    await copy.write_row((dataset.id, r.index, r.first_item, r.item_count, r.record))
        assert row is not None
        return _dataset(row)

    async def dataset_records(self, dataset_id: UUID, start: int, stop: int) -> list[InputRecord]:
        """The records of the dataset that hold items start .. stop - 1, in order."""
        async with self._cursor() as cur:
            await cur.execute(
                """
                SELECT record_index, first_item, item_count, record FROM jobs.dataset_records
                WHERE dataset_id = %(id)s AND first_item < %(stop)s AND first_item + item_count > %(start)s
                  AND first_item >= (
                    SELECT first_item FROM jobs.dataset_records
                    WHERE dataset_id = %(id)s AND first_item <= %(start)s
                    ORDER BY first_item DESC LIMIT 1)
                ORDER BY first_item
                """,
                {"id": dataset_id, "start": start, "stop": stop},
                binary=True,  # the records arrive as their bytes, not as hex text to decode
            )
            rows = await cur.fetchall()
        return [InputRecord(r["record_index"], r["first_item"], r["item_count"], bytes(r["record"])) for r in rows]

    async def get_dataset(self, dataset_id: UUID) -> Dataset:
        async with self._cursor() as cur:
            await cur.execute("SELECT * FROM jobs.datasets WHERE id = %s", (dataset_id,))
            row = await cur.fetchone()
        if row is None:
            raise DatasetNotFound(str(dataset_id))
        return _dataset(row)

    async def list_datasets(self, labels: dict[str, str], *, limit: int, after: list[Any] | None) -> Page[Dataset]:
        """Datasets newest first, those carrying every one of `labels`; `after` is the last listed one's
        create_time and id."""
        return await self._newest_first(
            "SELECT * FROM jobs.datasets", ["labels @> %s"], [Jsonb(labels)], limit, after, _dataset
        )

    async def delete_dataset(self, dataset_id: UUID) -> None:
        """Deletes a dataset, and its records, unless a live job reads it."""
        async with self._cursor(transaction=True) as cur:
            await cur.execute("SELECT 1 FROM jobs.datasets WHERE id = %s FOR UPDATE", (dataset_id,))
            if await cur.fetchone() is None:
                raise DatasetNotFound(str(dataset_id))
            await cur.execute(
                "SELECT count(*) AS n FROM jobs.jobs WHERE dataset_id = %s AND state = ANY(%s)",
                (dataset_id, list(_LIVE)),
            )
            live = await cur.fetchone()
            if live is not None and live["n"]:
                raise DatasetInUse(str(dataset_id), live["n"])
            await cur.execute("DELETE FROM jobs.datasets WHERE id = %s", (dataset_id,))

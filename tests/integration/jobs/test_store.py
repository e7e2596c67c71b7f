"""The worker's batch writes on a real PostgreSQL: outputs and progress together, each batch once (alone or in a
group that repeats some), nothing after a cancel or a takeover, and writers at the same time all counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import numpy as np
import pytest

from modelforge import tensors
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.domain import Dataset, InputRecord, JobSpec, JobState, Priority, ResultRecord, TensorInfo
from modelforge_jobs.errors import DatasetNotFound
from modelforge_jobs.store import JobStore
from modelforge_server import db
from modelforge_server.refs import ModelRef


async def running_job(store: JobStore, *, batches: int, worker: str = "w1") -> uuid.UUID:
    spec = JobSpec(ModelRef("m", 1, None), 10, Priority.NORMAL, {}, 3, None, None, inline_input=b"")
    job_id = uuid.uuid4()
    await store.insert_job(job_id, spec, model_version=1, items_total=10 * batches, batches_total=batches)
    assert await store.claim(job_id, worker, stale_after=30.0) is not None
    return job_id


def batch(index: int) -> ResultRecord:
    return ResultRecord(index, index * 10, 10, f"outputs {index}".encode())


async def test_a_batch_stored_twice_is_written_and_counted_once(db_pool) -> None:
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    job_id = await running_job(store, batches=3)
    assert await store.store_batches(job_id, "w1", [batch(1)], 0.5) is JobState.RUNNING
    assert await store.store_batches(job_id, "w1", [batch(1)], 0.5) is JobState.RUNNING  # a redelivered batch
    job = await store.get_job(job_id)
    assert (job.progress.items_done, job.progress.batches_done) == (10, 1)
    assert await store.done_batches(job_id) == {1}


async def test_a_group_stores_its_new_batches_and_counts_none_stored_before(db_pool) -> None:
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    job_id = await running_job(store, batches=6)
    assert await store.store_batches(job_id, "w1", [batch(0), batch(2)], 0.5) is JobState.RUNNING
    # A redelivered run that finished batch 2 again, with new ones: only 1, 3 and 4 are written and counted.
    assert await store.store_batches(job_id, "w1", [batch(1), batch(2), batch(3), batch(4)], 0.5) is JobState.RUNNING
    job = await store.get_job(job_id)
    assert (job.progress.items_done, job.progress.batches_done) == (50, 5)
    assert await store.done_batches(job_id) == {0, 1, 2, 3, 4}
    stored = await store.results(job_id, after=-1, limit=10, max_bytes=1 << 20)
    assert [(r.batch_index, r.first_item, r.item_count, r.record) for r in stored] == [
        (i, i * 10, 10, f"outputs {i}".encode()) for i in range(5)
    ]
    assert not await store.complete(job_id, "w1")  # batch 5 is missing
    assert await store.store_batches(job_id, "w1", [batch(5)], 0.5) is JobState.RUNNING
    assert await store.complete(job_id, "w1")


async def test_concurrent_lanes_are_all_counted(db_pool) -> None:
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    job_id = await running_job(store, batches=40)
    states = await asyncio.gather(*(store.store_batches(job_id, "w1", [batch(i)], 0.1) for i in range(40)))
    assert set(states) == {JobState.RUNNING}
    job = await store.get_job(job_id)
    assert (job.progress.items_done, job.progress.batches_done) == (400, 40)
    assert await store.complete(job_id, "w1")


async def test_nothing_is_stored_after_a_cancel_or_by_a_worker_that_lost_the_job(db_pool) -> None:
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    job_id = await running_job(store, batches=3)
    assert await store.store_batches(job_id, "w1", [batch(0)], 0.5) is JobState.RUNNING
    assert await store.store_batches(job_id, "w2", [batch(1)], 0.5) is None  # RUNNING, but not on w2
    assert await store.cancel(job_id) is not None
    assert await store.store_batches(job_id, "w1", [batch(2)], 0.5) is JobState.CANCELLED
    job = await store.get_job(job_id)
    assert (job.progress.items_done, job.progress.batches_done) == (10, 1)
    assert await store.done_batches(job_id) == {0}
    assert await store.store_batches(uuid.uuid4(), "w1", [batch(0)], 0.5) is None  # no such job


@pytest.mark.parametrize("attempts", [1, 2])
async def test_a_job_whose_worker_stopped_is_taken_over_only_with_an_attempt_left(db_pool, attempts: int) -> None:
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    spec = JobSpec(ModelRef("m", 1, None), 10, Priority.NORMAL, {}, attempts, None, None, inline_input=b"")
    job_id = uuid.uuid4()
    await store.insert_job(job_id, spec, model_version=1, items_total=10, batches_total=1)
    assert (await store.claim(job_id, "w1", stale_after=30.0)).attempt_count == 1  # type: ignore[union-attr]
    await asyncio.sleep(0.01)  # w1's heartbeat is now older than a stale_after of 0
    taken = await store.claim(job_id, "w2", stale_after=0.0)  # a redelivered message, on another worker
    if attempts == 1:
        assert taken is None  # no run beyond max_attempts: the reaper fails it
        assert await store.reap(stale_after=0.0) == []
        failed = await store.get_job(job_id)
        assert (failed.state, failed.error.reason if failed.error else None) == (JobState.FAILED, "WORKER_LOST")
    else:
        assert taken is not None and (taken.worker_id, taken.attempt_count) == ("w2", 2)


async def test_a_page_of_results_holds_no_more_bytes_than_asked_but_always_one_batch(db_pool) -> None:
    """Pages of large batches stay small in memory: GetJobResult streams them page by page."""
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    job_id = await running_job(store, batches=4)
    large = [ResultRecord(i, i * 10, 10, bytes([i]) * 1000) for i in range(4)]
    assert await store.store_batches(job_id, "w1", large, 0.5) is JobState.RUNNING

    async def pages(max_bytes: int) -> list[list[int]]:
        found, after = [], -1
        while page := await store.results(job_id, after=after, limit=10, max_bytes=max_bytes):
            found.append([r.batch_index for r in page])
            after = page[-1].batch_index
        return found

    assert await pages(2500) == [[0, 1], [2, 3]]
    assert await pages(10) == [[0], [1], [2], [3]]  # a batch larger than the budget still comes, alone
    assert await pages(1 << 20) == [[0, 1, 2, 3]]


async def test_a_dataset_outlives_its_retention_while_a_job_that_read_it_is_kept(db_pool) -> None:
    """Retention counts from a dataset's last use: a finished job that read it can still be retried."""
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    x = tensors.to_tensor(np.ones((1, 4), np.float32), "x")
    record = DatasetRecord(tensors=[x]).SerializeToString()
    info = (TensorInfo("x", int(x.dtype), (4,)),)
    dataset = Dataset(uuid.uuid4(), "0" * 64, len(record), 1, 1, info, "d", {}, datetime.now(UTC))

    async def records() -> AsyncIterator[InputRecord]:
        yield InputRecord(0, 0, 1, record)

    await store.insert_dataset(dataset, records())
    spec = JobSpec(ModelRef("m", 1, None), 1, Priority.NORMAL, {}, 3, None, None, dataset_id=dataset.id)
    job_id = uuid.uuid4()
    await store.insert_job(job_id, spec, model_version=1, items_total=1, batches_total=1)
    async with db_pool.connection() as conn:
        await conn.execute("UPDATE jobs.datasets SET create_time = now() - interval '2 hours'")
        await conn.execute("UPDATE jobs.jobs SET state = 'COMPLETED', finish_time = now() - interval '10 minutes'")
    assert await store.expire(retention=3600) == (0, 0)  # uploaded 2 h ago, last read 10 min ago
    assert (await store.get_dataset(dataset.id)).id == dataset.id
    async with db_pool.connection() as conn:
        await conn.execute("UPDATE jobs.jobs SET finish_time = now() - interval '2 hours'")
    assert await store.expire(retention=3600) == (1, 1)  # the job's retention ended, and the dataset's with it
    with pytest.raises(DatasetNotFound):
        await store.get_dataset(dataset.id)


async def test_a_job_sent_again_carries_the_trace_of_the_call_that_queued_it(db_pool) -> None:
    """What the maintenance pass sends again (a lost message, a reaped job's) continues the trace of CreateJob or
    RetryJob, not one of its own."""
    await db.migrate(db_pool, schema="jobs", package="modelforge_jobs.migrations")
    store = JobStore(db_pool)
    spec = JobSpec(ModelRef("m", 1, None), 10, Priority.NORMAL, {}, 3, None, None, inline_input=b"")
    created = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    job_id = uuid.uuid4()
    await store.insert_job(job_id, spec, model_version=1, items_total=10, batches_total=1, trace=created)
    await store.mark_unsent(job_id)  # its message could not be sent
    (lost,) = await store.unsent(older_than=60.0)
    assert (lost.id, lost.marked, lost.trace) == (job_id, True, created)

    await store.claim(job_id, "w1", stale_after=30.0)
    await asyncio.sleep(0.01)
    (reaped,) = await store.reap(stale_after=0.0)  # its worker stopped
    assert (reaped.id, reaped.trace) == (job_id, created)

    untraced = uuid.uuid4()  # tracing off: no context to keep
    await store.insert_job(untraced, spec, model_version=1, items_total=10, batches_total=1, trace={})
    await store.mark_unsent(untraced)
    assert [(job.id, job.trace) for job in await store.unsent(older_than=60.0)] == [(untraced, None)]

"""Datasets live in PostgreSQL: an upload is all or nothing, a worker reads only the records a batch needs, and a
worker needs no disk of the API's (nothing is shared but PostgreSQL, Redis and gRPC)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest

from modelforge import tensors
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_jobs.datasets import DatasetItems
from modelforge_jobs.store import JobStore
from tests.fixtures.polling import eventually
from tests.integration.jobs.conftest import (
    dataset_file,
    error_reason,
    results,
    stored_datasets,
    upload,
    upload_dataset,
    wait_terminal,
)


def scratch_bytes(scratch: Path) -> int:
    return sum(p.stat().st_size for p in scratch.iterdir()) if scratch.exists() else 0


async def test_an_upload_cancelled_mid_stream_leaves_no_row_no_records_and_no_file(jobs_api) -> None:
    data = dataset_file({"x": np.ones((4096, 64), np.float32)}, record_items=256)
    half = len(data) // 2
    never = asyncio.Event()

    async def requests() -> AsyncIterator[jobs_pb2.UploadDatasetRequest]:
        yield jobs_pb2.UploadDatasetRequest(
            header=jobs_pb2.UploadDatasetHeader(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        )
        yield jobs_pb2.UploadDatasetRequest(chunk=data[:half])
        await never.wait()  # the client goes quiet mid-stream, then gives up

    scratch = jobs_api.settings.upload_dir
    call = jobs_api.stub.UploadDataset(requests())
    await eventually(lambda: scratch_bytes(scratch) >= half, "the API has half the upload in its scratch file")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: not list(scratch.iterdir()), "the API removed the partial upload")
    assert await stored_datasets(jobs_api.settings) == (0, 0)

    # The API goes on taking uploads, and a stored upload leaves no scratch file either.
    dataset = await upload_dataset(jobs_api.stub, data)
    assert (dataset.item_count, dataset.record_count) == (4096, 16)
    assert await stored_datasets(jobs_api.settings) == (1, 16)
    assert not list(scratch.iterdir())


async def test_a_batch_reads_only_the_records_that_hold_its_items(jobs_api, db_pool) -> None:
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": x}, record_items=7))  # 0, 7, ..., 49
    store = JobStore(db_pool)
    dataset_id = uuid.UUID(dataset.id)

    records = await store.dataset_records(dataset_id, 10, 22)
    assert [(r.index, r.first_item, r.item_count) for r in records] == [(1, 7, 7), (2, 14, 7), (3, 21, 7)]
    assert [r.first_item for r in await store.dataset_records(dataset_id, 49, 50)] == [49]
    assert await store.dataset_records(dataset_id, 50, 60) == []

    fetched: list[tuple[int, int]] = []

    async def fetch(start: int, stop: int):
        fetched.append((start, stop))
        return await store.dataset_records(dataset_id, start, stop)

    items = DatasetItems(fetch, cached_records=4)
    for start, stop in [(5, 30), (8, 12), (30, 50), (0, 50)]:
        batch = {t.name: tensors.to_numpy(t) for t in await items.read(start, stop)}
        np.testing.assert_array_equal(batch["x"], x[start:stop])
    # (8, 12) lay in records already read; (0, 50) needed more records than the cache keeps.
    assert fetched == [(5, 30), (30, 50), (0, 50)]


async def test_a_dataset_job_runs_on_a_worker_with_a_data_dir_of_its_own(
    jobs_api, jobs_settings, spawn_worker, inference, add_one, tmp_path
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": x}, record_items=300))
    # Nothing of the API's disk survives, and the worker is pointed elsewhere.
    shutil.rmtree(jobs_settings.data_dir)
    worker_dir = tmp_path / "worker-host"
    request = jobs_pb2.CreateJobRequest(
        model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=dataset.id, batch_size=128
    )
    job = (await jobs_api.stub.CreateJob(request)).job
    with spawn_worker(replace(jobs_settings, data_dir=worker_dir)):
        final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
    firsts, outputs = await results(jobs_api.stub, job.id)
    assert firsts == list(range(0, 1000, 128))
    np.testing.assert_array_equal(outputs["y"], x + 1)
    assert not jobs_settings.data_dir.exists()
    assert not worker_dir.exists() or not [p for p in worker_dir.rglob("*") if p.is_file()]


async def test_datasets_list_newest_first_by_page_and_label(jobs_api) -> None:
    data = dataset_file({"x": np.ones((4, 4), np.float32)}, record_items=2)
    uploaded = [
        (await upload_dataset(jobs_api.stub, data, labels={"team": "a" if i % 2 else "b"})).id for i in range(5)
    ]
    seen, token = [], ""
    while True:
        page = await jobs_api.stub.ListDatasets(jobs_pb2.ListDatasetsRequest(page_size=2, page_token=token))
        assert len(page.datasets) <= 2
        seen += [d.id for d in page.datasets]
        if not (token := page.next_page_token):
            break
    assert seen == uploaded[::-1]
    team_a = await jobs_api.stub.ListDatasets(jobs_pb2.ListDatasetsRequest(labels={"team": "a"}))
    assert [d.id for d in team_a.datasets] == [uploaded[3], uploaded[1]]
    assert all(d.item_count == 4 and d.labels["team"] == "a" for d in team_a.datasets)

    first = await jobs_api.stub.ListDatasets(jobs_pb2.ListDatasetsRequest(page_size=1))
    other = jobs_pb2.ListDatasetsRequest(labels={"team": "a"}, page_token=first.next_page_token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs_api.stub.ListDatasets(other)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for bad in (jobs_pb2.ListDatasetsRequest(page_size=-1), jobs_pb2.ListDatasetsRequest(page_token="not a token!")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs_api.stub.ListDatasets(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("page_size" if bad.page_size else "page_token") in (caught.value.details() or "")


async def test_a_job_keeps_the_id_of_its_deleted_dataset_and_cannot_run_again(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": np.ones((6, 4), np.float32)}, record_items=3))
    request = jobs_pb2.CreateJobRequest(model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=dataset.id)
    job = (await jobs_api.stub.CreateJob(request)).job  # no worker: it stays QUEUED until cancelled
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    await jobs_api.stub.DeleteDataset(jobs_pb2.DeleteDatasetRequest(id=dataset.id))

    kept = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert (kept.dataset_id, kept.dataset_deleted) == (dataset.id, True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "DATASET_DELETED"
    assert dataset.id in (caught.value.details() or "")
    still = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert still.state == jobs_pb2.JOB_STATE_CANCELLED


async def _a_dataset_and_a_job_request(  # type: ignore[no-untyped-def]
    jobs_api, inference, add_one
) -> tuple[jobs_pb2.Dataset, jobs_pb2.CreateJobRequest]:
    await upload(inference, "add-one", add_one)
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": np.ones((6, 4), np.float32)}, record_items=3))
    return dataset, jobs_pb2.CreateJobRequest(model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=dataset.id)


@asynccontextmanager
async def deletion_in_progress(database_url: str, dataset_id: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A deletion of the dataset, as DeleteDataset makes it, left uncommitted for the block; committed after."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("SELECT 1 FROM jobs.datasets WHERE id = %s FOR UPDATE", (dataset_id,))
        await conn.execute("DELETE FROM jobs.datasets WHERE id = %s", (dataset_id,))
        yield conn
        await conn.commit()


async def waiting_on_a_lock(database_url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        row = await cur.fetchone()
    return row is not None and row[0] > 0


async def test_a_job_submitted_while_its_dataset_is_deleted_is_not_found_not_internal(
    jobs_api, jobs_settings, inference, add_one
) -> None:
    dataset, request = await _a_dataset_and_a_job_request(jobs_api, inference, add_one)
    url = jobs_settings.database_url or ""
    async with deletion_in_progress(url, dataset.id):
        submit = asyncio.ensure_future(jobs_api.stub.CreateJob(request))  # reads the dataset, then waits on the lock
        await eventually(lambda: waiting_on_a_lock(url), "the submit to wait for the deletion")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # it was INTERNAL, a foreign key violation
    assert error_reason(caught.value) == "DATASET_NOT_FOUND"
    assert list((await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs) == []


async def test_a_retry_racing_the_deletion_of_its_dataset_is_refused_and_the_job_stays_as_it_was(
    jobs_api, jobs_settings, inference, add_one
) -> None:
    dataset, request = await _a_dataset_and_a_job_request(jobs_api, inference, add_one)
    job = (await jobs_api.stub.CreateJob(request)).job  # no worker: it stays QUEUED until cancelled
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    url = jobs_settings.database_url or ""
    async with deletion_in_progress(url, dataset.id):
        retry = asyncio.ensure_future(jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id)))
        await eventually(lambda: waiting_on_a_lock(url), "the retry to wait for the deletion")
    # Both used to succeed: the job was queued again without its input, and then failed.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retry
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "DATASET_DELETED"
    still = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert (still.state, still.dataset_deleted) == (jobs_pb2.JOB_STATE_CANCELLED, True)


async def test_jobs_written_before_the_dataset_id_was_kept_say_what_they_read(
    jobs_api, jobs_settings, inference, add_one
) -> None:
    # Rows from before migration 0005, or written by an older replica during a rolling upgrade, have no
    # input_dataset_id. They read as inline jobs: a job on a live dataset showed no dataset, and one whose dataset
    # was deleted before the upgrade could not say why it cannot run again.
    dataset, request = await _a_dataset_and_a_job_request(jobs_api, inference, add_one)
    live = (await jobs_api.stub.CreateJob(request)).job
    gone = (await jobs_api.stub.CreateJob(request)).job
    for job in (live, gone):
        await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url or "", autocommit=True) as conn:
        await conn.execute("UPDATE jobs.jobs SET input_dataset_id = NULL")  # as an older version wrote them
        await conn.execute("UPDATE jobs.jobs SET dataset_id = NULL WHERE id = %s", (gone.id,))  # deleted, back then

    shown = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=live.id))).job
    assert (shown.dataset_id, shown.dataset_deleted) == (dataset.id, False)
    shown = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=gone.id))).job
    assert (shown.dataset_id, shown.dataset_deleted) == ("", True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=gone.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "DATASET_DELETED"
    retried = (await jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=live.id))).job
    assert retried.state == jobs_pb2.JOB_STATE_QUEUED

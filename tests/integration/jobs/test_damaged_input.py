"""A job whose stored input was damaged at rest, after its upload or submit checked it, fails at once with DATA_LOSS
`INPUT_DAMAGED`, naming what is damaged and what to do: running it again would read the same bytes, so it spends
one attempt, not all of them as a fault would."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import psycopg
import pytest

from modelforge import tensors
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_jobs.settings import JobsSettings
from tests.integration.jobs.conftest import (
    dataset_file,
    inline_request,
    upload,
    upload_dataset,
    wait_terminal,
)

X = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)


async def execute(settings: JobsSettings, sql: str, *params: object) -> None:
    async with await psycopg.AsyncConnection.connect(settings.database_url or "", autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        assert cur.rowcount == 1


async def run_damaged(jobs_api, jobs_settings, start_worker, caplog, job_id: str) -> jobs_pb2.Job:
    """Runs the job on a worker; checks that it failed at once as damaged, and returns it."""
    with caplog.at_level(logging.WARNING, logger="modelforge.jobs"):
        async with start_worker(jobs_settings):
            final = await wait_terminal(jobs_api.stub, job_id, timeout=30)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert final.attempt_count == 1  # of 3: not retried
    assert (final.error.code, final.error.reason) == ("DATA_LOSS", "INPUT_DAMAGED")
    # An expected failure: one line in the worker's log, no traceback of a fault.
    assert not [r for r in caplog.records if r.getMessage() == f"job {job_id}: unexpected failure"]
    return final


async def dataset_job(jobs_api, inference, add_one) -> tuple[jobs_pb2.Dataset, jobs_pb2.Job]:
    """A job of batches of 10 on a dataset of 30 items stored as three records, not yet run."""
    await upload(inference, "add-one", add_one)
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": X}, record_items=10))
    request = jobs_pb2.CreateJobRequest(
        model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=dataset.id, batch_size=10, max_attempts=3
    )
    return dataset, (await jobs_api.stub.CreateJob(request)).job


async def test_a_dataset_record_cut_short_at_rest_fails_the_job_at_once_naming_the_record(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog: pytest.LogCaptureFixture
) -> None:
    dataset, job = await dataset_job(jobs_api, inference, add_one)
    # The second record's stored bytes are cut short, no longer a DatasetRecord that protobuf can parse.
    await execute(
        jobs_settings,
        "UPDATE jobs.dataset_records SET record = substring(record FROM 1 FOR length(record) / 2)"
        " WHERE dataset_id = %s AND record_index = 1",
        uuid.UUID(dataset.id),
    )

    final = await run_damaged(jobs_api, jobs_settings, start_worker, caplog, job.id)

    assert final.error.message == (
        f"record 1 of dataset {dataset.id} is damaged in the jobs service's database: its bytes do not parse as a "
        "DatasetRecord; upload the dataset again and submit the job on the new dataset"
    )


async def test_a_dataset_record_that_parses_but_is_not_the_datasets_fails_the_job_at_once(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog: pytest.LogCaptureFixture
) -> None:
    dataset, job = await dataset_job(jobs_api, inference, add_one)
    # A whole, parsable record in place of the third, but of a tensor the dataset does not hold.
    other = jobs_pb2.DatasetRecord(tensors=[tensors.to_tensor(X[20:30], "y")]).SerializeToString()
    await execute(
        jobs_settings,
        "UPDATE jobs.dataset_records SET record = %s WHERE dataset_id = %s AND record_index = 2",
        other,
        uuid.UUID(dataset.id),
    )

    final = await run_damaged(jobs_api, jobs_settings, start_worker, caplog, job.id)

    assert final.error.message.startswith(
        f"record 2 of dataset {dataset.id} is damaged in the jobs service's database: its tensors' names, dtypes or "
        "item shapes are not the dataset's; upload the dataset again"
    )


async def test_an_inline_input_cut_short_at_rest_fails_the_job_at_once(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog: pytest.LogCaptureFixture
) -> None:
    await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": X}, batch_size=10, max_attempts=3))).job
    await execute(
        jobs_settings,
        "UPDATE jobs.inputs SET record = substring(record FROM 1 FOR length(record) / 2) WHERE job_id = %s",
        uuid.UUID(job.id),
    )

    final = await run_damaged(jobs_api, jobs_settings, start_worker, caplog, job.id)

    assert final.error.message == (
        "the job's inline input is damaged in the jobs service's database: its bytes do not parse as a "
        "DatasetRecord; submit the job again"
    )

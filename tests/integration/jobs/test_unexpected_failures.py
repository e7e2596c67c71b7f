"""A job whose run fails with an error no kind names (a fault, not an expected failure) is retried per its
max_attempts and then FAILED with a readable error, its traceback in the worker's log: never left RUNNING, never
lost."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import psycopg
import pytest

from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from tests.integration.jobs.conftest import dataset_file, upload, upload_dataset, wait_terminal


async def test_a_dataset_record_corrupted_after_submit_fails_the_job_after_its_attempts(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog: pytest.LogCaptureFixture
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": x}, record_items=10))
    request = jobs_pb2.CreateJobRequest(
        model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=dataset.id, batch_size=10, max_attempts=2
    )
    job = (await jobs_api.stub.CreateJob(request)).job
    # The stored bytes of the second record are cut short at rest, after the upload checked them: no longer a
    # DatasetRecord that protobuf can parse.
    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url or "", autocommit=True) as conn:
        cur = await conn.execute(
            "UPDATE jobs.dataset_records SET record = substring(record FROM 1 FOR length(record) / 2)"
            " WHERE dataset_id = %s AND record_index = 1",
            (uuid.UUID(dataset.id),),
        )
        assert cur.rowcount == 1

    with caplog.at_level(logging.WARNING, logger="modelforge.jobs"):
        async with start_worker(jobs_settings):
            final = await wait_terminal(jobs_api.stub, job.id, timeout=30)

    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert final.attempt_count == 2
    assert (final.error.code, final.error.reason) == ("INTERNAL", "ATTEMPTS_EXHAUSTED")
    assert final.error.message == (
        "gave up after 2 attempts; the last failed with: the worker failed unexpectedly; details are in the worker's "
        "log"
    )
    # Each attempt left its traceback in the worker's log, naming the fault.
    unexpected = [r for r in caplog.records if r.getMessage() == f"job {job.id}: unexpected failure"]
    assert len(unexpected) == 2
    assert all(r.exc_info and type(r.exc_info[1]).__name__ == "DecodeError" for r in unexpected)

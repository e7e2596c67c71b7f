"""A worker process killed mid-job: the job completes on another worker with every item's output exactly once."""

from __future__ import annotations

import asyncio
import signal

import numpy as np

from modelforge.jobs.v1 import jobs_pb2
from tests.integration.jobs.conftest import getter, inline_request, results, upload, wait_for, wait_terminal


async def test_sigkilled_worker_job_completes_on_another_worker_exactly_once(
    jobs_api, jobs_settings, spawn_worker, start_worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(20_000 * 4, dtype=np.float32).reshape(20_000, 4)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job
    with spawn_worker(jobs_settings) as process:
        first = await wait_for(getter(jobs_api.stub, job.id), lambda j: j.progress.items_done > 0, timeout=60)
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
    killed = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert killed.state == jobs_pb2.JOB_STATE_RUNNING and killed.progress.items_done < 20_000

    async with start_worker(jobs_settings) as survivor:
        final = await wait_terminal(jobs_api.stub, job.id)
        assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        assert final.worker_id == survivor.resources.worker_id != first.worker_id
        assert final.attempt_count == 2
        assert final.progress.items_done == 20_000 and final.progress.batches_done == 2_000

    firsts, outputs = await results(jobs_api.stub, job.id)
    assert firsts == list(range(0, 20_000, 10))  # every batch once, in order
    np.testing.assert_array_equal(outputs["y"], x + 1)

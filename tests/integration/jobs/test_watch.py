"""WatchJob is woken by PostgreSQL's change notifications: with its fallback poll set far beyond the test's
patience, a watcher still sees the job start, progress (only upwards) and complete."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

from modelforge.jobs.v1 import jobs_pb2
from tests.integration.jobs.conftest import inline_request, upload


async def test_watch_follows_a_job_by_notifications_alone(
    jobs_settings, start_jobs_api, start_worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    settings = replace(jobs_settings, watch_interval=3600.0)  # a poll would come long after the timeout below
    x = np.arange(6_000 * 4, dtype=np.float32).reshape(6_000, 4)
    async with start_jobs_api(settings) as api:
        job = (await api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job
        async with asyncio.timeout(60):
            stream = api.stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id))
            events = [(await anext(aiter(stream))).job]  # the current state first: QUEUED, no worker yet
            async with start_worker(settings):
                events += [message.job async for message in stream]
    assert events[0].state == jobs_pb2.JOB_STATE_QUEUED
    assert any(e.state == jobs_pb2.JOB_STATE_RUNNING and 0 < e.progress.items_done < 6_000 for e in events)
    done = [e.progress.items_done for e in events]
    assert done == sorted(done), "progress went down"
    assert events[-1].state == jobs_pb2.JOB_STATE_COMPLETED and done[-1] == 6_000

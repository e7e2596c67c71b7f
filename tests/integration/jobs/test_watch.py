"""WatchJob is woken by PostgreSQL's change notifications: with its fallback poll set far beyond the test's
patience, a watcher still sees the job start, progress (only upwards) and complete; the watchers of one job share
each read of it."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import grpc
import numpy as np

from modelforge.jobs.v1 import jobs_pb2
from modelforge_jobs.domain import JobState
from modelforge_jobs.events import JobChanges
from modelforge_jobs.inference_client import RegistryClient
from modelforge_jobs.jobs import Jobs
from modelforge_jobs.store import JobStore
from modelforge_server import db
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


async def test_the_watchers_of_one_job_share_each_read_of_it(
    jobs_api, jobs_settings, inference, add_one, tmp_path
) -> None:
    # A thousand WatchJob streams on one job used to read it a thousand times per change, through the pool that
    # every call and the health check take from, until the service reported itself NOT_SERVING.
    await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": np.ones((3, 4), np.float32)}))).job
    url = jobs_settings.database_url
    changes = JobChanges(url)
    await changes.start()
    async with db.open_pool(url) as pool, grpc.aio.insecure_channel(inference.registry.address) as channel:
        jobs = Jobs(JobStore(pool), tmp_path, RegistryClient(channel, timeout=10), _no_sends, changes=changes)
        watchers = [jobs.watch(uuid.UUID(job.id)) for _ in range(200)]
        try:
            firsts = await asyncio.gather(*(anext(w) for w in watchers))
            assert {first.state for first in firsts} == {JobState.QUEUED}
            before = pool.get_stats()["requests_num"]
            await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
            lasts = await asyncio.wait_for(asyncio.gather(*(anext(w) for w in watchers)), 30)
            assert {last.state for last in lasts} == {JobState.CANCELLED}
            reads = pool.get_stats()["requests_num"] - before
            assert reads <= 10, f"{len(watchers)} watchers read the job {reads} times for one change"
        finally:
            await asyncio.gather(*(w.aclose() for w in watchers))
            await changes.aclose()


async def _no_sends(job_id: uuid.UUID, priority: object) -> None:
    raise AssertionError("watching sends no message")

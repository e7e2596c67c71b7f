"""A worker process killed mid-job: the job completes on another worker with every item's output exactly once,
and the workers' counters add up to the job: nothing counted twice, nothing lost. A worker told to stop mid-job
puts the job back in the queue between batches, its attempt not spent, and exits. A delivery that finds
PostgreSQL out of reach is retried, with a warning rather than a traceback, and the job completes after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import urllib.parse
from dataclasses import replace

import numpy as np
import psycopg
import redis

from modelforge.jobs.v1 import jobs_pb2
from modelforge_jobs.actors import QUEUES
from modelforge_jobs.domain import Priority
from modelforge_jobs.errors import DependencyUnavailable
from modelforge_server import embedded
from tests.fixtures.polling import eventually
from tests.fixtures.proxy import TcpProxy
from tests.integration.jobs.conftest import (
    getter,
    inline_request,
    open_resources,
    results,
    scrape_metrics,
    upload,
    wait_for,
    wait_terminal,
)


def scrape_items(port: int) -> float:
    """modelforge_jobs_items_total as the worker process serves it on its metrics port."""
    return scrape_metrics(port)["modelforge_jobs_items_total"]


async def until_items_counted(port: int, *, timeout: float = 30.0) -> None:
    """Polls the worker's /metrics until it counts stored items (it counts just after each batch commits)."""
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(scrape_items, port) == 0:
        assert time.monotonic() < deadline, "the worker process never counted an item on its metrics port"
        await asyncio.sleep(0.02)


async def test_sigkilled_worker_job_completes_on_another_worker_exactly_once(
    jobs_api, jobs_settings, spawn_worker, start_worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(20_000 * 4, dtype=np.float32).reshape(20_000, 4)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job
    metrics_port = embedded.free_port()
    with spawn_worker(replace(jobs_settings, worker_metrics_port=metrics_port)) as process:
        first = await wait_for(getter(jobs_api.stub, job.id), lambda j: j.progress.items_done > 0, timeout=60)
        await until_items_counted(metrics_port)  # the worker process serves its own metrics
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

    # The survivor counts exactly the items and batches the killed worker left undone. It took the job over one of
    # two ways, which race, both after the heartbeat timeout: its maintenance pass reaped the job and queued it
    # again (counted as reaped), or the broker's own maintenance gave it the killed worker's unacknowledged
    # message first, and the job, stale, was claimed from that (nothing reaped).
    counted = survivor.resources.metrics.metrics.registry.get_sample_value
    assert counted("modelforge_jobs_reaped_total") in (0, 1)
    assert counted("modelforge_jobs_items_total") == 20_000 - killed.progress.items_done
    assert counted("modelforge_jobs_batches_total") == 2_000 - killed.progress.batches_done
    assert counted("modelforge_jobs_runs_started_total") == 1
    assert counted("modelforge_jobs_completed_total") == 1


async def test_jobs_a_sigkilled_worker_had_taken_but_not_started_run_within_a_heartbeat_timeout(
    jobs_api, jobs_settings, spawn_worker, start_worker, inference, add_one
) -> None:
    # A worker takes more messages than it runs at once (Dramatiq prefetches twice its threads): killed, it leaves
    # those jobs QUEUED with their messages in its acknowledgement set, for the broker's maintenance to put back.
    await upload(inference, "add-one", add_one)
    x = np.ones((5_000, 4), dtype=np.float32)
    ids = [
        (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job.id
        for _ in range(2 * jobs_settings.worker_threads)
    ]
    queue = f"{jobs_settings.queue_namespace}:{QUEUES[Priority.NORMAL]}"
    client = redis.Redis.from_url(jobs_settings.redis_url or "")
    with spawn_worker(jobs_settings) as process:
        for job_id in ids[: jobs_settings.worker_threads]:
            await wait_for(getter(jobs_api.stub, job_id), lambda j: j.progress.items_done > 0, timeout=60)
        await eventually(lambda: client.llen(queue) == 0, "the worker to take every message", timeout=30)
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
    taken = [(await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=i))).job for i in ids]
    assert sum(job.state == jobs_pb2.JOB_STATE_QUEUED for job in taken) == jobs_settings.worker_threads
    async with start_worker(jobs_settings):
        for job_id in ids:  # resend_after (10 minutes) would have sent the queued ones again, not the broker
            final = await wait_terminal(jobs_api.stub, job_id, timeout=60)
            assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
    client.close()


async def test_sigtermed_worker_stops_between_batches_and_requeues_the_job_without_spending_an_attempt(
    jobs_api, jobs_settings, spawn_worker, start_worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(50_000 * 4, dtype=np.float32).reshape(50_000, 4)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job
    with spawn_worker(jobs_settings) as process:
        first = await wait_for(getter(jobs_api.stub, job.id), lambda j: j.progress.items_done > 0, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    stopped = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    # Back in the queue at once, not RUNNING until a heartbeat timeout, and not run to the end.
    assert stopped.state == jobs_pb2.JOB_STATE_QUEUED
    assert first.progress.items_done <= stopped.progress.items_done < 50_000
    assert stopped.attempt_count == 0 and not stopped.HasField("error")

    async with start_worker(jobs_settings) as survivor:
        final = await wait_terminal(jobs_api.stub, job.id)
        assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        assert final.worker_id == survivor.resources.worker_id != first.worker_id
        assert final.attempt_count == 1  # the interrupted run did not count

    firsts, outputs = await results(jobs_api.stub, job.id)
    assert firsts == list(range(0, 50_000, 10))  # every batch once, in order
    np.testing.assert_array_equal(outputs["y"], x + 1)
    counted = survivor.resources.metrics.metrics.registry.get_sample_value
    assert counted("modelforge_jobs_reaped_total") == 0  # the message was sent again: nothing waited for a reaper
    assert counted("modelforge_jobs_items_total") == 50_000 - stopped.progress.items_done


async def test_a_job_queued_before_its_worker_boots_runs_at_the_first_delivery(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}))).job
    with caplog.at_level(logging.WARNING, logger="dramatiq"):
        async with start_worker(jobs_settings):  # its consumers find the message waiting
            final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
    failed = [r.getMessage() for r in caplog.records if r.name.startswith("dramatiq") and r.levelno >= logging.ERROR]
    assert failed == []  # no delivery reached the actor before the worker's pool and runner were open


async def test_the_maintenance_pass_resends_a_message_redis_lost_and_leaves_one_waiting_in_a_backlog(
    jobs_api, jobs_settings, start_worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.ones((3, 4), dtype=np.float32)
    waiting, lost = [(await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}))).job.id for _ in range(2)]
    client = redis.Redis.from_url(jobs_settings.redis_url or "")
    namespace, queue = jobs_settings.queue_namespace, QUEUES[Priority.NORMAL]
    where = client.hget(f"{namespace}:job-messages", lost)
    assert where is not None and where.decode().split(" ")[0] == queue
    message_id = where.decode().split(" ")[1]
    assert client.hdel(f"{namespace}:{queue}.msgs", message_id) == 1  # the message of `lost` is gone from Redis
    assert client.lrem(f"{namespace}:{queue}", 0, message_id) == 1
    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url, autocommit=True) as conn:
        await conn.execute("UPDATE jobs.jobs SET enqueue_time = now() - interval '1 hour'")  # both waited long

    settings = replace(jobs_settings, maintenance_interval=3600.0)  # only the pass at start, and this test's
    async with open_resources(settings) as resources:
        await resources.maintain_once()
        resent = resources.metrics.metrics.registry.get_sample_value("modelforge_jobs_messages_resent_total")
    assert resent == 1  # `waiting`'s message is still in the queue: a second one would only be dropped later
    assert client.llen(f"{namespace}:{queue}") == 2
    async with start_worker(jobs_settings):
        for job_id in (waiting, lost):
            final = await wait_terminal(jobs_api.stub, job_id, timeout=60)
            assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        # Acknowledged messages leave no location behind.
        await eventually(lambda: client.hlen(f"{namespace}:job-messages") == 0, "the job messages to be forgotten")
    client.close()


async def test_a_maintenance_pass_stopped_before_its_sends_leaves_them_to_the_next_pass(
    jobs_api, jobs_settings, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.ones((3, 4), dtype=np.float32)
    job_id = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}))).job.id
    redis_url = urllib.parse.urlsplit(jobs_settings.redis_url)
    proxy = await TcpProxy.to_address(redis_url.hostname or "127.0.0.1", redis_url.port or 6379)
    settings = replace(jobs_settings, redis_url=f"redis://{proxy.address}/0", maintenance_interval=3600.0)
    try:
        async with (
            open_resources(settings) as resources,
            await psycopg.AsyncConnection.connect(jobs_settings.database_url, autocommit=True) as conn,
        ):
            queued = resources.metrics.metrics.registry.get_sample_value
            # The worker's own pass at start, the one before the hour its loop then sleeps, has set its gauges.
            await eventually(lambda: queued("modelforge_jobs_jobs", {"state": "QUEUED"}) == 1, "the first pass")

            async def enqueued() -> float:  # -inf: marked for the next pass
                cursor = await conn.execute(
                    "SELECT extract(epoch FROM enqueue_time)::float8 FROM jobs.jobs WHERE id = %s", (job_id,)
                )
                row = await cursor.fetchone()
                assert row is not None
                return float(row[0])

            await conn.execute("UPDATE jobs.jobs SET enqueue_time = now() - interval '1 hour'")
            long_ago = await enqueued()
            proxy.stall()  # the queue's Redis stops answering: the pass waits on it with its job taken
            passing = asyncio.create_task(resources.maintain_once())

            async def taken() -> bool:
                return await enqueued() > long_ago

            await eventually(taken, "the pass to take the job for resending")
            passing.cancel()  # the worker stops
            with contextlib.suppress(asyncio.CancelledError):
                await passing
            assert await enqueued() == float("-inf")  # for the next pass, not in MODELFORGE_RESEND_AFTER
            await proxy.restore()
    finally:
        await proxy.close()


async def test_a_message_the_maintenance_pass_could_not_send_is_sent_by_the_next_pass(
    jobs_api, jobs_settings, inference, add_one, closed_port
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.ones((3, 4), dtype=np.float32)
    ids = [(await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}))).job.id for _ in range(2)]
    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url, autocommit=True) as conn:
        # Their messages were lost long ago (a Redis flushed or restarted without its data).
        await conn.execute("UPDATE jobs.jobs SET enqueue_time = now() - interval '1 hour'")

    # No Redis there; the worker's own first pass and this test's run one after the other, and the next of its
    # own is an hour away, so that none is cut short by the close below.
    down = replace(jobs_settings, redis_url=f"redis://127.0.0.1:{closed_port}/0", maintenance_interval=3600.0)
    async with open_resources(down) as resources:
        with contextlib.suppress(DependencyUnavailable):  # the pass ends on the queue lengths it cannot read
            await resources.maintain_once()

    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT id::text, enqueue_time = '-infinity' FROM jobs.jobs ORDER BY id")
        marked = dict(await cursor.fetchall())
    assert marked == {job_id: True for job_id in sorted(ids)}  # each still to send, by the next pass


async def test_a_delivery_that_finds_postgresql_out_of_reach_is_retried_quietly_and_the_job_completes_after(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog
) -> None:
    await upload(inference, "add-one", add_one)
    proxy = await TcpProxy.to_postgres(jobs_settings.database_url or "")
    try:
        async with start_worker(replace(jobs_settings, database_url=proxy.url)):
            await proxy.cut()  # the worker's PostgreSQL goes away; the API's stays
            x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
            with caplog.at_level(logging.INFO, logger="dramatiq"):
                job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}))).job
                await eventually(lambda: retried(caplog), "the worker to retry the message it could not claim")
                assert (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job.state == (
                    jobs_pb2.JOB_STATE_QUEUED
                )
                await proxy.restore()
                final = await wait_terminal(jobs_api.stub, job.id)
            assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
            assert final.attempt_count == 1
            _, outputs = await results(jobs_api.stub, job.id)
            np.testing.assert_array_equal(outputs["y"], x + 1)
    finally:
        await proxy.close()
    # An outage is expected: it is a warning, not a traceback of a failure.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_run_cut_off_from_postgresql_resumes_on_its_worker_without_spending_an_attempt(
    jobs_api, jobs_settings, start_worker, inference, add_one, caplog
) -> None:
    # The run fails on PostgreSQL, and so does putting the job back in the queue: it stays RUNNING here, and its
    # message comes again. That delivery used to be dropped ("running elsewhere"), and the job waited for the
    # reaper, which counted the attempt: with one attempt, FAILED WORKER_LOST, though no worker was lost.
    await upload(inference, "add-one", add_one)
    settings = replace(jobs_settings, heartbeat_timeout=60.0)  # no reaper within the test: the resume must do it
    proxy = await TcpProxy.to_postgres(settings.database_url or "")
    x = np.arange(20_000 * 4, dtype=np.float32).reshape(20_000, 4)
    try:
        async with start_worker(replace(settings, database_url=proxy.url)):
            with caplog.at_level(logging.INFO, logger="dramatiq"):
                request = inline_request("add-one", {"x": x}, batch_size=10, max_attempts=1)
                job = (await jobs_api.stub.CreateJob(request)).job
                await wait_for(getter(jobs_api.stub, job.id), lambda j: j.progress.items_done > 0, timeout=60)
                await proxy.cut()
                await eventually(lambda: retried(caplog), "the worker to retry the message of the run it lost")
                cut_off = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
                assert cut_off.state == jobs_pb2.JOB_STATE_RUNNING
                await proxy.restore()
                final = await wait_terminal(jobs_api.stub, job.id, timeout=45)
        assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        assert final.attempt_count == 1
        firsts, outputs = await results(jobs_api.stub, job.id)
        assert firsts == list(range(0, 20_000, 10))  # every batch once
        np.testing.assert_array_equal(outputs["y"], x + 1)
    finally:
        await proxy.close()


def retried(caplog) -> bool:
    return any(r.name.startswith("dramatiq") and "Retrying message" in r.getMessage() for r in caplog.records)


async def test_maintenance_passes_failing_through_an_outage_are_logged_once_and_their_recovery_once(
    jobs_settings, caplog
) -> None:
    proxy = await TcpProxy.to_postgres(jobs_settings.database_url or "")
    settings = replace(jobs_settings, database_url=proxy.url, maintenance_interval=0.05)
    try:
        with caplog.at_level(logging.INFO, logger="modelforge.jobs.worker"):
            async with open_resources(settings):
                await proxy.cut()

                def said(start: str) -> list[logging.LogRecord]:
                    return [r for r in caplog.records if r.getMessage().startswith(start)]

                # Every 0.05 s a pass fails: each waits out the pool's outage check, about a second.
                await eventually(lambda: len(said("maintenance pass failed")) == 1, "the outage logged")
                await asyncio.sleep(2.5)  # more passes fail meanwhile, and say nothing
                await proxy.restore()
                await eventually(lambda: said("maintenance passes work again"), "the recovery logged")
        assert [r.levelname for r in said("maintenance pass failed")] == ["WARNING"]
        assert len(said("maintenance passes work again")) == 1
    finally:
        await proxy.close()

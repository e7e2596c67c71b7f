"""The jobs service's Prometheus series move by exactly what real jobs did, on real workers, scraped over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from modelforge.jobs.v1 import jobs_pb2
from modelforge_server.metrics import Metrics
from tests.fixtures.metrics import Samples, scrape
from tests.integration.jobs.conftest import inline_request, open_resources, upload, wait_terminal

JOBS = "modelforge.jobs.v1.JobService"


@contextmanager
def scraped(metrics: Metrics) -> Iterator[Callable[[], Samples]]:
    """Serves `metrics` on a free port; yields a function that scrapes every sample over HTTP."""
    endpoint = metrics.serve("127.0.0.1", 0)
    try:
        yield lambda: scrape(endpoint.port)
    finally:
        endpoint.close()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_a_job_moves_the_counters_by_its_items_batches_and_runs(jobs_api, worker, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    with scraped(worker.resources.metrics.metrics) as scrape_worker, scraped(jobs_api.server.metrics) as scrape_api:
        worker_before, api_before = await asyncio.to_thread(scrape_worker), await asyncio.to_thread(scrape_api)
        request = inline_request("add-one", {"x": x}, batch_size=4, request_id="counted-once")
        job = (await jobs_api.stub.CreateJob(request)).job
        again = (await jobs_api.stub.CreateJob(request)).job  # the same request_id: the same job, not a second
        assert again.id == job.id
        final = await wait_terminal(jobs_api.stub, job.id)
        assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        await worker.resources.maintain_once()  # the pass that sets the suite-wide gauges
        worker_after, api_after = await asyncio.to_thread(scrape_worker), await asyncio.to_thread(scrape_api)

    assert moved(api_before, api_after, "modelforge_jobs_submitted_total", priority="NORMAL") == 1
    rpc = {"grpc_service": JOBS, "grpc_method": "CreateJob", "grpc_code": "OK"}
    assert moved(api_before, api_after, "modelforge_rpc_requests_total", **rpc) == 2

    def worker_moved(name: str, **labels: str) -> float:
        return moved(worker_before, worker_after, name, **labels)

    assert worker_moved("modelforge_jobs_runs_started_total") == 1
    assert worker_moved("modelforge_jobs_completed_total") == 1
    assert worker_moved("modelforge_jobs_items_total") == 10
    assert worker_moved("modelforge_jobs_batches_total") == 3  # 4 + 4 + 2 items
    assert worker_moved("modelforge_jobs_batch_duration_seconds_count") == 3
    assert worker_moved("modelforge_jobs_retries_total") == 0
    assert worker_moved("modelforge_jobs_runs_stopped_total") == 0
    assert value(worker_after, "modelforge_jobs_jobs", state="COMPLETED") == 1
    assert value(worker_after, "modelforge_jobs_jobs", state="QUEUED") == 0
    assert value(worker_after, "modelforge_jobs_jobs", state="RUNNING") == 0
    assert value(worker_after, "modelforge_jobs_items_per_second") == 0  # nothing running any more
    assert value(worker_after, "modelforge_jobs_queue_messages", queue="jobs-normal") == 0


async def test_waiting_jobs_show_in_the_queue_and_state_gauges(jobs_api, jobs_settings, inference, add_one) -> None:
    """No worker consumes: the maintenance pass of a booted-but-idle worker sees the messages waiting in Redis."""
    await upload(inference, "add-one", add_one)
    x = np.ones((3, 4), dtype=np.float32)
    for priority in (jobs_pb2.JOB_PRIORITY_HIGH, jobs_pb2.JOB_PRIORITY_LOW, jobs_pb2.JOB_PRIORITY_LOW):
        await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, priority=priority))

    async with open_resources(jobs_settings) as resources:
        await resources.maintain_once()
    registry = resources.metrics.metrics.registry

    def gauge(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert gauge("modelforge_jobs_queue_messages", queue="jobs-high") == 1
    assert gauge("modelforge_jobs_queue_messages", queue="jobs-normal") == 0
    assert gauge("modelforge_jobs_queue_messages", queue="jobs-low") == 2
    assert gauge("modelforge_jobs_jobs", state="QUEUED") == 3
    assert gauge("modelforge_jobs_jobs", state="COMPLETED") == 0
    submitted = jobs_api.server.metrics.registry.get_sample_value
    assert submitted("modelforge_jobs_submitted_total", {"priority": "HIGH"}) == 1
    assert submitted("modelforge_jobs_submitted_total", {"priority": "LOW"}) == 2


async def test_transient_failures_count_retries_then_the_failure(
    jobs_api, jobs_settings, start_worker, inference, add_one, closed_port
) -> None:
    """Inference unreachable, and no outage tolerated: every attempt but the last is a retry; the last fails the
    job, counted by reason."""
    await upload(inference, "add-one", add_one)
    nowhere = replace(
        jobs_settings, inference_address=f"127.0.0.1:{closed_port}", inference_timeout=5.0, outage_tolerance=0
    )
    async with start_worker(nowhere) as running:
        request = inline_request("add-one", {"x": np.ones((2, 4), dtype=np.float32)}, max_attempts=3)
        job = (await jobs_api.stub.CreateJob(request)).job
        final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert final.error.reason == "ATTEMPTS_EXHAUSTED" and final.attempt_count == 3
    sample = running.resources.metrics.metrics.registry.get_sample_value
    assert sample("modelforge_jobs_runs_started_total") == 3
    assert sample("modelforge_jobs_retries_total") == 2
    assert sample("modelforge_jobs_failed_total", {"reason": "ATTEMPTS_EXHAUSTED"}) == 1
    assert sample("modelforge_jobs_items_total") == 0
    assert sample("modelforge_jobs_completed_total") == 0


async def test_a_worker_reports_whether_it_reaches_its_dependencies(jobs_settings, closed_port) -> None:
    """The worker serves no health checks; its /metrics says what it reaches, as the services' do."""
    down = f"127.0.0.1:{closed_port}"  # nothing listens there: an inference service that is down
    found: dict[str, dict[str, bool]] = {}
    up: dict[str, dict[str, float | None]] = {}
    for case, settings in (("up", jobs_settings), ("down", replace(jobs_settings, inference_address=down))):
        async with open_resources(settings) as resources:
            found[case] = await resources.check_dependencies()
        registry = resources.metrics.metrics.registry
        up[case] = {
            name: registry.get_sample_value("modelforge_dependency_up", {"dependency": name}) for name in found[case]
        }

    assert found["up"] == {"postgresql": True, "inference": True, "redis": True}
    assert up["up"] == {"postgresql": 1, "inference": 1, "redis": 1}
    assert found["down"] == {"postgresql": True, "inference": False, "redis": True}
    assert up["down"] == {"postgresql": 1, "inference": 0, "redis": 1}

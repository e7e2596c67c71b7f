"""The jobs API's composition root: `python -m modelforge_jobs` serves JobService on port 50053.

The API records jobs and sends their ids (with the trace context) to Dramatiq; the workers (modelforge_jobs.worker)
run them. Its metrics are on MODELFORGE_METRICS_PORT (9103; 0 turns them off), and it is ready while PostgreSQL
and Redis answer; the registry's and the inference service's health are reported beside readiness.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import replace

import redis.asyncio

from modelforge.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from modelforge_jobs.actors import JobQueue, declare_actors, make_broker
from modelforge_jobs.datasets import sweep_scratch
from modelforge_jobs.events import JobChanges
from modelforge_jobs.inference_client import RegistryClient, inference_probe, registry_probe
from modelforge_jobs.jobs import Jobs
from modelforge_jobs.metrics import (
    INFERENCE_DEPENDENCY,
    POSTGRES_DEPENDENCY,
    REDIS_DEPENDENCY,
    REGISTRY_DEPENDENCY,
    ApiMetrics,
)
from modelforge_jobs.servicer import JobServicer
from modelforge_jobs.settings import API_METRICS_PORT, JobsSettings
from modelforge_jobs.store import JobStore
from modelforge_server import app, db, embedded, logs, telemetry
from modelforge_server.channels import service_channel
from modelforge_server.metrics import Metrics
from modelforge_server.settings import command_line, from_env, reported

log = logging.getLogger("modelforge.jobs")

SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
SERVICE_NAME = "modelforge-jobs"


async def build(settings: JobsSettings, stack: AsyncExitStack) -> app.Server:
    """Opens what the jobs API needs on `stack`, migrates its schema and returns its server, not yet bound."""
    if settings.database_url is None:
        url, stop_postgres = await asyncio.to_thread(embedded.start_postgres, settings.data_dir)
        stack.callback(stop_postgres)
        settings = replace(settings, database_url=url)
    if settings.redis_url is None:
        url, stop_redis = await asyncio.to_thread(embedded.start_redis, settings.data_dir)
        stack.callback(stop_redis)
        settings = replace(settings, redis_url=url)
    assert settings.database_url is not None and settings.redis_url is not None
    pool = await stack.enter_async_context(
        db.open_pool(settings.database_url, operation_timeout=settings.database_timeout)
    )
    await db.migrate(pool, schema="jobs", package="modelforge_jobs.migrations")
    broker = make_broker(settings)
    stack.callback(broker.close)
    queue = JobQueue(declare_actors(broker, settings))
    registry_channel = service_channel(settings.registry_address, max_message_bytes=settings.max_message_bytes)
    stack.push_async_callback(registry_channel.close)
    inference_channel = service_channel(settings.inference_address, max_message_bytes=settings.max_message_bytes)
    stack.push_async_callback(inference_channel.close)
    redis_client = redis.asyncio.Redis.from_url(settings.redis_url)
    stack.push_async_callback(redis_client.aclose)
    changes = JobChanges(settings.database_url)
    await changes.start()
    stack.push_async_callback(changes.aclose)
    metrics = Metrics()
    if swept := sweep_scratch(settings.upload_dir):
        log.info("removed %d upload(s) left unfinished by an earlier run in %s", swept, settings.upload_dir)
    jobs = Jobs(
        JobStore(pool),
        settings.upload_dir,
        RegistryClient(registry_channel, timeout=10.0),
        queue.send,
        changes=changes,
        watch_interval=settings.watch_interval,
        default_batch_size=settings.default_job_batch_size,
        default_batch_bytes=settings.default_job_batch_bytes,
        default_max_attempts=settings.default_max_attempts,
        metrics=ApiMetrics(metrics),
    )
    server = app.build_server(
        [app.Api(SERVICE, JobServicer(jobs, settings), jobs_pb2_grpc.add_JobServiceServicer_to_server)],
        domain="modelforge.jobs",
        settings=settings,
        metrics=metrics,
        text_checked=True,
    )
    server.watch_dependency(POSTGRES_DEPENDENCY, lambda: db.ping(pool))
    server.watch_dependency(REDIS_DEPENDENCY, redis_client.ping)
    # Optional, each reported under its own health name: without the registry only CreateJob fails (every read,
    # cancel and retry works), and the API never calls the inference service (its workers do; a job waits in the
    # queue meanwhile). Readiness follows what every call needs.
    server.watch_dependency(REGISTRY_DEPENDENCY, registry_probe(registry_channel), required=False)
    server.watch_dependency(INFERENCE_DEPENDENCY, inference_probe(inference_channel), required=False)
    stack.push_async_callback(server.stop, settings.grace_seconds)
    # On stop, once readiness is NOT_SERVING: open WatchJob streams end at once with UNAVAILABLE (their clients watch
    # again, on another replica) instead of holding the server up for the whole grace period.
    server.before_stop(changes.aclose)
    return server


async def run(settings: JobsSettings, tel: telemetry.Telemetry | None = None) -> None:
    async with AsyncExitStack() as stack:
        server = await build(settings, stack)
        await app.serve(server, settings, telemetry=tel)


def main() -> None:
    command_line(
        "modelforge_jobs", "The ModelForge jobs API: batch inference jobs and their datasets and results.", JobsSettings
    )
    with reported(SERVICE_NAME):
        settings = from_env(JobsSettings)
        logs.configure(SERVICE_NAME, settings.log_level)
        # Before any channel or pool exists, so that the clients are instrumented and the server gets its spans.
        tel = telemetry.setup(SERVICE_NAME, settings, metrics_port=API_METRICS_PORT)
        # Before anything opens or logs: a port in use is then the one line the process prints. One taken
        # after this check fails the bind in serve() with the same line, once what was opened is closed.
        app.check_ports(settings, tel)
        app.run(run(settings, tel), settings.event_loop)


if __name__ == "__main__":
    main()

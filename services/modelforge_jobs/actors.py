"""The Dramatiq side of the jobs service: the run_job actors, the queue the API sends to, and the worker's resources.

Messages carry the job id, and the sender's trace context (W3C ``traceparent``) when tracing is on, so that a
job's run continues the trace of the CreateJob (or RetryJob) that queued it. There is one actor per priority, each
on its own queue, with Dramatiq priorities that make a worker take HIGH before NORMAL before LOW among the messages
it has fetched. Nothing here touches Dramatiq's global broker: worker.py does, for the `dramatiq` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar
from uuid import UUID

import dramatiq
import redis
from dramatiq.asyncio import get_event_loop_thread

from modelforge_jobs.broker import WakingRedisBroker
from modelforge_jobs.domain import TIME_LIMIT_MAX, Priority
from modelforge_jobs.errors import DependencyUnavailable, JobNotFound
from modelforge_jobs.inference_client import InferenceClient, inference_probe
from modelforge_jobs.metrics import INFERENCE_DEPENDENCY, POSTGRES_DEPENDENCY, REDIS_DEPENDENCY, WorkerMetrics
from modelforge_jobs.runner import JobRunner, Requeued, RetryLater, RunnerSettings
from modelforge_jobs.settings import JobsSettings
from modelforge_jobs.store import JobStore
from modelforge_server import db, logs, telemetry
from modelforge_server.channels import service_channel
from modelforge_server.metrics import Endpoint, Metrics, multiprocess_enabled, process_exiting
from modelforge_server.settings import SettingsError
from modelforge_server.telemetry import Telemetry

log = logging.getLogger("modelforge.jobs.worker")

# A maintenance pass runs every few seconds: one that keeps failing is logged this often at most.
MAINTENANCE_FAILURES_LOGGED_EVERY = 60.0

T = TypeVar("T")

# How long each of a worker's dependency checks may take (see WorkerResources.check_dependencies).
DEPENDENCY_CHECK_SECONDS = 2.0
QUEUES = {Priority.HIGH: "jobs-high", Priority.NORMAL: "jobs-normal", Priority.LOW: "jobs-low"}
_DRAMATIQ_PRIORITY = {Priority.HIGH: 0, Priority.NORMAL: 10, Priority.LOW: 20}  # lower runs first


class JobQueue:
    """Sends run_job messages (the job id, and the current trace context) to the queue of the job's priority."""

    def __init__(self, actors: Mapping[Priority, dramatiq.Actor[..., Any]]) -> None:
        self._actors = dict(actors)
        self._broker = next(iter(self._actors.values())).broker

    async def send(
        self,
        job_id: UUID,
        priority: Priority,
        *,
        delay: float = 0.0,
        outage_since: float | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """Sends the job's message, to be taken after `delay` seconds; `outage_since` goes with it to the run.
        `trace`: the trace context the run continues, for a message sent again outside the call that queued the
        job; by default the current one."""
        # Here, on the loop: the calling RPC's span is the current one.
        carrier = dict(trace) if trace else telemetry.inject()
        kwargs: dict[str, Any] = {"trace": carrier} if carrier else {}
        if outage_since is not None:
            kwargs["outage_since"] = outage_since
        send = functools.partial(
            self._actors[priority].send_with_options,
            args=(str(job_id),),
            kwargs=kwargs,
            delay=int(delay * 1000) or None,
        )
        await _on_queue(send)

    async def held(self, job_ids: Sequence[UUID]) -> set[UUID]:
        """Those of these jobs whose latest message Redis still holds (see WakingRedisBroker.held_jobs)."""
        broker: Any = self._broker
        held = await _on_queue(broker.held_jobs, [str(job_id) for job_id in job_ids])
        return {UUID(job_id) for job_id in held}

    def queues(self) -> dict[str, str]:
        """Queue name to the Redis list that holds its waiting messages (a RedisBroker's `namespace:queue`)."""
        broker: Any = self._broker
        return {actor.queue_name: f"{broker.namespace}:{actor.queue_name}" for actor in self._actors.values()}

    async def recover_messages(self) -> None:
        """Puts the messages that dead workers had taken back in their queues (see WakingRedisBroker)."""
        broker: Any = self._broker
        await _on_queue(broker.recover_messages, [actor.queue_name for actor in self._actors.values()])

    async def ping(self) -> None:
        """Raises DependencyUnavailable unless the queue's Redis answers."""
        broker: Any = self._broker
        await _on_queue(broker.client.ping)

    async def lengths(self) -> dict[str, int]:
        """Messages waiting in each queue (taken by no worker yet)."""
        broker: Any = self._broker
        names = self.queues()

        def read() -> list[int]:
            pipeline = broker.client.pipeline(transaction=False)
            for key in names.values():
                pipeline.llen(key)
            return [int(n) for n in pipeline.execute()]

        counts = await _on_queue(read)
        return dict(zip(names, counts, strict=True))


async def _on_queue(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, a call into the queue's Redis, on a thread; its failure is DependencyUnavailable."""
    try:
        return await asyncio.to_thread(call, *args)
    # BrokerError: BrokerConnectionError, named ConnectionError before dramatiq 2 (that name now warns).
    except (redis.RedisError, dramatiq.errors.BrokerError) as exc:
        raise DependencyUnavailable("job queue (Redis)", type(exc).__name__) from exc


class WorkerResources(dramatiq.Middleware):
    """Opens the pool, the inference channel and the runner on the AsyncIO middleware's loop at worker boot,
    runs the maintenance loop (reaper, lost messages, retention, the suite's gauges) there, serves the worker's
    /metrics when `telemetry` names a port, and closes everything at shutdown."""

    def __init__(
        self,
        settings: JobsSettings,
        *,
        worker_id: str | None = None,
        metrics: WorkerMetrics | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not settings.database_url:
            raise SettingsError(
                "the jobs worker needs MODELFORGE_DATABASE_URL: it starts no embedded PostgreSQL of its own (the jobs "
                "API and `modelforge up` do); give it the one they use"
            )
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = metrics if metrics is not None else WorkerMetrics(Metrics())
        self.telemetry = telemetry
        self.endpoint: Endpoint | None = None
        self.queue: JobQueue | None = None
        self._runner: JobRunner | None = None
        self._store: JobStore | None = None
        self._stack: AsyncExitStack | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._checks: dict[str, Callable[[], Awaitable[object]]] = {}
        self._maintaining = asyncio.Lock()  # one pass at a time: the loop's, or a caller's

    @property
    def runner(self) -> JobRunner:
        if self._runner is None:
            raise RuntimeError("the worker's resources are not open: the worker has not booted")
        return self._runner

    # Dramatiq hooks; AsyncIO must come before this middleware, so that its loop runs at boot and stops after us.
    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Before the worker starts its consumers: a message taken at once must find the runner ready.
        loop_thread = get_event_loop_thread()
        if loop_thread is None:
            raise RuntimeError("add the AsyncIO middleware before WorkerResources")
        loop_thread.run_coroutine(self.open())

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._serve_metrics()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Before Dramatiq waits for its worker threads: the jobs they run stop between batches.
        loop_thread = get_event_loop_thread()
        if loop_thread is not None and self._runner is not None:
            loop_thread.loop.call_soon_threadsafe(self._runner.stop)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        loop_thread = get_event_loop_thread()
        if loop_thread is not None:
            loop_thread.run_coroutine(self.close())
        # Under `dramatiq --processes N`: a process stopped (or reloaded) leaves the gauges the fork sums, which
        # would otherwise keep its last values, such as a dependency it last found down.
        process_exiting()
        log.info("jobs worker %s stopped", self.worker_id)

    def _serve_metrics(self) -> None:
        """Serves /metrics on the worker's port; in multiprocess mode the dramatiq fork function serves instead.

        A port already taken (another worker on this host with the same setting) costs the metrics, not the
        worker: it logs a warning and goes on running jobs.
        """
        if self.telemetry is None or multiprocess_enabled():
            return
        try:
            self.endpoint = self.telemetry.serve_metrics(self.metrics.metrics, self.settings.host)
        except OSError as exc:
            log.warning(
                "jobs worker %s serves no metrics: port %d is taken (%s); give each worker on a host its own "
                "MODELFORGE_WORKER_METRICS_PORT, or 0",
                self.worker_id,
                self.telemetry.metrics_port,
                exc,
            )

    async def open(self) -> None:
        settings = self.settings
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            assert settings.database_url is not None
            pool = await stack.enter_async_context(
                # Each batch's store checks a connection out: skip the round trip of the check when the
                # connection was in use within the last second.
                db.open_pool(
                    settings.database_url,
                    max_size=max(8, settings.worker_threads * 4),
                    recheck_after=1.0,
                    operation_timeout=settings.database_timeout,
                )
            )
            await db.migrate(pool, schema="jobs", package="modelforge_jobs.migrations")
            several = settings.inference_connections > 1
            channels = [
                service_channel(
                    settings.inference_address, max_message_bytes=settings.max_message_bytes, own_connection=several
                )
                for _ in range(settings.inference_connections)
            ]
            for channel in channels:
                stack.push_async_callback(channel.close)
            self._store = JobStore(pool)
            self._runner = JobRunner(
                self._store,
                InferenceClient(channels, timeout=settings.inference_timeout),
                RunnerSettings(
                    worker_id=self.worker_id,
                    heartbeat_interval=settings.heartbeat_interval,
                    stale_after=settings.heartbeat_timeout,
                    retry_min_backoff=settings.retry_min_backoff,
                    retry_max_backoff=settings.retry_max_backoff,
                    outage_tolerance=settings.outage_tolerance,
                ),
                self.metrics,
            )
            self._checks = {
                POSTGRES_DEPENDENCY: functools.partial(db.ping, pool),
                INFERENCE_DEPENDENCY: inference_probe(channel),
            }
            self._maintenance = asyncio.create_task(self._maintain(), name="jobs-maintenance")
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info("jobs worker %s ready (inference at %s)", self.worker_id, settings.inference_address)

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
        self._runner = None

    async def _send(self, job_id: UUID, priority: Priority, **options: Any) -> None:
        """Sends a QUEUED job's message (with JobQueue.send's `options`); when Redis refuses, marks it unsent, so
        that the next pass (of any worker) sends it again instead of waiting for MODELFORGE_RESEND_AFTER."""
        assert self._store is not None and self.queue is not None
        try:
            await self.queue.send(job_id, priority, **options)
        except DependencyUnavailable as exc:
            log.warning("job %s queued, its message not sent (%s); the next maintenance pass sends it", job_id, exc)
            await self._store.mark_unsent(job_id)

    async def requeue(self, job_id: UUID, *, delay: float = 0.0, outage_since: float | None = None) -> None:
        """Sends the message of a job this worker put back in the queue, to run after `delay` seconds; when Redis
        refuses, the next maintenance pass of any worker sends it."""
        store, queue = self._store, self.queue
        if store is None or queue is None:
            raise RuntimeError("the worker's resources are not open: the worker has not booted")
        try:
            job = await store.get_job(job_id)
        except JobNotFound:
            return  # deleted meanwhile: nothing to run
        await self._send(job.id, job.priority, delay=delay, outage_since=outage_since)

    async def maintain_once(self) -> None:
        """Puts back the messages stopped workers had taken, requeues their running jobs, resends lost messages,
        deletes expired jobs and datasets, and sets the gauges of jobs by state, items per second and queue
        lengths."""
        async with self._maintaining:
            await self._maintain_once()

    async def _maintain_once(self) -> None:
        store, queue, settings = self._store, self.queue, self.settings
        if store is None or queue is None:
            return
        reaped = await store.reap(stale_after=settings.heartbeat_timeout)
        async with self._unless_sent([job.id for job in reaped]) as sent:
            for job in reaped:
                log.warning("job %s: its worker stopped heartbeating; queued again", job.id, extra={"job_id": job.id})
                self.metrics.reaped.inc()
                await self._send(job.id, job.priority, trace=job.trace)
                sent.add(job.id)
        waited = await store.unsent(older_than=settings.resend_after)
        async with self._unless_sent([job.id for job in waited]) as sent:
            try:  # jobs that wait behind a backlog, their messages in Redis, are left to it
                held = await queue.held([job.id for job in waited if not job.marked])
            except DependencyUnavailable:
                held = set()  # each send below fails too, and marks its job for the next pass
            sent.update(held)
            for job in waited:
                if job.id not in held:
                    log.warning(
                        "job %s: its message was lost (never sent, or gone from Redis); sent again",
                        job.id,
                        extra={"job_id": job.id},
                    )
                    self.metrics.resent.inc()
                    await self._send(job.id, job.priority, trace=job.trace)
                    sent.add(job.id)
        jobs, datasets = await store.expire(retention=settings.job_retention)
        if jobs or datasets:
            log.info("retention: deleted %d job(s) and %d dataset(s)", jobs, datasets)
        # Queued jobs a dead worker had taken: their messages, in Redis, not their rows. After the steps above, which
        # go on without Redis (a message they cannot send is marked for the next pass).
        await queue.recover_messages()
        by_state, rate = await store.census()
        self.metrics.suite_seen(by_state, rate, await queue.lengths())

    @contextlib.asynccontextmanager
    async def _unless_sent(self, job_ids: Sequence[UUID]) -> AsyncIterator[set[UUID]]:
        """For a block that sends the messages of jobs QUEUED by this pass: should the pass be cancelled (the worker
        stopping) before every one is sent, those not in the set it fills are marked unsent on the way out, for the
        next pass of any worker, instead of waiting for MODELFORGE_RESEND_AFTER."""
        sent: set[UUID] = set()
        try:
            yield sent
        except asyncio.CancelledError:
            left = [job_id for job_id in job_ids if job_id not in sent]
            if left and self._store is not None:
                await self._store.mark_unsent(*left)
            raise

    async def check_dependencies(self) -> dict[str, bool]:
        """Checks what the worker needs (PostgreSQL, the queue's Redis, the inference service) and sets
        ``modelforge_dependency_up`` from it, as the services' health checks do for theirs."""
        checks = dict(self._checks)
        if self.queue is not None:
            checks[REDIS_DEPENDENCY] = self.queue.ping
        found: dict[str, bool] = {}
        for name, check in checks.items():
            try:
                async with asyncio.timeout(DEPENDENCY_CHECK_SECONDS):
                    await check()
                found[name] = True
            except Exception:
                found[name] = False
            self.metrics.metrics.dependency_up.labels(name).set(1 if found[name] else 0)
        return found

    async def _maintain(self) -> None:
        """Runs the maintenance passes. Passes that keep failing (an outage) are logged when they start failing and
        then once a minute at most, with how long; the first pass that works again says so."""
        failing_since: float | None = None
        failures = logs.Throttle(MAINTENANCE_FAILURES_LOGGED_EVERY)
        while True:
            await self.check_dependencies()
            try:
                await self.maintain_once()
            except Exception as exc:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if failures.due():
                    since = f" (failing for {now - failing_since:.0f} s)" if now > failing_since else ""
                    log.warning("maintenance pass failed%s: %s", since, exc)
            else:
                if failing_since is not None:
                    log.info("maintenance passes work again, after %.0f s", time.monotonic() - failing_since)
                    failures.reset()
                failing_since = None
            await asyncio.sleep(self.settings.maintenance_interval)


def declare_actors(
    broker: dramatiq.Broker, settings: JobsSettings, resources: WorkerResources | None = None
) -> dict[Priority, dramatiq.Actor[..., Any]]:
    """Declares the run_job actors on `broker`; the API process passes no resources and only sends."""

    async def run_job(job_id: str, trace: dict[str, str] | None = None, outage_since: float | None = None) -> None:
        """Runs one job, in a span that continues the sender's trace. Redelivery is safe: the runner resumes from
        stored progress."""
        if resources is None:
            raise RuntimeError("run_job runs in a jobs worker, not in the API process")
        with (
            logs.bind(job_id=job_id),
            telemetry.attached(trace, "modelforge.jobs.run_job", attributes={"modelforge.job_id": job_id}),
        ):
            try:
                try:
                    await resources.runner.run(UUID(job_id), outage_since=outage_since)
                except RetryLater as exc:
                    # The runner logged it; Retry makes Dramatiq requeue the message after the delay without
                    # logging a traceback for an expected failure.
                    raise dramatiq.Retry(str(exc), delay=int(exc.delay * 1000)) from exc
                except Requeued as exc:
                    # A new message rather than a Dramatiq retry: the job's attempt was not spent, so neither is
                    # one of the message's retries.
                    await resources.requeue(exc.job_id, delay=exc.delay, outage_since=exc.outage_since)
            except DependencyUnavailable as exc:
                # PostgreSQL (or Redis) out of reach: the job is as the database last recorded it, QUEUED or
                # RUNNING here (and then requeued by the reaper once this worker's heartbeats have stopped). The
                # message is retried with Dramatiq's backoff; past its retries, the maintenance pass resends it.
                log.warning("job %s: %s; its message is retried", job_id, exc)
                raise dramatiq.Retry(str(exc)) from exc

    actors: dict[Priority, dramatiq.Actor[[str, dict[str, str] | None, float | None], None]] = {
        priority: dramatiq.Actor(
            run_job,
            broker=broker,
            actor_name=f"run_job_{priority.name.lower()}",
            queue_name=queue,
            priority=_DRAMATIQ_PRIORITY[priority],
            options={
                "max_retries": settings.max_max_attempts,
                "min_backoff": int(settings.retry_min_backoff * 1000),
                "max_backoff": int(settings.retry_max_backoff * 1000),
                "time_limit": int(TIME_LIMIT_MAX * 1000),  # the job's own time limit applies, in the runner
            },
        )
        for priority, queue in QUEUES.items()
    }
    if resources is not None:
        resources.queue = JobQueue(actors)
    return actors


def make_broker(settings: JobsSettings, *, namespace: str | None = None) -> dramatiq.Broker:
    """A Redis broker on the suite's Redis (its idle consumers woken by each send) with the AsyncIO middleware."""
    from dramatiq.middleware import AsyncIO

    if not settings.redis_url:
        raise SettingsError(
            "the jobs service needs MODELFORGE_REDIS_URL here: a worker starts no embedded Redis of its own (the jobs "
            "API and `modelforge up` do); give it the one they use"
        )
    broker = WakingRedisBroker(
        url=settings.redis_url,
        namespace=namespace or settings.queue_namespace,
        heartbeat_timeout=settings.heartbeat_timeout,
    )
    broker.add_middleware(AsyncIO())
    return broker

"""The jobs service's own Prometheus series, declared on the process's modelforge_server Metrics.

The API process counts submissions. A worker process counts what it does itself (runs, items, batches, retries,
reaped jobs), so counters add up across workers with ``sum``; and its maintenance pass sets suite-wide gauges
read from PostgreSQL and Redis (jobs by state, items per second, queue lengths), which every worker reports
alike: aggregate those with ``max``, never ``sum``. Under prometheus_client's multiprocess mode the gauges keep the
most recent live process's value, so one scrape shows each once.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelforge_jobs.domain import JobState, Priority
from modelforge_server.metrics import Metrics

__all__ = ["ApiMetrics", "WorkerMetrics"]

# Inference time of one batch: from a few milliseconds to minutes for a large batch on a slow model.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ApiMetrics:
    """What the jobs API counts beside the RPC metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.submitted = metrics.counter(
            "modelforge_jobs_submitted", "Jobs created by CreateJob (a repeated request_id counts once).", ("priority",)
        )

    def job_submitted(self, priority: Priority) -> None:
        self.submitted.labels(priority.name).inc()


# The dependencies' names, in health (``dependency/<name>``) and in ``modelforge_dependency_up``: the jobs API
# checks all four, a worker the three it uses.
POSTGRES_DEPENDENCY = "postgresql"
REDIS_DEPENDENCY = "redis"
INFERENCE_DEPENDENCY = "inference"
REGISTRY_DEPENDENCY = "registry"


class WorkerMetrics:
    """What one worker process did, and the state of the suite's jobs and queues as its maintenance pass saw it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.started = metrics.counter(
            "modelforge_jobs_runs_started", "Runs of jobs begun by this worker; every attempt of a job counts."
        )
        self.completed = metrics.counter("modelforge_jobs_completed", "Jobs this worker ran to COMPLETED.")
        self.failed = metrics.counter(
            "modelforge_jobs_failed", "Jobs this worker marked FAILED, by the error's reason.", ("reason",)
        )
        self.retries = metrics.counter(
            "modelforge_jobs_retries", "Runs that ended in a transient failure and put their job back in the queue."
        )
        self.stopped = metrics.counter(
            "modelforge_jobs_runs_stopped",
            "Runs that stopped at a batch because their job was cancelled or taken over by another worker.",
        )
        self.interrupted = metrics.counter(
            "modelforge_jobs_runs_interrupted",
            "Runs that stopped between batches because this worker shut down, and put their job back in the queue.",
        )
        self.reaped = metrics.counter(
            "modelforge_jobs_reaped", "RUNNING jobs of workers that stopped heartbeating, queued again by this worker."
        )
        self.resent = metrics.counter(
            "modelforge_jobs_messages_resent", "QUEUED jobs whose message was lost or never sent, sent again."
        )
        self.items = metrics.counter("modelforge_jobs_items", "Items whose outputs this worker stored.")
        self.batches = metrics.counter("modelforge_jobs_batches", "Batches whose outputs this worker stored.")
        self.batch_duration = metrics.histogram(
            "modelforge_jobs_batch_duration_seconds",
            "Time the inference service took for one batch, as the worker saw it.",
            buckets=BATCH_BUCKETS,
        )
        self.jobs = metrics.gauge(
            "modelforge_jobs_jobs",
            "Jobs in the database by state (suite-wide; every worker reports the same value).",
            ("state",),
            multiprocess_mode="livemostrecent",
        )
        self.items_per_second = metrics.gauge(
            "modelforge_jobs_items_per_second",
            "Combined throughput of the RUNNING jobs over their current runs (suite-wide).",
            multiprocess_mode="livemostrecent",
        )
        self.queue_messages = metrics.gauge(
            "modelforge_jobs_queue_messages",
            "run_job messages waiting in Redis for a worker, by queue (suite-wide).",
            ("queue",),
            multiprocess_mode="livemostrecent",
        )

    def batch_stored(self, items: int, seconds: float) -> None:
        self.items.inc(items)
        self.batches.inc()
        self.batch_duration.observe(seconds)

    def suite_seen(self, by_state: Mapping[JobState, int], items_per_second: float, queues: Mapping[str, int]) -> None:
        """Sets the gauges from one maintenance pass; states and queues with nothing in them read 0."""
        for state in JobState:
            self.jobs.labels(state.value).set(by_state.get(state, 0))
        self.items_per_second.set(items_per_second)
        for queue, length in queues.items():
            self.queue_messages.labels(queue).set(length)

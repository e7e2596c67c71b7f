"""The jobs service's settings (API and workers), from MODELFORGE_* variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from modelforge_server import ports
from modelforge_server.settings import (
    AT_LEAST_ONE,
    NOT_NEGATIVE,
    PORT,
    POSITIVE,
    Bound,
    MiB,
    ServerSettings,
    SettingsError,
)

DAY = 86400.0
API_METRICS_PORT = ports.JOBS_METRICS_PORT
WORKER_METRICS_PORT = ports.WORKER_METRICS_PORT


@dataclass(frozen=True)
class JobsSettings(ServerSettings):
    """Everything the jobs API and the jobs workers read at start."""

    port: int = ports.JOBS_PORT
    # Prometheus /metrics of the jobs API (MODELFORGE_METRICS_PORT); None means 9103, 0 turns it off.
    metrics_port: int | None = field(default=None, metadata={"shown": f"(unset: {API_METRICS_PORT} for the jobs API)"})
    # /metrics of a worker process (MODELFORGE_WORKER_METRICS_PORT); None means MODELFORGE_METRICS_PORT when that
    # is set (a worker in a container of its own), else 9104; 0 turns it off. Several worker processes on one host
    # each need their own port, or 0, or prometheus_client's multiprocess mode (see modelforge_jobs.worker).
    worker_metrics_port: int | None = field(
        default=None, metadata={"shown": f"(unset: MODELFORGE_METRICS_PORT if set, else {WORKER_METRICS_PORT})"}
    )
    # Where the registry and the inference service listen.
    registry_address: str = f"127.0.0.1:{ports.REGISTRY_PORT}"
    inference_address: str = f"127.0.0.1:{ports.INFERENCE_PORT}"
    # The Redis key prefix of the Dramatiq queues; the API and its workers must agree on it.
    queue_namespace: str = "modelforge"
    # Finished jobs and their results are deleted this many seconds after they finished, datasets this long after
    # their upload or the finish of the last job that read them, whichever is later.
    job_retention: float = 7 * DAY
    # How often a worker looks for stale jobs and expired ones.
    maintenance_interval: float = 10.0
    # A running job's worker writes a heartbeat this often; after heartbeat_timeout without one, the job is
    # requeued for another worker.
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 30.0
    # A QUEUED job whose message was sent this long ago and never picked up is sent again (a lost message).
    resend_after: float = 600.0
    # Exponential backoff between runs after a transient failure.
    retry_min_backoff: float = 1.0
    retry_max_backoff: float = 60.0
    # How long a job waits, back in the queue with its attempt unspent, for an unavailable inference service or
    # registry (a restart, an outage) before such failures count as attempts.
    outage_tolerance: float = 300.0
    # The deadline of one inference call.
    inference_timeout: float = 60.0
    # Connections a worker opens to the inference service, its batches taking them in turn: with several inference
    # processes on one port (`modelforge up --inference-replicas N` sets it to 8N), each connection reaches one.
    inference_connections: int = 1
    # Threads of one worker process, that is jobs it runs at the same time.
    worker_threads: int = 4
    # WatchJob reads the job when PostgreSQL announces a change, and at least this often: the fallback for a late
    # notification or a broken LISTEN connection.
    watch_interval: float = 2.0
    # Defaults and limits of CreateJob. A job that names no batch size gets default_job_batch_size items per
    # inference call, fewer where that many items' inputs or declared outputs would take more than
    # default_job_batch_bytes in one request or answer.
    default_job_batch_size: int = 256
    default_job_batch_bytes: int = 16 * MiB
    max_job_batch_size: int = 65536
    default_max_attempts: int = 3
    max_max_attempts: int = 20

    bounds: ClassVar[Mapping[str, Bound]] = {
        **ServerSettings.bounds,
        "metrics_port": PORT,
        "worker_metrics_port": PORT,
        "job_retention": POSITIVE,
        "maintenance_interval": POSITIVE,
        "heartbeat_interval": POSITIVE,
        "heartbeat_timeout": POSITIVE,
        "resend_after": POSITIVE,
        "retry_min_backoff": NOT_NEGATIVE,
        "retry_max_backoff": NOT_NEGATIVE,
        "outage_tolerance": NOT_NEGATIVE,
        "inference_timeout": POSITIVE,
        "inference_connections": AT_LEAST_ONE,
        "worker_threads": AT_LEAST_ONE,
        "watch_interval": POSITIVE,
        "default_job_batch_size": AT_LEAST_ONE,
        "default_job_batch_bytes": AT_LEAST_ONE,
        "max_job_batch_size": AT_LEAST_ONE,
        "default_max_attempts": AT_LEAST_ONE,
        "max_max_attempts": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for low, high in (
            ("heartbeat_interval", "heartbeat_timeout"),
            ("retry_min_backoff", "retry_max_backoff"),
            ("default_job_batch_size", "max_job_batch_size"),
            ("default_max_attempts", "max_max_attempts"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise SettingsError(
                    f"MODELFORGE_{low.upper()}={getattr(self, low)!r} is invalid: it must not exceed "
                    f"MODELFORGE_{high.upper()}={getattr(self, high)!r}"
                )

    def for_worker(self) -> JobsSettings:
        """These settings as a worker process hands them to telemetry.setup: its metrics port is the worker's."""
        return replace(self, metrics_port=self.worker_metrics_port)

    @property
    def upload_dir(self) -> Path:
        """Where the jobs API keeps dataset uploads while it checks them: its own scratch space, shared with no
        other process (datasets themselves live in PostgreSQL)."""
        return self.data_dir / "uploads"

"""The jobs worker process's composition root: the only place that sets Dramatiq's global broker.

Run it as `dramatiq modelforge_jobs.worker` (Dramatiq's CLI: processes, threads, reloads) or as
`python -m modelforge_jobs.worker` (one process with MODELFORGE_WORKER_THREADS threads). Settings come from the
same MODELFORGE_* variables as the jobs API; both must name the same Redis and MODELFORGE_QUEUE_NAMESPACE.

Telemetry: logs go to stderr as modelforge-jobs-worker; traces are exported when an OTLP endpoint is set, and each
job runs in a span that continues the trace of the CreateJob that queued it. Each worker process serves /metrics
on MODELFORGE_WORKER_METRICS_PORT (default: MODELFORGE_METRICS_PORT when set, as in a container of its own, else
9104; 0 turns it off). Several worker processes on one host must not share a port:

- one `python -m modelforge_jobs.worker` per process: give each its own MODELFORGE_WORKER_METRICS_PORT (a worker
  whose port is taken logs a warning and runs without metrics), or 0 for all but one;
- `dramatiq modelforge_jobs.worker --processes N`: set PROMETHEUS_MULTIPROC_DIR to an empty directory and add
  `--fork-function modelforge_server.metrics:serve_multiprocess`; the workers then serve nothing themselves, and
  the fork serves their sum on MODELFORGE_METRICS_PORT (unset or 0: nothing is served, and the fork says so).

Each worker process logs that it is ready ("jobs worker ... ready"); Dramatiq's own lines of a worker starting and
stopping ("Worker process is ready for action.", "Shutting down..."...) are left out below DEBUG, their warnings
kept. The lines of Dramatiq's CLI process itself ("Dramatiq ... is booting up.") are its own, in its format:
`dramatiq --skip-logging` leaves out its INFO lines too.
"""

from __future__ import annotations

import logging
import signal
import threading

import dramatiq

from modelforge_jobs.actors import QUEUES, WorkerResources, declare_actors, make_broker
from modelforge_jobs.broker import quiet_consumer_outages
from modelforge_jobs.metrics import WorkerMetrics
from modelforge_jobs.settings import WORKER_METRICS_PORT, JobsSettings
from modelforge_server import app, logs, orphans, telemetry
from modelforge_server.metrics import Metrics
from modelforge_server.settings import command_line, from_env, reported

SERVICE_NAME = "modelforge-jobs-worker"

# Dramatiq's loggers whose INFO lines only say that a worker, or its event loop, starts or stops; and, under
# Dramatiq's CLI, that of this worker process, created before this module is imported.
_LIFECYCLE_LOGGERS = ("dramatiq.worker.Worker", "dramatiq.middleware.asyncio.AsyncIO")
_CLI_PROCESS_LOGGER = "dramatiq.WorkerProcess("


def _quiet_lifecycle() -> None:
    """Lowers Dramatiq's start and stop lines to WARNING, unless the log level is DEBUG: ModelForge logs when a
    worker is ready, and Dramatiq's half a dozen lines per process add nothing to that but noise."""
    root = logging.getLogger()
    if root.level < logging.INFO:
        return
    cli = [name for name in list(root.manager.loggerDict) if name.startswith(_CLI_PROCESS_LOGGER)]
    for name in (*_LIFECYCLE_LOGGERS, *cli):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


if __name__ == "__main__":  # not under Dramatiq's CLI, whose arguments these are
    command_line(
        "modelforge_jobs.worker",
        "A ModelForge jobs worker: runs the queued jobs on the inference service.",
        JobsSettings,
    )

with reported(SERVICE_NAME):
    settings = from_env(JobsSettings)
    logs.configure(SERVICE_NAME, settings.log_level)
    _quiet_lifecycle()
    app.use_event_loop(settings.event_loop)  # before the AsyncIO middleware makes the worker's loop
    # Before the broker and the worker's channels exist, so that the gRPC, psycopg and Redis clients are
    # instrumented.
    tel = telemetry.setup(SERVICE_NAME, settings.for_worker(), metrics_port=WORKER_METRICS_PORT)
    broker = make_broker(settings)
    resources = WorkerResources(settings, metrics=WorkerMetrics(Metrics()), telemetry=tel)
broker.add_middleware(resources)
dramatiq.set_broker(broker)
actors = declare_actors(broker, settings, resources)
quiet_consumer_outages(broker)


def main() -> None:
    """Runs one worker in this process until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = dramatiq.Worker(broker, queues=set(QUEUES.values()), worker_threads=settings.worker_threads)
    worker.start()
    orphans.stop_when_up_is_gone()  # a SIGTERM of its own once `up` is gone
    try:
        stop.wait()
    finally:
        worker.stop()
        tel.shutdown()


if __name__ == "__main__":
    main()

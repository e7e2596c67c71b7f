"""The jobs worker process's composition root: the only place that sets Dramatiq's global broker.

Run it as `dramatiq modelforge_jobs.worker` (Dramatiq's CLI: processes, threads, reloads) or as
`python -m modelforge_jobs.worker` (one process with MODELFORGE_WORKER_THREADS threads). Settings come from the
same MODELFORGE_* variables as the jobs API; both must name the same Redis and MODELFORGE_QUEUE_NAMESPACE.
"""

from __future__ import annotations

import dramatiq

from modelforge_jobs.actors import QUEUES, WorkerResources, declare_actors, make_broker
from modelforge_jobs.settings import JobsSettings
from modelforge_server import logs
from modelforge_server.settings import from_env

settings = from_env(JobsSettings)
broker = make_broker(settings)
resources = WorkerResources(settings)
broker.add_middleware(resources)
dramatiq.set_broker(broker)
actors = declare_actors(broker, settings, resources)


def main() -> None:
    """Runs one worker in this process until SIGTERM or SIGINT."""
    import signal
    import threading

    logs.configure("modelforge-jobs-worker", settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = dramatiq.Worker(broker, queues=set(QUEUES.values()), worker_threads=settings.worker_threads)
    worker.start()
    try:
        stop.wait()
    finally:
        worker.stop()


if __name__ == "__main__":
    main()

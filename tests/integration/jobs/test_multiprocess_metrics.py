"""`dramatiq modelforge_jobs.worker --processes N` with PROMETHEUS_MULTIPROC_DIR and the serve_multiprocess fork
function, as worker.py documents it: one /metrics, served by the fork, sums what the worker processes counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from modelforge.jobs.v1 import jobs_pb2
from modelforge_server import embedded
from tests.fixtures.metrics import scrape
from tests.fixtures.polling import eventually
from tests.integration.jobs.conftest import inline_request, scrape_metrics, settings_env, upload, wait_terminal

PROCESSES = 2


async def test_forked_workers_counters_are_summed_on_the_fork_functions_port(
    jobs_api, jobs_settings, inference, add_one, tmp_path: Path
) -> None:
    await upload(inference, "add-one", add_one)
    port = embedded.free_port()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = settings_env(jobs_settings) | {
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "MODELFORGE_METRICS_PORT": str(port),
    }
    command = [
        sys.executable, "-m", "dramatiq", "modelforge_jobs.worker",
        "--processes", str(PROCESSES), "--threads", "2",
        "--fork-function", "modelforge_server.metrics:serve_multiprocess",
    ]  # fmt: skip
    log = tmp_path / "dramatiq.log"
    with log.open("wb") as out:
        # A session of its own: whatever becomes of the dramatiq master, its worker and fork processes can be found.
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
    try:

        def serving() -> bool:
            try:
                scrape_metrics(port)
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, log.read_text()
                return False
            return True

        await eventually(lambda: asyncio.to_thread(serving), "the fork's /metrics", timeout=30)
        jobs = []
        for n in range(4):
            x = np.full((6, 4), n, dtype=np.float32)
            jobs.append((await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=2))).job)
        for job in jobs:
            final = await wait_terminal(jobs_api.stub, job.id, timeout=30)
            assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error

        # Each worker process counts what it ran itself; the one scrape sums them, whichever ran what.
        await eventually(
            lambda: asyncio.to_thread(lambda: scrape(port).get(("modelforge_jobs_completed_total", ())) == 4),
            "the four completed jobs on the fork's /metrics",
            timeout=10,
        )
        samples = await asyncio.to_thread(scrape, port)
        assert samples[("modelforge_jobs_runs_started_total", ())] == 4
        assert samples[("modelforge_jobs_items_total", ())] == 24
        assert samples[("modelforge_jobs_batches_total", ())] == 12
        assert samples[("modelforge_jobs_batch_duration_seconds_count", ())] == 12
        # Every worker process wrote its own samples there.
        pids = {path.stem.rsplit("_", 1)[1] for path in multiproc.glob("*.db")}
        assert len(pids) == PROCESSES, sorted(p.name for p in multiproc.iterdir())
        # A dependency is up once, not once per process.
        await eventually(
            lambda: asyncio.to_thread(
                lambda: scrape(port).get(("modelforge_dependency_up", (("dependency", "postgresql"),))) is not None
            ),
            "the workers' dependency checks",
            timeout=10,
        )
        samples = await asyncio.to_thread(scrape, port)
        for dependency in ("postgresql", "redis", "inference"):
            assert samples[("modelforge_dependency_up", (("dependency", dependency),))] == 1, dependency
        # Stopped, the worker processes take their gauges out of the sums; their counters stay.
        process.terminate()
        assert await asyncio.to_thread(process.wait, 20) == 0, log.read_text()
        assert not list(multiproc.glob("gauge_live*.db")), sorted(p.name for p in multiproc.iterdir())
        assert list(multiproc.glob("counter_*.db"))
    finally:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # none left, as they should be
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

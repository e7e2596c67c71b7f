"""What a worker process started by Dramatiq's CLI says at INFO: ModelForge's own lines that it is ready and has
stopped, and none of Dramatiq's start and stop lines, which say the same again; Dramatiq's warnings still pass."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from modelforge_jobs.settings import JobsSettings
from tests.fixtures.polling import eventually
from tests.integration.jobs.conftest import settings_env


async def test_a_worker_process_logs_its_own_ready_line_and_none_of_dramatiqs_lifecycle(
    clean_db: str, redis_url: str, closed_port: int, tmp_path: Path
) -> None:
    settings = JobsSettings(
        database_url=clean_db,
        redis_url=redis_url,
        inference_address=f"127.0.0.1:{closed_port}",  # not called: no job is queued
        data_dir=tmp_path / "jobs",
        queue_namespace=f"test-{uuid.uuid4().hex[:8]}",
        worker_metrics_port=0,
    )
    command = [sys.executable, "-m", "dramatiq", "modelforge_jobs.worker", "--processes", "1", "--threads", "1"]
    log = tmp_path / "dramatiq.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=settings_env(settings), stdout=out, stderr=out, start_new_session=True)
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            return " ready (inference at " in log.read_text()

        await eventually(ready, "the worker's ready line", timeout=30)
        process.terminate()
        assert await asyncio.to_thread(process.wait, 20) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    lines = log.read_text().splitlines()
    # The worker process's lines, in ModelForge's format; the others are Dramatiq's CLI process's, in its own.
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert all("[dramatiq.MainProcess]" in line for line in lines if not line.startswith("{")), lines
    ready = [r for r in records if r["logger"] == "modelforge.jobs.worker" and " ready (inference at " in r["message"]]
    assert len(ready) == 1, lines
    stopped = [r for r in records if r["logger"] == "modelforge.jobs.worker" and r["message"].endswith(" stopped")]
    assert [r["message"] for r in stopped] == [ready[0]["message"].partition(" ready")[0] + " stopped"], lines
    dramatiq_info = [r for r in records if r["logger"].startswith("dramatiq") and r["level"] == "INFO"]
    assert dramatiq_info == [], lines

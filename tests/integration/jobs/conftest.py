"""Fixtures of the jobs tests: the jobs API built by its production `build`, real Dramatiq workers (in this
process or as `python -m modelforge_jobs.worker` subprocesses) on a RedisBroker with a namespace of their own,
and the registry + inference servers of the inference tests.

    jobs_settings                 JobsSettings for this test (fast heartbeats, short backoff)
    jobs_api                      a running JobService and a stub to it
    start_jobs_api(settings)      another API process-alike (for restarts)
    start_worker(settings)        an in-process dramatiq.Worker with the production middleware and actors
    worker                        one such worker with jobs_settings
    spawn_worker(settings)        a worker subprocess (kill it with .kill())
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import dramatiq
import grpc
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelforge import tensors
from modelforge.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from modelforge.registry.v1 import registry_pb2
from modelforge_jobs.__main__ import build as build_jobs
from modelforge_jobs.actors import QUEUES, WorkerResources, declare_actors, make_broker
from modelforge_jobs.datasets import write_records
from modelforge_jobs.settings import JobsSettings
from modelforge_server import app
from tests.integration.inference.conftest import (  # noqa: F401
    RunningInference,
    add_one,
    error_info,
    error_reason,
    failure,
    inference,
    inference_settings_for,
    mlp,
    onnx_dir,
    registry,
    registry_settings,
    start_inference,
    upload,
)

ROOT = Path(__file__).resolve().parents[3]
TERMINAL = {jobs_pb2.JOB_STATE_COMPLETED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}


@dataclass
class RunningJobs:
    settings: JobsSettings
    server: app.Server
    port: int
    stub: jobs_pb2_grpc.JobServiceStub


@pytest.fixture
def jobs_settings(clean_db: str, redis_url: str, tmp_path: Path, inference: RunningInference) -> JobsSettings:  # noqa: F811
    return JobsSettings(
        database_url=clean_db,
        redis_url=redis_url,
        registry_address=inference.registry.address,
        inference_address=inference.address,
        data_dir=tmp_path / "jobs",
        queue_namespace=f"test-{uuid.uuid4().hex[:8]}",
        grace_seconds=1.0,
        heartbeat_interval=0.2,
        heartbeat_timeout=2.0,
        maintenance_interval=0.3,
        retry_min_backoff=0.1,
        retry_max_backoff=1.0,
        watch_interval=0.05,
        worker_threads=2,
    )


@asynccontextmanager
async def running_jobs_api(settings: JobsSettings) -> AsyncIterator[RunningJobs]:
    """Builds the API as `python -m modelforge_jobs` does, on port 0; stops it on exit."""
    async with AsyncExitStack() as stack:
        server = await build_jobs(settings, stack)
        port = server.add_port("127.0.0.1:0")
        await server.start()
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])
        )
        yield RunningJobs(settings, server, port, jobs_pb2_grpc.JobServiceStub(channel))


@pytest.fixture
def start_jobs_api() -> Callable[[JobsSettings], AbstractAsyncContextManager[RunningJobs]]:
    return running_jobs_api


@pytest.fixture
async def jobs_api(jobs_settings: JobsSettings) -> AsyncIterator[RunningJobs]:
    async with running_jobs_api(jobs_settings) as running:
        yield running


@dataclass
class InProcessWorker:
    broker: dramatiq.Broker
    worker: dramatiq.Worker
    resources: WorkerResources

    async def join(self) -> None:
        """Waits until the queues are empty and every message taken has been processed."""
        for queue in QUEUES.values():
            await asyncio.to_thread(self.broker.join, queue, timeout=60_000)
        await asyncio.to_thread(self.worker.join)


@asynccontextmanager
async def running_worker(settings: JobsSettings) -> AsyncIterator[InProcessWorker]:
    """A dramatiq.Worker in this process, composed as worker.py composes it but on a broker of its own."""
    broker = make_broker(settings)
    resources = WorkerResources(settings)
    broker.add_middleware(resources)
    declare_actors(broker, settings, resources)
    worker = dramatiq.Worker(
        broker, queues=set(QUEUES.values()), worker_threads=settings.worker_threads, worker_timeout=200
    )
    await asyncio.to_thread(worker.start)
    try:
        yield InProcessWorker(broker, worker, resources)
    finally:
        await asyncio.to_thread(worker.stop, 10_000)
        broker.close()


@pytest.fixture
def start_worker() -> Callable[[JobsSettings], AbstractAsyncContextManager[InProcessWorker]]:
    return running_worker


@asynccontextmanager
async def open_resources(settings: JobsSettings) -> AsyncIterator[WorkerResources]:
    """A worker's resources, open (its maintenance loop running) on actors that no consumer serves: for the
    maintenance passes and dependency checks a test runs itself."""
    broker = make_broker(settings)
    resources = WorkerResources(settings)
    declare_actors(broker, settings, resources)
    await resources.open()
    try:
        yield resources
    finally:
        await resources.close()
        broker.close()


@pytest.fixture
async def worker(jobs_settings: JobsSettings) -> AsyncIterator[InProcessWorker]:
    async with running_worker(jobs_settings) as running:
        yield running


def settings_env(settings: JobsSettings) -> dict[str, str]:
    """The MODELFORGE_* variables that give a subprocess these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MODELFORGE_")}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is None or isinstance(value, dict):
            continue
        env[f"MODELFORGE_{f.name.upper()}"] = str(value)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@contextmanager
def worker_process(settings: JobsSettings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelforge_jobs.worker"], env=settings_env(settings), stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Callable[[JobsSettings], Any]:
    counter = iter(range(100))
    return lambda settings: worker_process(settings, tmp_path / f"worker-{next(counter)}.log")


# -- helpers -------------------------------------------------------------------------------------------------


async def wait_for(
    get: Callable[[], Awaitable[jobs_pb2.Job]], condition: Callable[[jobs_pb2.Job], bool], *, timeout: float = 60.0
) -> jobs_pb2.Job:
    """Polls the job until `condition` holds; fails after `timeout` seconds with the job's last state."""
    deadline = time.monotonic() + timeout
    while True:
        job = await get()
        if condition(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on job {job.id}: {job}")
        await asyncio.sleep(0.02)


def scrape_metrics(port: int) -> dict[str, float]:
    """The unlabelled samples a worker process serves on its metrics port, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def getter(stub: jobs_pb2_grpc.JobServiceStub, job_id: str) -> Callable[[], Awaitable[jobs_pb2.Job]]:
    async def get() -> jobs_pb2.Job:
        return (await stub.GetJob(jobs_pb2.GetJobRequest(id=job_id))).job

    return get


async def wait_terminal(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, *, timeout: float = 90.0) -> jobs_pb2.Job:
    return await wait_for(getter(stub, job_id), lambda job: job.state in TERMINAL, timeout=timeout)


def inline_request(model: str, inputs: dict[str, np.ndarray], **fields_: Any) -> jobs_pb2.CreateJobRequest:
    return jobs_pb2.CreateJobRequest(
        model_ref=registry_pb2.ModelRef(name=model),
        inline_input=jobs_pb2.InlineInput(tensors=[tensors.to_tensor(a, name) for name, a in inputs.items()]),
        **fields_,
    )


async def results(stub: jobs_pb2_grpc.JobServiceStub, job_id: str) -> tuple[list[int], dict[str, np.ndarray]]:
    """The first_item of every result message, and the outputs concatenated in item order."""
    firsts: list[int] = []
    parts: dict[str, list[np.ndarray]] = {}
    async for message in stub.GetJobResult(jobs_pb2.GetJobResultRequest(id=job_id)):
        firsts.append(message.first_item)
        for tensor in message.record.tensors:
            parts.setdefault(tensor.name, []).append(tensors.to_numpy(tensor))
    return firsts, {name: np.concatenate(chunks) for name, chunks in parts.items()}


async def stored_datasets(settings: JobsSettings) -> tuple[int, int]:
    """How many datasets and dataset records the jobs schema holds."""
    async with await psycopg.AsyncConnection.connect(settings.database_url or "") as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM jobs.datasets), (SELECT count(*) FROM jobs.dataset_records)"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def dataset_file(inputs: dict[str, np.ndarray], *, record_items: int) -> bytes:
    items = len(next(iter(inputs.values())))
    records = [
        jobs_pb2.DatasetRecord(tensors=[tensors.to_tensor(a[i : i + record_items], name) for name, a in inputs.items()])
        for i in range(0, items, record_items)
    ]
    return write_records(records)


async def upload_dataset(
    stub: jobs_pb2_grpc.JobServiceStub,
    data: bytes,
    *,
    sha256: str | None = None,
    chunk: int = 256 * 1024,
    labels: dict[str, str] | None = None,
) -> jobs_pb2.Dataset:
    async def requests() -> AsyncIterator[jobs_pb2.UploadDatasetRequest]:
        yield jobs_pb2.UploadDatasetRequest(
            header=jobs_pb2.UploadDatasetHeader(
                display_name="test",
                sha256=sha256 or hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                labels=labels or {},
            )
        )
        for i in range(0, len(data), chunk):
            yield jobs_pb2.UploadDatasetRequest(chunk=data[i : i + chunk])

    return (await stub.UploadDataset(requests())).dataset

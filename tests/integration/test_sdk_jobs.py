# ruff: noqa: F811  (pytest fixtures imported from conftest modules are parameters here)
"""The SDK's jobs clients against a real jobs API, real Dramatiq workers on Redis, inference and registry.

The sync client blocks, so its scenario runs in a worker thread while the servers keep the test's event loop.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelforge import (
    AsyncJobsClient,
    AsyncRegistryClient,
    FailedPreconditionError,
    InvalidArgumentError,
    JobsClient,
    JobState,
    NotFoundError,
)
from modelforge_jobs.__main__ import build as build_jobs
from modelforge_server import embedded
from tests.fixtures.onnx_models import ModelFile
from tests.integration.jobs.conftest import (  # noqa: F401
    InProcessWorker,
    RunningInference,
    RunningJobs,
    add_one,
    inference,
    jobs_api,
    jobs_settings,
    onnx_dir,
    registry,
    registry_settings,
    start_inference,
    start_worker,
    stored_datasets,
    worker,
)


@pytest.fixture
async def adder(inference: RunningInference, add_one: ModelFile) -> str:
    async with AsyncRegistryClient(inference.registry.address) as registry_client:
        await registry_client.push(add_one.data, name="adder", alias="production")
    return "adder@production"


@pytest.fixture
async def client(jobs_api: RunningJobs) -> AsyncJobsClient:
    async with AsyncJobsClient(f"127.0.0.1:{jobs_api.port}") as c:
        yield c


async def test_submit_watch_and_result(client: AsyncJobsClient, worker: InProcessWorker, adder: str) -> None:
    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    job = await client.submit(adder, {"x": x}, batch_size=16, labels={"team": "core"})
    assert job.status.model_version == 1 and job.status.state is JobState.QUEUED
    done = []
    async for status in job.watch():
        done.append(status.progress.items_done)
    assert done == sorted(done)
    assert job.status.state is JobState.COMPLETED and job.status.progress.items_done == 100
    outputs = await job.result()
    np.testing.assert_array_equal(outputs["y"], x + 1)
    assert [j.id async for j in client.list_jobs(labels={"team": "core"})] == [job.id]
    assert (await client.get_job(job.id)).status.state is JobState.COMPLETED
    assert await job.delete() == 100


async def test_submit_a_npz_file_uploads_a_dataset_with_progress(
    client: AsyncJobsClient, worker: InProcessWorker, adder: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(0).random((300, 4), dtype=np.float32)
    np.savez(tmp_path / "items.npz", x=x)
    seen: list[int] = []
    job = await client.submit(adder, tmp_path / "items.npz", batch_size=64, progress=lambda d, t: seen.append(d))
    assert job.status.dataset_id and seen and seen[-1] > 0
    dataset = await client.get_dataset(job.status.dataset_id)
    assert dataset.item_count == 300
    np.testing.assert_array_equal((await job.result(timeout=120))["y"], x + 1)


async def test_cancel_retry_and_errors_without_a_worker(client: AsyncJobsClient, adder: str) -> None:
    job = await client.submit(adder, {"x": np.zeros((4, 4), np.float32)})
    with pytest.raises(TimeoutError, match="still QUEUED"):
        await job.wait(timeout=0.5)
    assert (await job.cancel()).state is JobState.CANCELLED
    with pytest.raises(FailedPreconditionError) as not_completed:
        await job.result()
    assert not_completed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (await job.retry()).state is JobState.QUEUED
    await job.cancel()
    with pytest.raises(NotFoundError) as unknown:
        await client.submit("ghost", {"x": np.zeros((1, 4), np.float32)})
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError, match="inputs=... .* or dataset="):
        await client.submit(adder)
    with pytest.raises(ValueError, match="same number of items"):
        await client.submit(adder, {"x": np.zeros((2, 4)), "z": np.zeros((3, 4))})


def _sync_scenario(address: str, ref: str) -> None:
    x = np.ones((10, 4), dtype=np.float32)
    with JobsClient(address) as jobs:
        job = jobs.submit(ref, {"x": x}, batch_size=4, priority="high")
        states = [status.state for status in job.watch()]
        assert states[-1] is JobState.COMPLETED
        np.testing.assert_array_equal(job.result()["y"], x + 1)
        assert job.id in [j.id for j in jobs.list_jobs(state="COMPLETED")]
        dataset = jobs.upload_dataset({"x": x}, display_name="ones", labels={"use": "sdk-test"})
        assert (dataset.item_count, dataset.display_name) == (10, "ones")
        assert [d.id for d in jobs.list_datasets(labels={"use": "sdk-test"}, page_size=1)] == [dataset.id]
        second = jobs.submit(ref, dataset=dataset.id)
        assert second.wait(timeout=120).state is JobState.COMPLETED
        second.delete()
        jobs.delete_dataset(dataset.id)


async def test_sync_client_covers_the_same_ground(jobs_api: RunningJobs, worker: InProcessWorker, adder: str) -> None:
    await asyncio.to_thread(_sync_scenario, f"127.0.0.1:{jobs_api.port}", adder)


async def test_a_refused_submit_removes_the_dataset_it_uploaded(
    client: AsyncJobsClient, jobs_settings, adder: str
) -> None:
    before = await stored_datasets(jobs_settings)
    wrong = np.zeros((300_000, 4), np.float64)  # 9.6 MB: uploaded as a dataset first, then refused for its dtype
    with pytest.raises(InvalidArgumentError, match="FLOAT64"):
        await client.submit(adder, {"x": wrong})
    assert await stored_datasets(jobs_settings) == before


async def test_a_repeated_submit_keeps_one_dataset_of_its_inputs(
    client: AsyncJobsClient, jobs_api: RunningJobs, jobs_settings, adder: str
) -> None:
    before = await stored_datasets(jobs_settings)
    x = np.zeros((300_000, 4), np.float32)  # 4.8 MB: uploaded as a dataset first
    first = await client.submit(adder, {"x": x}, request_id="once")
    again = await client.submit(adder, {"x": x}, request_id="once")  # a retry: the same job, its upload dropped
    assert again.id == first.id and again.status.dataset_id == first.status.dataset_id
    assert (await stored_datasets(jobs_settings))[0] == before[0] + 1

    def sync_retry() -> str:
        with JobsClient(f"127.0.0.1:{jobs_api.port}") as jobs:
            return jobs.submit(adder, {"x": x}, request_id="once").id

    assert await asyncio.to_thread(sync_retry) == first.id
    assert (await stored_datasets(jobs_settings))[0] == before[0] + 1


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_wait_outlasts_a_restart_of_the_jobs_api(jobs_settings, start_worker, adder: str, flavour: str) -> None:
    port = embedded.free_port()

    async def serve() -> AsyncExitStack:
        stack = AsyncExitStack()
        server = await build_jobs(jobs_settings, stack)
        server.add_port(f"127.0.0.1:{port}")
        await server.start()
        return stack

    x = {"x": np.ones((3, 4), np.float32)}
    stack = await serve()
    try:
        async with AsyncJobsClient(f"127.0.0.1:{port}") as aio:
            if flavour == "async":
                job = await aio.submit(adder, x)  # no worker yet: it waits
                waiting = asyncio.ensure_future(job.wait(timeout=60))
            else:
                client = JobsClient(f"127.0.0.1:{port}")
                sync_job = await asyncio.to_thread(client.submit, adder, x)
                waiting = asyncio.ensure_future(asyncio.to_thread(sync_job.wait, 60))
            await asyncio.sleep(0.3)
            await stack.aclose()  # the API stops: its watchers are told REPLICA_STOPPING
            await asyncio.sleep(0.5)
            assert not waiting.done()
            stack = await serve()  # and comes back on its port
            async with start_worker(jobs_settings):
                status = await waiting
            if flavour == "sync":
                client.close()
    finally:
        await stack.aclose()
    assert status.state is JobState.COMPLETED and status.progress.items_done == 3


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"ref": "Demo!"}, "invalid model name 'Demo!'"),
        ({"priority": "urgent"}, "priority must be 'low', 'normal' or 'high'"),
        ({"time_limit": -1}, "time_limit must be 0 or more seconds"),
        ({"batch_size": 2**40}, "batch_size must be a whole number from 0 to 2147483647"),
    ],
)
async def test_a_submit_with_a_malformed_argument_is_refused_before_its_dataset_is_uploaded(
    client: AsyncJobsClient, jobs_api: RunningJobs, jobs_settings, adder: str, tmp_path: Path, bad: dict, says: str
) -> None:
    np.savez(tmp_path / "items.npz", x=np.ones((3, 4), np.float32))  # a file: always uploaded as a dataset
    arguments = dict(bad)
    ref = arguments.pop("ref", adder)
    before = await stored_datasets(jobs_settings)
    with pytest.raises(ValueError, match=re.escape(says)):
        await client.submit(ref, tmp_path / "items.npz", **arguments)

    def sync_submit() -> None:
        with JobsClient(f"127.0.0.1:{jobs_api.port}") as jobs, pytest.raises(ValueError, match=re.escape(says)):
            jobs.submit(ref, tmp_path / "items.npz", **arguments)

    await asyncio.to_thread(sync_submit)
    assert await stored_datasets(jobs_settings) == before


class _Blocking(grpc.aio.UnaryUnaryClientInterceptor):
    """Holds every CreateJob call until it is cancelled; other calls pass."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if _method(client_call_details).endswith("/CreateJob"):
            self.reached.set()
            await asyncio.Event().wait()
        return await continuation(client_call_details, request)


class _Interrupting(grpc.UnaryUnaryClientInterceptor):
    """Raises KeyboardInterrupt as CreateJob is called, as Ctrl-C would; other calls pass."""

    def intercept_unary_unary(self, continuation, client_call_details, request):
        if _method(client_call_details).endswith("/CreateJob"):
            raise KeyboardInterrupt
        return continuation(client_call_details, request)


def _method(details: grpc.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


async def test_a_submit_cancelled_or_interrupted_after_its_upload_removes_the_dataset(
    jobs_api: RunningJobs, jobs_settings, adder: str, tmp_path: Path
) -> None:
    np.savez(tmp_path / "items.npz", x=np.ones((3, 4), np.float32))
    address = f"127.0.0.1:{jobs_api.port}"
    before = await stored_datasets(jobs_settings)

    blocking = _Blocking()
    async with grpc.aio.insecure_channel(address, interceptors=[blocking]) as channel:
        client = AsyncJobsClient(channel=channel)
        submit = asyncio.ensure_future(client.submit(adder, tmp_path / "items.npz"))
        await blocking.reached.wait()  # uploaded, and creating the job
        assert (await stored_datasets(jobs_settings))[0] == before[0] + 1
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
    assert await stored_datasets(jobs_settings) == before

    def interrupted() -> None:
        with grpc.insecure_channel(address) as channel:
            jobs = JobsClient(channel=grpc.intercept_channel(channel, _Interrupting()))
            with pytest.raises(KeyboardInterrupt):
                jobs.submit(adder, tmp_path / "items.npz")

    await asyncio.to_thread(interrupted)
    assert await stored_datasets(jobs_settings) == before


async def test_a_npz_file_numpy_cannot_read_is_a_value_error_naming_it(
    client: AsyncJobsClient, jobs_settings, adder: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez_compressed(tmp_path / "flipped.npz", x=np.arange(1000, dtype=np.float32))
    flipped = bytearray((tmp_path / "flipped.npz").read_bytes())
    middle = len(flipped) // 2
    flipped[middle : middle + 2] = bytes(b ^ 0xFF for b in flipped[middle : middle + 2])
    (tmp_path / "flipped.npz").write_bytes(flipped)
    before = await stored_datasets(jobs_settings)
    for name in ("bad.npz", "flipped.npz"):
        says = f"{tmp_path / name} is not a .npy or .npz file that numpy reads without pickle: "
        with pytest.raises(ValueError, match=re.escape(says)):
            await client.submit(adder, tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(says)):
            await client.upload_dataset(str(tmp_path / name))
    assert await stored_datasets(jobs_settings) == before

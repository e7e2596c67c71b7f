# ruff: noqa: F811  (pytest fixtures imported from conftest modules are parameters here)
"""The SDK's jobs clients against a real jobs API, real Dramatiq workers on Redis, inference and registry.

The sync client blocks, so its scenario runs in a worker thread while the servers keep the test's event loop.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto

from modelforge import (
    AlreadyExistsError,
    AsyncInferenceClient,
    AsyncJobsClient,
    AsyncRegistryClient,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    Job,
    JobsClient,
    JobState,
    NotFoundError,
)
from modelforge._channel import JOBS, channel_options
from modelforge.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from modelforge_jobs.__main__ import build as build_jobs
from modelforge_server import embedded
from tests.fixtures.onnx_models import (  # noqa: F401
    ModelFile,
    build_identity,
    image_generator,
    model_bytes,
    string_model,
)
from tests.fixtures.proxy import TcpProxy
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
    start_jobs_api,
    start_worker,
    stored_datasets,
    worker,
)


async def _push(inference: RunningInference, model: bytes, name: str, alias: str | None = None) -> None:
    async with AsyncRegistryClient(inference.registry.address) as registry_client:
        await registry_client.push(model, name=name, alias=alias)


@pytest.fixture
async def adder(inference: RunningInference, add_one: ModelFile) -> str:
    await _push(inference, add_one.data, "adder", "production")
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


async def test_deleting_a_job_with_its_dataset_deletes_both_once_and_no_other(
    client: AsyncJobsClient, jobs_api: RunningJobs, worker: InProcessWorker, adder: str
) -> None:
    x = np.ones((6, 4), dtype=np.float32)
    dataset = await client.upload_dataset({"x": x})
    kept = await client.upload_dataset({"x": x})
    first = await client.submit(adder, dataset=dataset.id)
    second = await client.submit(adder, dataset=dataset.id)
    inline = await client.submit(adder, {"x": x})
    other = await client.submit(adder, dataset=kept.id)
    for job in (first, second, inline, other):
        assert (await job.wait(timeout=60)).state is JobState.COMPLETED
    with pytest.raises(TypeError, match="dataset takes True or False"):
        await first.delete(dataset="yes")  # type: ignore[arg-type]
    assert (await client.get_job(first.id)).status.state is JobState.COMPLETED  # refused before any call

    assert await first.delete(dataset=True) == 6
    with pytest.raises(NotFoundError):
        await client.get_dataset(dataset.id)
    assert await second.delete(dataset=True) == 6  # its dataset went with the first: nothing more to do
    assert await inline.delete(dataset=True) == 6
    assert await other.delete() == 6
    assert (await client.get_dataset(kept.id)).id == kept.id  # without dataset=True it stays

    def sync_delete() -> None:
        with JobsClient(f"127.0.0.1:{jobs_api.port}") as jobs:
            job = jobs.submit(adder, dataset=kept.id)
            job.wait(timeout=60)
            assert job.delete(dataset=True) == 6
            with pytest.raises(NotFoundError):
                jobs.get_dataset(kept.id)

    await asyncio.to_thread(sync_delete)


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


async def test_a_progress_callback_that_raises_ends_the_dataset_upload_with_its_exception(
    client: AsyncJobsClient, jobs_api: RunningJobs, jobs_settings
) -> None:
    before = await stored_datasets(jobs_settings)
    x = np.ones((1000, 4), np.float32)

    def refuse(done: int, total: int) -> None:
        if done:
            raise RuntimeError("not now")

    with pytest.raises(RuntimeError, match="^not now$"):
        await client.upload_dataset({"x": x}, progress=refuse, chunk_bytes=1024)

    def sync_uploads() -> None:
        with JobsClient(f"127.0.0.1:{jobs_api.port}") as jobs:
            with pytest.raises(RuntimeError, match="^not now$"):
                jobs.upload_dataset({"x": x}, progress=refuse, chunk_bytes=1024)

            def interrupt(done: int, total: int) -> None:
                if done:
                    raise KeyboardInterrupt  # as Ctrl-C in a callback would

            with pytest.raises(KeyboardInterrupt):
                jobs.upload_dataset({"x": x}, progress=interrupt, chunk_bytes=1024)

    await asyncio.wait_for(asyncio.to_thread(sync_uploads), 30)
    assert await stored_datasets(jobs_settings) == before


async def test_a_refused_submit_removes_the_dataset_it_uploaded(
    client: AsyncJobsClient, jobs_settings, adder: str
) -> None:
    before = await stored_datasets(jobs_settings)
    wrong = np.zeros((300_000, 4), np.float64)  # 9.6 MB: uploaded as a dataset first, then refused for its dtype
    with pytest.raises(InvalidArgumentError, match="has dtype float64, the model takes float32"):
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


async def test_a_request_id_given_again_with_other_inputs_raises_and_keeps_no_dataset_of_them(
    client: AsyncJobsClient, jobs_api: RunningJobs, jobs_settings, adder: str
) -> None:
    x = np.zeros((300_000, 4), np.float32)  # uploaded as a dataset first
    first = await client.submit(adder, {"x": x}, request_id="mine")
    before = await stored_datasets(jobs_settings)
    with pytest.raises(AlreadyExistsError, match=f"used for job {first.id}.*another input") as raised:
        await client.submit(adder, {"x": x + 1}, request_id="mine")
    assert raised.value.reason == "REQUEST_ID_REUSED"
    assert await stored_datasets(jobs_settings) == before


def _deadline_exceeded(error: BaseException) -> None:
    """Asserts that a call ended with the SDK's DeadlineExceededError itself: no subclass, no other error."""
    assert type(error) is DeadlineExceededError, repr(error)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_call_with_a_timeout_of_its_own_has_that_deadline_instead_of_the_clients(
    client: AsyncJobsClient, jobs_api: RunningJobs, adder: str
) -> None:
    x = {"x": np.ones((2, 4), np.float32)}
    labels = {"use": f"timeouts-{uuid.uuid4()}"}  # this test's jobs and datasets, whatever else the database holds
    dataset = await client.upload_dataset(x, display_name="timeouts", labels=labels)
    async with TcpProxy.in_front_of(f"127.0.0.1:{jobs_api.port}") as proxy:
        proxy.delay = 0.1  # every answer takes longer than the tiny timeouts below
        async with AsyncJobsClient(proxy.address, timeout=0.05) as tiny:
            with pytest.raises(DeadlineExceededError) as caught:
                await tiny.get_dataset(dataset.id)  # the client's timeout, by default
            _deadline_exceeded(caught.value)
            job = await tiny.submit(adder, x, labels=labels, timeout=30)
            assert (await tiny.get_job(job.id, timeout=None)).status.state is JobState.QUEUED  # no worker
            assert (await job.refresh(timeout=30)).state is JobState.QUEUED
            assert [j.id async for j in tiny.list_jobs(labels=labels, timeout=None)] == [job.id]
            assert (await tiny.get_dataset(dataset.id, timeout=30)).display_name == "timeouts"
            assert [d.id async for d in tiny.list_datasets(labels=labels, page_size=1, timeout=None)] == [dataset.id]
            assert (await job.cancel(timeout=30)).state is JobState.CANCELLED
            assert (await job.retry(timeout=None)).state is JobState.QUEUED
            await job.cancel(timeout=30)
            assert await job.delete(timeout=None) == 0
        async with AsyncJobsClient(proxy.address) as default:  # 30 s for a call, unless it says otherwise
            with pytest.raises(DeadlineExceededError) as caught:
                await default.get_dataset(dataset.id, timeout=0.05)
            _deadline_exceeded(caught.value)
            assert (await default.get_dataset(dataset.id)).id == dataset.id

        def blocking() -> str:
            with JobsClient(proxy.address, timeout=0.05) as jobs:
                with pytest.raises(DeadlineExceededError) as caught:
                    next(jobs.list_datasets())
                _deadline_exceeded(caught.value)
                queued = jobs.submit(adder, x, labels=labels, timeout=None)
                assert jobs.get_job(queued.id, timeout=30).status.state is JobState.QUEUED
                assert queued.refresh(timeout=None).state is JobState.QUEUED
                assert [j.id for j in jobs.list_jobs(labels=labels, timeout=30)] == [queued.id]
                assert jobs.get_dataset(dataset.id, timeout=None).item_count == 2
                assert [d.id for d in jobs.list_datasets(labels=labels, page_size=1, timeout=30)] == [dataset.id]
                assert queued.cancel(timeout=None).state is JobState.CANCELLED
                assert queued.retry(timeout=30).state is JobState.QUEUED
                queued.cancel(timeout=None)
            with JobsClient(proxy.address) as jobs:
                with pytest.raises(DeadlineExceededError) as caught:
                    jobs.get_job(queued.id, timeout=0.05)
                _deadline_exceeded(caught.value)
                assert jobs.get_job(queued.id).status.state is JobState.CANCELLED
            return queued.id

        kept = await asyncio.to_thread(blocking)
        proxy.delay = 0.0
        async with AsyncJobsClient(proxy.address, timeout=None) as unlimited:
            handle = await unlimited.get_job(kept)
            kept_status = handle.status
            proxy.stall()  # now no answer comes at all: a call's own timeout ends it, where the client has none
            for call in (
                unlimited.submit(adder, x, timeout=0.05),
                unlimited.get_job(kept, timeout=0.05),
                anext(unlimited.list_jobs(timeout=0.05)),
                unlimited.get_dataset(dataset.id, timeout=0.05),
                anext(unlimited.list_datasets(timeout=0.05)),
                unlimited.delete_dataset(dataset.id, timeout=0.05),
                handle.refresh(timeout=0.05),
                handle.cancel(timeout=0.05),
                handle.retry(timeout=0.05),
                handle.delete(timeout=0.05),
            ):
                with pytest.raises(DeadlineExceededError) as caught:
                    await asyncio.wait_for(call, 10)
                _deadline_exceeded(caught.value)

        def stalled() -> None:
            with JobsClient(proxy.address, timeout=None) as jobs:
                handle = Job(jobs, kept_status)
                for call in (
                    lambda: jobs.submit(adder, x, timeout=0.05),
                    lambda: jobs.get_job(kept, timeout=0.05),
                    lambda: next(jobs.list_jobs(timeout=0.05)),
                    lambda: jobs.get_dataset(dataset.id, timeout=0.05),
                    lambda: next(jobs.list_datasets(timeout=0.05)),
                    lambda: jobs.delete_dataset(dataset.id, timeout=0.05),
                    lambda: handle.refresh(timeout=0.05),
                    lambda: handle.cancel(timeout=0.05),
                    lambda: handle.retry(timeout=0.05),
                    lambda: handle.delete(timeout=0.05),
                ):
                    with pytest.raises(DeadlineExceededError) as caught:
                        call()
                    _deadline_exceeded(caught.value)

        await asyncio.to_thread(stalled)
    assert (await client.get_dataset(dataset.id)).id == dataset.id  # no refused call reached the server
    assert (await client.get_job(kept)).status.state is JobState.CANCELLED


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


async def test_save_result_writes_what_result_returns_into_a_npz_file(
    client: AsyncJobsClient, worker: InProcessWorker, adder: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(1).random((100, 4), dtype=np.float32)
    job = await client.submit(adder, {"x": x}, batch_size=16)  # 7 records
    await job.wait(timeout=120)
    expected = await job.result()
    out = tmp_path / "saved" / "result.npz"
    out.parent.mkdir()
    out.write_bytes(b"an older file, replaced whole")

    saved = await job.save_result(out)

    assert saved == {"y": (np.dtype(np.float32), (100, 4))}
    with np.load(out, allow_pickle=False) as archive:
        assert archive.files == ["y"]
        np.testing.assert_array_equal(archive["y"], expected["y"])
        np.testing.assert_array_equal(archive["y"], x + 1)
    assert [p.name for p in out.parent.iterdir()] == ["result.npz"]  # no temporary file left
    deeper = tmp_path / "new" / "deeper" / "result.npz"  # directories that do not exist yet are made
    await job.save_result(deeper)
    with np.load(deeper, allow_pickle=False) as archive:
        np.testing.assert_array_equal(archive["y"], x + 1)


def _sync_save(address: str, ref: str, directory: Path) -> None:
    x = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    with JobsClient(address) as jobs:
        job = jobs.submit(ref, {"x": x}, batch_size=4)  # 8 records
        saved = job.save_result(directory / "sync.npz", timeout=120)
        assert saved == {"y": (np.dtype(np.float32), (30, 4))}
        with np.load(directory / "sync.npz", allow_pickle=False) as archive:
            np.testing.assert_array_equal(archive["y"], job.result()["y"])
        assert [p.name for p in directory.iterdir()] == ["sync.npz"]
        # A path that cannot take the file (here a directory) fails once every record is written: those go.
        (directory / "taken.npz").mkdir()
        with pytest.raises(IsADirectoryError) as taken:
            job.save_result(directory / "taken.npz")
        assert taken.value.filename == str(directory / "taken.npz")
        assert sorted(p.name for p in directory.iterdir()) == ["sync.npz", "taken.npz"]
        assert not any((directory / "taken.npz").iterdir())


async def test_sync_save_result_writes_the_same_arrays_and_cleans_up_after_a_failure(
    jobs_api: RunningJobs, worker: InProcessWorker, adder: str, tmp_path: Path
) -> None:
    (tmp_path / "saved").mkdir()
    await asyncio.to_thread(_sync_save, f"127.0.0.1:{jobs_api.port}", adder, tmp_path / "saved")


async def test_save_result_of_a_job_not_completed_writes_nothing(
    client: AsyncJobsClient, jobs_api: RunningJobs, adder: str, tmp_path: Path
) -> None:
    job = await client.submit(adder, {"x": np.zeros((4, 4), np.float32)})  # no worker: it never runs
    await job.cancel()
    directory = tmp_path / "saved"
    directory.mkdir()
    with pytest.raises(FailedPreconditionError) as refused:
        await job.save_result(directory / "result.npz")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is CANCELLED; results are available once it is COMPLETED" in refused.value.details
    assert not any(directory.iterdir())

    def sync_save() -> None:
        with JobsClient(f"127.0.0.1:{jobs_api.port}") as jobs:
            with pytest.raises(FailedPreconditionError) as caught:
                jobs.get_job(job.id).save_result(directory / "result.npz")
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION

    await asyncio.to_thread(sync_save)
    assert not any(directory.iterdir())


class _StalledResult(grpc.aio.UnaryStreamClientInterceptor):
    """Passes the first message of GetJobResult, then holds the stream until the call is cancelled."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        if not _method(client_call_details).endswith("/GetJobResult"):
            return call

        async def first_then_stall():
            async for message in call:
                yield message
                self.reached.set()  # asked for the next message: the first one has been written
                await asyncio.Event().wait()

        return first_then_stall()


class _InterruptedResult(grpc.UnaryStreamClientInterceptor):
    """Passes the first message of GetJobResult, then raises KeyboardInterrupt, as Ctrl-C would."""

    def intercept_unary_stream(self, continuation, client_call_details, request):
        call = continuation(client_call_details, request)
        return _FirstThenInterrupt(call) if _method(client_call_details).endswith("/GetJobResult") else call


class _FirstThenInterrupt:
    def __init__(self, call) -> None:
        self._call = call
        self._given = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._given:
            raise KeyboardInterrupt
        self._given = True
        return next(self._call)

    def cancel(self) -> bool:
        return self._call.cancel()


async def test_a_save_cancelled_or_interrupted_midway_leaves_the_path_as_it_was_and_no_temporary_file(
    client: AsyncJobsClient, jobs_api: RunningJobs, worker: InProcessWorker, adder: str, tmp_path: Path
) -> None:
    job = await client.submit(adder, {"x": np.ones((40, 4), np.float32)}, batch_size=4)
    await job.wait(timeout=120)
    address = f"127.0.0.1:{jobs_api.port}"
    directory = tmp_path / "saved"
    directory.mkdir()
    out = directory / "result.npz"
    out.write_bytes(b"before")

    stalled = _StalledResult()
    async with grpc.aio.insecure_channel(address, interceptors=[stalled]) as channel:
        handle = await AsyncJobsClient(channel=channel).get_job(job.id)
        save = asyncio.ensure_future(handle.save_result(out))
        await stalled.reached.wait()
        assert len(list(directory.iterdir())) == 2  # the file as it was, and the directory being written
        save.cancel()
        with pytest.raises(asyncio.CancelledError):
            await save
    assert [p.name for p in directory.iterdir()] == ["result.npz"] and out.read_bytes() == b"before"

    def interrupted() -> None:
        with grpc.insecure_channel(address) as channel:
            jobs = JobsClient(channel=grpc.intercept_channel(channel, _InterruptedResult()))
            with pytest.raises(KeyboardInterrupt):
                jobs.get_job(job.id).save_result(out)

    await asyncio.to_thread(interrupted)
    assert [p.name for p in directory.iterdir()] == ["result.npz"] and out.read_bytes() == b"before"

    stalled = _StalledResult()  # into directories made for it: they go with the temporary files
    async with grpc.aio.insecure_channel(address, interceptors=[stalled]) as channel:
        handle = await AsyncJobsClient(channel=channel).get_job(job.id)
        save = asyncio.ensure_future(handle.save_result(tmp_path / "made" / "for it" / "result.npz"))
        await stalled.reached.wait()
        assert (tmp_path / "made" / "for it").is_dir()
        save.cancel()
        with pytest.raises(asyncio.CancelledError):
            await save
    assert not (tmp_path / "made").exists()


async def test_save_result_keeps_string_outputs_readable_without_pickle(
    client: AsyncJobsClient,
    worker: InProcessWorker,
    inference: RunningInference,
    string_model: ModelFile,
    tmp_path: Path,
) -> None:
    await _push(inference, string_model.data, "labeller")
    text = np.array(["cat", "dog", "fish", "bird", "", "cat", "naïve"] * 3)
    job = await client.submit("labeller", {"text": text}, batch_size=5)  # 5 records
    await job.wait(timeout=120)
    expected = await job.result()

    saved = await job.save_result(tmp_path / "labels.npz")

    assert saved == {"label_id": (np.dtype(np.int64), (21,)), "label": (np.dtype("<U7"), (21,))}
    with np.load(tmp_path / "labels.npz", allow_pickle=False) as archive:
        assert archive.files == list(expected) == ["label_id", "label"]
        np.testing.assert_array_equal(archive["label_id"], expected["label_id"])
        assert archive["label"].tolist() == [label.decode() for label in expected["label"]]
        assert archive["label"][:4].tolist() == ["CAT", "DOG", "UNKNOWN", "BIRD"]

    # A string ending in NUL: numpy would drop the NUL from a str or bytes array, and pickle is not an option.
    await _push(inference, model_bytes(build_identity(TensorProto.STRING, ["batch"])), "echo")
    echoed = await client.submit("echo", {"x": np.array([b"ok", b"a\0"], dtype=object)}, batch_size=1)
    await echoed.wait(timeout=120)
    assert (await echoed.result())["y"].tolist() == [b"ok", b"a\0"]
    says = "output 'y' has strings ending in NUL bytes, which a .npy file cannot hold without pickle; read it with "
    with pytest.raises(ValueError, match=re.escape(says + "result() instead")):
        await echoed.save_result(tmp_path / "echo.npz")
    assert [p.name for p in tmp_path.iterdir() if "echo" in p.name] == []  # nor a temporary file


_MEASURED_SAVE = """
import re, sys
from pathlib import Path
from modelforge import JobsClient

def peak():  # bytes: this process's high-water mark (ru_maxrss would count its parent's, from before exec)
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

address, job_id, path = sys.argv[1:]
with JobsClient(address) as jobs:
    job = jobs.get_job(job_id)
    job.wait()
    before = peak()
    job.save_result(path)
    print(peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the memory peak from /proc (Linux)")
async def test_save_result_takes_the_memory_of_a_few_records_not_of_the_result(
    client: AsyncJobsClient,
    jobs_api: RunningJobs,
    worker: InProcessWorker,
    inference: RunningInference,
    image_generator: ModelFile,
    tmp_path: Path,
) -> None:
    await _push(inference, image_generator.data, "painter")
    latent = np.random.default_rng(2).standard_normal((80, 16)).astype(np.float32)
    job = await client.submit("painter", {"latent": latent}, batch_size=2)  # 40 records of 6 MiB
    await job.wait(timeout=300)
    result_bytes = 80 * 3 * 512 * 512 * 4  # 240 MiB

    # In a process of its own, whose peak memory is its own; the servers stay on this loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _MEASURED_SAVE,
        f"127.0.0.1:{jobs_api.port}",
        job.id,
        str(tmp_path / "images.npz"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    grown = int(out)  # about 80 MiB: a few records in flight (gRPC's buffers, the message, its bytes) and threads
    assert grown < result_bytes // 2, f"saving {result_bytes >> 20} MiB grew the process by {grown >> 20} MiB"
    with np.load(tmp_path / "images.npz", allow_pickle=False) as archive:
        images = archive["image"]
        assert images.shape == (80, 3, 512, 512)
        async with AsyncInferenceClient(inference.address) as inference_client:
            some = await inference_client.predict("painter", {"latent": latent[[0, 37, 79]]})
        np.testing.assert_allclose(images[[0, 37, 79]], some["image"], rtol=1e-6)


async def test_a_quiet_watch_on_a_jobs_api_that_went_silent_ends_unavailable(
    jobs_settings, start_jobs_api, adder: str
) -> None:
    """A watch without a deadline on a service whose host went away, or behind a network cut, used to wait for
    ever: nothing answers and nothing closes. The SDK's channels ping while a call is open and give up; the
    watch then ends UNAVAILABLE, which Job.watch meets with its reconnects, and past them raises."""
    async with start_jobs_api(replace(jobs_settings, keepalive_seconds=0.5)) as api:
        proxy = await TcpProxy.to_address("127.0.0.1", api.port)
        options = channel_options(JOBS, keepalive_seconds=0.5)
        try:
            async with (
                grpc.aio.insecure_channel(proxy.address, options=options) as channel,
                AsyncJobsClient(channel=channel) as client,
            ):
                job = await client.submit(adder, {"x": np.zeros((1, 4), np.float32)})  # no worker: QUEUED for ever
                watch = jobs_pb2_grpc.JobServiceStub(channel).WatchJob(jobs_pb2.WatchJobRequest(id=job.id))
                assert (await watch.read()).job.state == jobs_pb2.JOB_STATE_QUEUED
                quiet = asyncio.ensure_future(watch.read())
                done, _ = await asyncio.wait({quiet}, timeout=3.0)  # several pings' worth of quiet, answered
                assert not done, "a quiet watch whose service answers its pings must stay open"
                proxy.stall()
                with pytest.raises(grpc.aio.AioRpcError) as broken:
                    async with asyncio.timeout(30):  # only so that a regression fails instead of hanging
                        await quiet
                assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await proxy.close()


async def test_a_submit_of_a_bare_array_says_to_name_its_input(client: AsyncJobsClient, adder: str) -> None:
    with pytest.raises(TypeError, match=r"inputs must be a mapping of input name to array, .*; got ndarray"):
        await client.submit(adder, np.ones((3, 4), np.float32))  # type: ignore[arg-type]

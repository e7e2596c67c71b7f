"""Cancel, retry, failures and retries, request_id idempotency, retention."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace

import grpc
import numpy as np
import psycopg
import pytest

from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_inference.__main__ import build as build_inference
from modelforge_server import embedded
from tests.fixtures.onnx_models import build_counter, build_multi_io, image_generator, model_bytes  # noqa: F401
from tests.fixtures.polling import eventually
from tests.fixtures.proxy import TcpProxy
from tests.integration.inference.test_scheduling import wait_in_flight
from tests.integration.jobs.conftest import (
    dataset_file,
    error_reason,
    getter,
    inline_request,
    results,
    scrape_metrics,
    stored_datasets,
    upload,
    upload_dataset,
    wait_for,
    wait_terminal,
    worker_process,
)


def _x(items: int) -> np.ndarray:
    return np.arange(items * 4, dtype=np.float32).reshape(items, 4)


async def _check_all_items_once(stub, job_id: str, x: np.ndarray, batch: int) -> None:
    firsts, outputs = await results(stub, job_id)
    assert firsts == list(range(0, len(x), batch))
    np.testing.assert_array_equal(outputs["y"], x + 1)


async def _cancelled_while_running(jobs_api, inference, add_one, x: np.ndarray) -> jobs_pb2.Job:  # type: ignore[no-untyped-def]
    """A job of `x` in batches of 10, cancelled once its first batches are stored."""
    await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job
    await wait_for(getter(jobs_api.stub, job.id), lambda j: j.progress.items_done > 0)
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    return job


async def test_cancelled_queued_job_never_runs(jobs_api, jobs_settings, start_worker, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(8)}))).job
    cancelled = (await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))).job
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    async with start_worker(jobs_settings) as worker:
        await worker.join()  # the message was delivered and dropped
    after = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert after.state == jobs_pb2.JOB_STATE_CANCELLED
    assert after.attempt_count == 0 and after.progress.items_done == 0 and not after.HasField("start_time")
    again = (await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))).job
    assert again.state == jobs_pb2.JOB_STATE_CANCELLED


async def test_cancelled_running_job_keeps_its_items_and_retry_finishes_it(
    jobs_api, worker, inference, add_one
) -> None:
    x = _x(20_000)
    job = await _cancelled_while_running(jobs_api, inference, add_one, x)
    await worker.join()
    stopped = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert stopped.state == jobs_pb2.JOB_STATE_CANCELLED
    assert 0 < stopped.progress.items_done < 20_000
    result = await _failure(jobs_api.stub.GetJobResult(jobs_pb2.GetJobResultRequest(id=job.id)))
    assert result == grpc.StatusCode.FAILED_PRECONDITION

    retried = (await jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id))).job
    assert retried.state == jobs_pb2.JOB_STATE_QUEUED
    assert retried.progress.items_done == stopped.progress.items_done
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED and final.progress.items_done == 20_000
    await _check_all_items_once(jobs_api.stub, job.id, x, 10)


async def test_a_retry_right_after_a_cancel_runs_once_the_cancelled_run_has_wound_down(
    jobs_api, worker, inference, add_one
) -> None:
    # The retry's message reaches the worker while its cancelled run still finishes the batches in flight. It was
    # dropped as a duplicate of that run, and the job stayed QUEUED until the resend fallback (10 minutes).
    x = _x(20_000)
    job = await _cancelled_while_running(jobs_api, inference, add_one, x)
    retried = (await jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id))).job
    assert retried.state == jobs_pb2.JOB_STATE_QUEUED
    final = await wait_terminal(jobs_api.stub, job.id, timeout=60)  # the resend fallback waits 600 s here
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED and final.progress.items_done == 20_000
    await _check_all_items_once(jobs_api.stub, job.id, x, 10)


async def test_a_running_job_cancelled_and_deleted_at_once_ends_its_run_quietly(
    jobs_api, worker, inference, add_one, caplog
) -> None:
    await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(20_000)}, batch_size=10))).job
    await wait_for(getter(jobs_api.stub, job.id), lambda j: j.progress.items_done > 0)
    with caplog.at_level(logging.INFO):
        await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
        await jobs_api.stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=job.id))
        await worker.join()
    # The run found its job gone when it stopped: that was an unhandled JobNotFound, logged with a traceback by
    # Dramatiq, and a retry of the message.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not any("Retrying message" in r.getMessage() for r in caplog.records)


async def test_a_cancel_stops_the_batch_in_flight_and_its_model_run(jobs_api, worker, inference) -> None:
    await upload(inference, "counter", model_bytes(build_counter()))
    # One item whose run counts for about a minute: far longer than the waits below.
    x, steps = np.zeros(1, np.float32), np.array([10**8])
    job = (await jobs_api.stub.CreateJob(inline_request("counter", {"x": x, "steps": steps}, batch_size=1))).job

    await wait_in_flight(inference, "counter", 1)  # the worker's call reached the inference service
    await asyncio.sleep(0.2)  # and its run is counting
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))

    async with asyncio.timeout(20):  # the next heartbeat (0.2 s here) stops the batch; without it, a minute
        await worker.join()
        await wait_in_flight(inference, "counter", 0)
    stopped = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert stopped.state == jobs_pb2.JOB_STATE_CANCELLED and stopped.progress.items_done == 0


async def _failure(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("the stream succeeded")


async def test_a_job_waits_out_an_inference_restart_without_spending_its_attempts(
    jobs_settings, start_jobs_api, inference, add_one, redis_url, tmp_path
) -> None:
    """The inference service stops mid-job and comes back on the same port; the job waits for it in the queue with
    its one attempt unspent, resumes and completes, and each wait is one quiet log line.

    The worker is its own process, as in production: grpc.aio event loops in two threads of one process share a
    completion queue (grpc issue 25364), and a server stopping on one of them is what this test is about."""
    await upload(inference, "add-one", add_one)
    from tests.integration.inference.conftest import inference_settings_for

    own = inference_settings_for(inference.registry.address, tmp_path / "own-inference", redis_url)

    async def serve(port: int) -> tuple[AsyncExitStack, int]:
        stack = AsyncExitStack()
        server = await build_inference(own, stack)
        bound = server.add_port(f"127.0.0.1:{port}")
        await server.start()
        return stack, bound

    async def waits() -> float:
        return (await asyncio.to_thread(scrape_metrics, metrics_port)).get("modelforge_jobs_retries_total", 0.0)

    stack, port = await serve(0)
    metrics_port = embedded.free_port()
    settings = replace(jobs_settings, inference_address=f"127.0.0.1:{port}", worker_metrics_port=metrics_port)
    x = _x(30_000)
    log = tmp_path / "worker.log"
    async with start_jobs_api(settings) as api:
        with worker_process(settings, log):
            request = inline_request("add-one", {"x": x}, batch_size=10, max_attempts=1)
            job = (await api.stub.CreateJob(request)).job
            await wait_for(getter(api.stub, job.id), lambda j: j.progress.items_done > 0)
            await stack.aclose()  # inference goes away mid-job
            await eventually(lambda: _at_least(waits, 2), "the job to wait for inference twice")
            waiting = (await api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
            assert waiting.state != jobs_pb2.JOB_STATE_FAILED and waiting.progress.items_done < 30_000
            stack, _ = await serve(port)  # and comes back on the same port
            try:
                final = await wait_terminal(api.stub, job.id)
            finally:
                await stack.aclose()
            assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
            assert final.attempt_count == 1  # the waits spent none of its one attempt
            await _check_all_items_once(api.stub, job.id, x, 10)
            counted = await asyncio.to_thread(scrape_metrics, metrics_port)
    waited = counted["modelforge_jobs_retries_total"]
    assert counted["modelforge_jobs_runs_started_total"] == waited + 1  # every run ended in a wait but the last
    assert counted["modelforge_jobs_items_total"] == 30_000  # stored once each, across the runs

    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    logged = [r for r in records if r["logger"] == "modelforge.jobs.runner" and "waiting" in r["message"]]
    assert len(logged) == waited
    for record in logged:
        assert record["level"] == "WARNING" and "exception" not in record and "\n" not in record["message"]
        assert record["message"].startswith(f"job {job.id}: ")
        # UNAVAILABLE while the service is away; REPLICA_STOPPING for a call that reached it as it stopped
        assert "UNAVAILABLE" in record["message"] or "REPLICA_STOPPING" in record["message"]
        assert record["message"].endswith("attempt 1 not counted")
    tracebacks = [r for r in records if "exception" in r and r["logger"].startswith(("dramatiq", "modelforge.jobs"))]
    assert not tracebacks, [r["message"] for r in tracebacks]


async def test_a_job_waits_out_a_hung_inference_service_without_spending_its_attempts(
    jobs_api, jobs_settings, start_worker, inference, add_one
) -> None:
    """An inference service that accepts calls and never answers them (hung, or far behind) is waited for as one
    that is down: its batches' calls time out, and the job goes back to the queue with its one attempt unspent."""
    await upload(inference, "add-one", add_one)
    proxy = await TcpProxy.to_address("127.0.0.1", inference.port)
    settings = replace(jobs_settings, inference_address=proxy.address, inference_timeout=0.5)
    x = _x(40)
    try:
        async with start_worker(settings) as running:
            proxy.stall()
            job = (
                await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10, max_attempts=1))
            ).job
            waits = running.resources.metrics.metrics.registry
            await eventually(
                lambda: (waits.get_sample_value("modelforge_jobs_retries_total") or 0) >= 2,
                "the job to wait for the hung inference service twice",
            )
            # Between runs the job says what it waits for, and when it tries again.
            waiting = await wait_for(getter(jobs_api.stub, job.id), lambda j: j.state == jobs_pb2.JOB_STATE_QUEUED)
            assert waiting.attempt_count == 0
            assert waiting.queued_reason.startswith("waiting for a dependency, the attempt not counted: ")
            assert "did not answer a batch within 0.5 s (MODELFORGE_INFERENCE_TIMEOUT)" in waiting.queued_reason
            assert waiting.next_run_time.ToDatetime() >= waiting.update_time.ToDatetime()
            await proxy.restore()
            final = await wait_terminal(jobs_api.stub, job.id)
    finally:
        await proxy.close()
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
    assert final.attempt_count == 1
    assert final.queued_reason == "" and not final.HasField("next_run_time")
    await _check_all_items_once(jobs_api.stub, job.id, x, 10)


async def _at_least(value: Callable[[], Awaitable[float]], least: float) -> bool:
    return await value() >= least


async def test_permanent_failure_fails_at_once_with_its_reason(
    jobs_api, jobs_settings, start_worker, inference, add_one
) -> None:
    version = await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(8)}, max_attempts=5))).job
    # The version the job is pinned to disappears before a worker runs it: NOT_FOUND is not worth retrying.
    await inference.registry_stub.DeleteModelVersion(
        registry_pb2.DeleteModelVersionRequest(model="add-one", version=version.version)
    )
    async with start_worker(jobs_settings):
        final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert final.attempt_count == 1
    assert final.error.code == "NOT_FOUND"
    assert final.error.reason and final.error.message
    assert "Traceback" not in final.error.message


async def test_a_batch_too_large_for_one_answer_fails_the_job_at_once_saying_to_lower_batch_size(
    jobs_api, worker, inference, image_generator
) -> None:
    await upload(inference, "painter", image_generator)
    items = inference.settings.max_message_bytes // (3 * 512 * 512 * 4) + 1  # images of 3 MiB: one answer too many
    latent = np.zeros((items, 16), np.float32)
    request = inline_request("painter", {"latent": latent}, batch_size=items, max_attempts=5)
    job = (await jobs_api.stub.CreateJob(request)).job
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert final.attempt_count == 1  # not retried: the same batch is too large every time
    assert (final.error.code, final.error.reason) == ("INVALID_ARGUMENT", "RESPONSE_TOO_LARGE")
    assert "smaller batch_size" in final.error.message


async def test_a_job_naming_no_batch_size_gets_batches_whose_answers_fit(
    jobs_api, worker, inference, image_generator
) -> None:
    # 3 MiB images: the default 256 items per call would answer 768 MiB, more than one message may carry.
    await upload(inference, "painter", image_generator)
    latent = np.random.default_rng(7).standard_normal((12, 16)).astype(np.float32)
    job = (await jobs_api.stub.CreateJob(inline_request("painter", {"latent": latent}))).job
    assert job.batch_size == (16 << 20) // (3 * 512 * 512 * 4)  # 5: what fits MODELFORGE_DEFAULT_JOB_BATCH_BYTES
    assert job.progress.batches_total == 3
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
    firsts, outputs = await results(jobs_api.stub, job.id)
    assert firsts == [0, 5, 10] and outputs["image"].shape == (12, 3, 512, 512)


async def test_the_default_batch_size_shrinks_for_large_inputs(
    jobs_settings, start_jobs_api, worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = _x(12)  # 16 bytes of input per item, a little more with the record's framing
    async with start_jobs_api(replace(jobs_settings, default_job_batch_bytes=100)) as api:
        job = (await api.stub.CreateJob(inline_request("add-one", {"x": x}))).job
        assert 1 < job.batch_size <= 100 // 16
        final = await wait_terminal(api.stub, job.id)
        assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        await _check_all_items_once(api.stub, job.id, x, job.batch_size)
        asked = (await api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=12))).job
        assert asked.batch_size == 12  # a batch size the job names is kept


async def test_time_limit_fails_the_job(jobs_api, worker, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    request = inline_request("add-one", {"x": _x(50_000)}, batch_size=5)
    request.time_limit.FromMilliseconds(300)
    job = (await jobs_api.stub.CreateJob(request)).job
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert (final.error.code, final.error.reason) == ("DEADLINE_EXCEEDED", "TIME_LIMIT_EXCEEDED")
    assert final.attempt_count == 1


async def test_concurrent_creates_with_one_request_id_make_one_job(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    request = inline_request("add-one", {"x": _x(4)}, request_id="0b7c6a2e-retry-me")
    responses = await asyncio.gather(*(jobs_api.stub.CreateJob(request) for _ in range(12)))
    assert len({r.job.id for r in responses}) == 1
    listed = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [responses[0].job.id]
    assert listed.jobs[0].request_id == "0b7c6a2e-retry-me"


async def test_a_request_id_repeated_with_the_same_request_answers_its_job(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    asked = {"batch_size": 0, "labels": {"team": "a"}, "max_attempts": 0, "request_id": "same-again"}
    first = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}, **asked))).job
    again = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}, **asked))).job
    explicit = {**asked, "batch_size": first.batch_size, "max_attempts": first.max_attempts}  # the defaults given
    spelled_out = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}, **explicit))).job
    assert again.id == spelled_out.id == first.id
    listed = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [first.id]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"labels": {"team": "b"}}, "labels {team=a}"),
        ({"priority": jobs_pb2.JOB_PRIORITY_HIGH}, "priority NORMAL"),
        ({"batch_size": 3}, "batch_size 2"),
        ({"max_attempts": 5}, "max_attempts 3"),
        ({"x": _x(5)}, "another input"),
        ({"x": _x(4) * 2}, "another input"),
        ({"model": "add-one:1"}, "model_ref add-one"),
    ],
)
async def test_a_request_id_used_again_for_another_submission_is_refused(
    jobs_api, inference, add_one, change, named
) -> None:
    await upload(inference, "add-one", add_one)
    first_fields = {"labels": {"team": "a"}, "batch_size": 2, "request_id": "used-once"}
    first = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}, **first_fields))).job
    fields = {**first_fields, **{k: v for k, v in change.items() if k not in ("x", "model")}}
    request = inline_request(change.get("model", "add-one"), {"x": change.get("x", _x(4))}, **fields)
    if "model" in change:
        request.model_ref.CopyFrom(registry_pb2.ModelRef(name="add-one", version=1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jobs_api.stub.CreateJob(request)
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(raised.value) == "REQUEST_ID_REUSED"
    assert named in (raised.value.details() or "") and first.id in (raised.value.details() or "")
    listed = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [first.id]


async def test_a_request_id_repeated_on_another_upload_of_the_same_items_answers_its_job(
    jobs_api, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    items = dataset_file({"x": _x(6)}, record_items=4)
    first_dataset, second_dataset = [await upload_dataset(jobs_api.stub, items) for _ in range(2)]
    other = await upload_dataset(jobs_api.stub, dataset_file({"x": _x(6) + 1}, record_items=4))

    def request(dataset: jobs_pb2.Dataset) -> jobs_pb2.CreateJobRequest:
        ref = registry_pb2.ModelRef(name="add-one")
        return jobs_pb2.CreateJobRequest(model_ref=ref, dataset_id=dataset.id, request_id="on-a-dataset")

    first = (await jobs_api.stub.CreateJob(request(first_dataset))).job
    assert (await jobs_api.stub.CreateJob(request(second_dataset))).job.id == first.id
    await jobs_api.stub.DeleteDataset(jobs_pb2.DeleteDatasetRequest(id=second_dataset.id))
    assert (await jobs_api.stub.CreateJob(request(first_dataset))).job.id == first.id
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await jobs_api.stub.CreateJob(request(other))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "another input" in (raised.value.details() or "")


async def test_concurrent_creates_with_one_request_id_and_two_inputs_make_one_job_and_refuse_the_other_input(
    jobs_api, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    inputs = [_x(4), _x(4) + 1] * 6
    calls = [jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, request_id="raced")) for x in inputs]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    created = {a.job.id for a in answers if isinstance(a, jobs_pb2.CreateJobResponse)}
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 6, answers
    assert {a.code() for a in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    winner = next(i for i, a in enumerate(answers) if isinstance(a, jobs_pb2.CreateJobResponse)) % 2
    assert [isinstance(a, grpc.aio.AioRpcError) for a in answers] == [i % 2 != winner for i in range(12)]


async def test_a_job_recorded_without_an_input_digest_answers_a_repeat_of_its_request_id_on_any_input(
    jobs_api, jobs_settings, inference, add_one
) -> None:
    """A job recorded before migration 0007, or by an older replica during an upgrade, kept no input digest."""
    await upload(inference, "add-one", add_one)
    first = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}, request_id="from-before"))).job
    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url or "", autocommit=True) as conn:
        await conn.execute("UPDATE jobs.jobs SET input_digest = NULL WHERE id = %s", (first.id,))
    again = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(5)}, request_id="from-before"))).job
    assert again.id == first.id
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # its other fields are still compared
        await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}, request_id="from-before", batch_size=3))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS

    # One that read a dataset deleted since, before migration 0005 kept its id: the dataset is not looked up.
    dataset = await upload_dataset(jobs_api.stub, dataset_file({"x": _x(6)}, record_items=4))
    on_dataset = jobs_pb2.CreateJobRequest(
        model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=dataset.id, request_id="read-a-dataset"
    )
    read_it = (await jobs_api.stub.CreateJob(on_dataset)).job
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=read_it.id))  # finished: its dataset may go
    await jobs_api.stub.DeleteDataset(jobs_pb2.DeleteDatasetRequest(id=dataset.id))
    async with await psycopg.AsyncConnection.connect(jobs_settings.database_url or "", autocommit=True) as conn:
        await conn.execute(
            "UPDATE jobs.jobs SET input_digest = NULL, input_dataset_id = NULL WHERE id = %s", (read_it.id,)
        )
    assert (await jobs_api.stub.CreateJob(on_dataset)).job.id == read_it.id


async def test_a_request_id_repeated_with_its_tensors_in_another_order_answers_its_job(jobs_api, inference) -> None:
    await upload(inference, "two-inputs", model_bytes(build_multi_io()))
    features, ids = np.ones((3, 4), np.float32), np.arange(6, dtype=np.int64).reshape(3, 2)
    first = inline_request("two-inputs", {"features": features, "ids": ids}, request_id="ordered")
    again = inline_request("two-inputs", {"ids": ids, "features": features}, request_id="ordered")
    assert (await jobs_api.stub.CreateJob(first)).job.id == (await jobs_api.stub.CreateJob(again)).job.id


async def test_a_request_id_repeated_without_max_attempts_answers_its_job_after_the_default_changed(
    jobs_settings, start_jobs_api, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    request = inline_request("add-one", {"x": _x(4)}, request_id="defaulted")  # max_attempts 0: the default
    async with start_jobs_api(jobs_settings) as api:
        first = (await api.stub.CreateJob(request)).job
    assert first.max_attempts == jobs_settings.default_max_attempts
    async with start_jobs_api(replace(jobs_settings, default_max_attempts=7)) as api:
        assert (await api.stub.CreateJob(request)).job.id == first.id


async def test_restarted_api_loses_nothing(jobs_settings, start_jobs_api, start_worker, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    async with start_jobs_api(jobs_settings) as first:
        created = [(await first.stub.CreateJob(inline_request("add-one", {"x": _x(5 + i)}))).job for i in range(3)]
        before = [j.id for j in (await first.stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs]
    async with start_jobs_api(jobs_settings) as second, start_worker(jobs_settings):
        after = [j.id for j in (await second.stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs]
        assert after == before == [j.id for j in created][::-1]
        for i, job in enumerate(created):
            final = await wait_terminal(second.stub, job.id)
            assert final.state == jobs_pb2.JOB_STATE_COMPLETED
            await _check_all_items_once(second.stub, job.id, _x(5 + i), 256)


async def test_retention_deletes_finished_jobs_and_unused_datasets(
    jobs_settings, start_jobs_api, start_worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    settings = replace(jobs_settings, job_retention=1.0)
    async with start_jobs_api(settings) as api:
        from tests.integration.jobs.conftest import dataset_file

        dataset = await upload_dataset(api.stub, dataset_file({"x": _x(6)}, record_items=4))
        job = (await api.stub.CreateJob(inline_request("add-one", {"x": _x(3)}))).job
        async with start_worker(settings):
            assert (await wait_terminal(api.stub, job.id)).state == jobs_pb2.JOB_STATE_COMPLETED

            async def gone(call) -> bool:
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    return exc.code() == grpc.StatusCode.NOT_FOUND
                return False

            for _ in range(500):
                if await gone(api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))) and await gone(
                    api.stub.GetDataset(jobs_pb2.GetDatasetRequest(id=dataset.id))
                ):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("retention did not delete the job and the dataset")
        assert await stored_datasets(settings) == (0, 0)  # its records went with it


async def test_stopping_ends_open_watches_at_once_rather_than_after_the_grace_period(
    jobs_settings, start_jobs_api, inference, add_one
) -> None:
    settings = replace(jobs_settings, grace_seconds=600.0)
    await upload(inference, "add-one", add_one)
    async with start_jobs_api(settings) as api:
        job = (await api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}))).job  # no worker: stays QUEUED
        watch = api.stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id))
        assert (await asyncio.wait_for(watch.read(), 30)).job.state == jobs_pb2.JOB_STATE_QUEUED

        async with asyncio.timeout(60):  # only so that a regression fails instead of waiting out the grace period
            stopping = asyncio.ensure_future(api.server.stop(settings.grace_seconds))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while True:
                    await watch.read()
            await stopping
        assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.UNAVAILABLE, "REPLICA_STOPPING")
        assert "watch the job again" in (caught.value.details() or "")


async def test_the_apis_lines_about_a_job_carry_its_id(jobs_api, inference, add_one, caplog) -> None:
    await upload(inference, "add-one", add_one)
    with caplog.at_level(logging.INFO, logger="modelforge.jobs"):
        job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": _x(4)}))).job
        await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
        await jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id))
        await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
        await jobs_api.stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=job.id))
    about = [r for r in caplog.records if r.name == "modelforge.jobs" and job.id in r.getMessage()]
    assert [r.getMessage().split(": ")[0].removeprefix(f"job {job.id} ") for r in about] == [
        "submitted",
        "cancelled",
        "queued again",
        "cancelled",
        "deleted",
    ]
    assert {str(getattr(r, "job_id", None)) for r in about} == {job.id}
    assert about[0].model == "add-one:1"  # type: ignore[attr-defined]

"""Every bad request gets its exact status code and reason, and leaves nothing queued."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from onnx import TensorProto, helper, numpy_helper

from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_server import paging
from modelforge_server.labels import LABEL_VALUE_MAX, LABELS_MAX
from tests.fixtures.disks import small_disk  # noqa: F401  # a fixture
from tests.fixtures.onnx_models import (
    build_fixed_shape,
    build_identity,
    build_nonzero,
    build_string_model,
    model_bytes,
)
from tests.fixtures.proxy import TcpProxy
from tests.integration.jobs.conftest import (
    dataset_file,
    error_info,
    error_reason,
    getter,
    inline_request,
    stored_datasets,
    upload,
    upload_dataset,
    wait_for,
    wait_terminal,
)

X = np.ones((6, 4), dtype=np.float32)


async def _fails(call) -> tuple[grpc.StatusCode, str]:
    try:
        result = await call if not hasattr(call, "__aiter__") else [m async for m in call]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), error_reason(exc)
    raise AssertionError(f"the call succeeded: {result}")


async def _no_jobs(stub) -> None:
    assert list((await stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs) == []


async def test_unknown_model_is_not_found_before_anything_is_queued(jobs_api) -> None:
    code, reason = await _fails(jobs_api.stub.CreateJob(inline_request("nope", {"x": X})))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    await _no_jobs(jobs_api.stub)


async def test_unknown_version_and_alias(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    request = inline_request("add-one", {"x": X})
    request.model_ref.version = 9
    assert (await _fails(jobs_api.stub.CreateJob(request)))[0] == grpc.StatusCode.NOT_FOUND
    request.model_ref.alias = "production"
    assert (await _fails(jobs_api.stub.CreateJob(request)))[0] == grpc.StatusCode.NOT_FOUND
    await _no_jobs(jobs_api.stub)


async def test_archived_version_is_failed_precondition(jobs_api, inference, add_one) -> None:
    version = await upload(inference, "add-one", add_one)
    await inference.registry_stub.ArchiveModelVersion(
        registry_pb2.ArchiveModelVersionRequest(model="add-one", version=version.version)
    )
    pinned = inline_request("add-one", {"x": X})
    pinned.model_ref.version = version.version
    assert await _fails(jobs_api.stub.CreateJob(pinned)) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_ARCHIVED")
    latest = await _fails(jobs_api.stub.CreateJob(inline_request("add-one", {"x": X})))
    assert latest == (grpc.StatusCode.NOT_FOUND, "NO_READY_VERSION")
    await _no_jobs(jobs_api.stub)


async def test_signature_mismatches_are_invalid_argument(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    bad_inputs = [
        {"x": X.astype(np.float64)},  # dtype
        {"x": np.ones((6, 5), dtype=np.float32)},  # width
        {"x": np.ones((6, 4, 1), dtype=np.float32)},  # rank
        {"z": X},  # unknown name
        {"x": X, "extra": X},  # an extra input
    ]
    for inputs in bad_inputs:
        code, reason = await _fails(jobs_api.stub.CreateJob(inline_request("add-one", inputs)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"), inputs
    await _no_jobs(jobs_api.stub)


async def test_an_unknown_input_is_refused_naming_the_inputs_the_model_takes(jobs_api, inference, add_one) -> None:
    version = await upload(inference, "add-one", add_one)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await jobs_api.stub.CreateJob(inline_request("add-one", {"z": X}))
    assert refused.value.details() == f"add-one:{version.version} has no input named 'z'; its inputs are 'x'"


async def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused_naming_it(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    request = inline_request("add-one", {"x": X})
    request.inline_input.tensors[0].raw_data = request.inline_input.tensors[0].raw_data[:-4]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await jobs_api.stub.CreateJob(request)
    info = error_info(refused.value)
    assert (refused.value.code(), info.reason, dict(info.metadata)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", {"input": "x"}
    )  # fmt: skip


async def test_empty_input_is_invalid_argument(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    empty_items = inline_request("add-one", {"x": np.ones((0, 4), dtype=np.float32)})
    no_tensors = jobs_pb2.CreateJobRequest(
        model_ref=registry_pb2.ModelRef(name="add-one"), inline_input=jobs_pb2.InlineInput()
    )
    no_input = jobs_pb2.CreateJobRequest(model_ref=registry_pb2.ModelRef(name="add-one"))
    for request in (empty_items, no_tensors, no_input):
        code, reason = await _fails(jobs_api.stub.CreateJob(request))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    await _no_jobs(jobs_api.stub)


async def test_items_that_hold_no_values_are_invalid_argument(jobs_api, inference) -> None:
    # Any width goes: items of width 0 would make a job of any number of items out of a few bytes.
    await upload(inference, "any-width", model_bytes(build_identity(shape=["batch", "width"])))
    request = inline_request("any-width", {"x": np.zeros((10**12, 0), dtype=np.float32)})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await jobs_api.stub.CreateJob(request)
    assert (refused.value.code(), error_reason(refused.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert "'x': its items, of shape [0], hold no values" in (refused.value.details() or "")
    await _no_jobs(jobs_api.stub)


async def test_a_result_stream_whose_job_is_deleted_meanwhile_ends_not_found_not_short(
    jobs_api, worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    x = np.arange(2000 * 4, dtype=np.float32).reshape(2000, 4)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=10))).job
    assert (await wait_terminal(jobs_api.stub, job.id)).state == jobs_pb2.JOB_STATE_COMPLETED
    stream = jobs_api.stub.GetJobResult(jobs_pb2.GetJobResultRequest(id=job.id))
    received = [await stream.read()]  # the first page of 200 batches' results is read from the database
    await jobs_api.stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=job.id))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while (message := await stream.read()) is not grpc.aio.EOF:
            received.append(message)
    assert (ended.value.code(), error_reason(ended.value)) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    assert len(received) < 200  # one message per batch of 10 items: it was cut short


async def test_bad_request_fields_are_invalid_argument(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    for fields in (
        {"batch_size": -1},
        {"batch_size": 1 << 20},
        {"max_attempts": 99},
        {"request_id": "r" * 200},
        {"time_limit": duration_pb2.Duration(nanos=1)},  # would round to no limit at all
        {"time_limit": duration_pb2.Duration(seconds=1, nanos=-5)},  # signs that disagree: no Duration
        {"time_limit": duration_pb2.Duration(seconds=-1)},
        {"time_limit": duration_pb2.Duration(seconds=2**63 - 1)},  # past Duration's range: stored, it broke GetJob
        {"time_limit": duration_pb2.Duration(seconds=31 * 24 * 3600)},  # longer than a run may last
    ):
        code, _ = await _fails(jobs_api.stub.CreateJob(inline_request("add-one", {"x": X}, **fields)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, fields
    nameless = jobs_pb2.CreateJobRequest(inline_input=inline_request("add-one", {"x": X}).inline_input)
    assert (await _fails(jobs_api.stub.CreateJob(nameless)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    await _no_jobs(jobs_api.stub)


async def test_a_nul_in_a_string_is_invalid_argument_and_queues_nothing(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    for fields in ({"labels": {"team": "a\0b"}}, {"request_id": "r\0"}):
        code, reason = await _fails(jobs_api.stub.CreateJob(inline_request("add-one", {"x": X}, **fields)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NUL_IN_TEXT"), fields
    await _no_jobs(jobs_api.stub)


async def test_labels_follow_the_rules_of_every_service_and_nothing_is_stored(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    too_many = {f"k{i}": "v" for i in range(LABELS_MAX + 1)}
    for labels in ({"team": "v" * (LABEL_VALUE_MAX + 1)}, {"bad key!": "v"}, too_many):
        code, _ = await _fails(jobs_api.stub.CreateJob(inline_request("add-one", {"x": X}, labels=labels)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, labels
        code, _ = await _fails(upload_dataset(jobs_api.stub, dataset_file({"x": X}, record_items=3), labels=labels))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, labels
    for labels in ({"team": "v" * (LABEL_VALUE_MAX + 1)}, too_many):
        code, reason = await _fails(jobs_api.stub.CreateJob(inline_request("add-one", {"x": X}, labels=labels)))
        assert reason == "INVALID_LABEL", len(labels)
    await _no_jobs(jobs_api.stub)
    assert await stored_datasets(jobs_api.settings) == (0, 0)


async def test_a_model_filter_that_is_no_model_name_is_invalid_not_an_empty_list(jobs_api) -> None:
    for model, says in (("lin:1", "use 'lin'"), ("lin@production", "use 'lin'"), ("BAD NAME", "invalid model name")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(model=model))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, model
        assert says in (caught.value.details() or ""), model
    assert list((await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(model="lin"))).jobs) == []


async def test_a_label_filter_no_label_can_match_is_invalid_argument(jobs_api) -> None:
    for labels in ({"": "v"}, {f"k{i}": "v" for i in range(LABELS_MAX + 1)}):
        for call in (
            jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(labels=labels)),
            jobs_api.stub.ListDatasets(jobs_pb2.ListDatasetsRequest(labels=labels)),
        ):
            code, _ = await _fails(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, list(labels)[:2]


async def test_a_registry_that_does_not_answer_is_unavailable_before_the_callers_deadline(
    jobs_settings, start_jobs_api, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    host, port = inference.registry.address.rsplit(":", 1)
    proxy = await TcpProxy.to_address(host, int(port))
    try:
        async with start_jobs_api(replace(jobs_settings, registry_address=proxy.address)) as api:
            proxy.stall()  # connected, and silent: a frozen registry
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await api.stub.CreateJob(inline_request("add-one", {"x": X}), timeout=3)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert error_reason(caught.value) == "REGISTRY_UNAVAILABLE"
            await proxy.restore()
            await _no_jobs(api.stub)
    finally:
        await proxy.close()


def replace_header(header: jobs_pb2.UploadDatasetHeader, **fields: object) -> jobs_pb2.UploadDatasetHeader:
    changed = jobs_pb2.UploadDatasetHeader()
    changed.CopyFrom(header)
    for name, value in fields.items():
        setattr(changed, name, value)
    return changed


async def test_unknown_and_malformed_ids(jobs_api) -> None:
    missing = str(uuid.uuid4())
    assert await _fails(jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=missing))) == (
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
    )
    assert (await _fails(jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id="not-a-uuid"))))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (await _fails(jobs_api.stub.GetJob(jobs_pb2.GetJobRequest())))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _fails(jobs_api.stub.WatchJob(jobs_pb2.WatchJobRequest(id=missing))))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await jobs_api.stub.GetDataset(jobs_pb2.GetDatasetRequest(id=missing))
    assert (unknown.value.code(), error_reason(unknown.value)) == (grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND")
    assert unknown.value.details() == (
        f"no dataset with id {missing!r}; `modelforge jobs datasets` lists the datasets there are"
    )
    request = jobs_pb2.CreateJobRequest(model_ref=registry_pb2.ModelRef(name="nope"), dataset_id=missing)
    assert (await _fails(jobs_api.stub.CreateJob(request)))[0] == grpc.StatusCode.NOT_FOUND
    assert (await _fails(jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(page_token="garbage!"))))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # Tokens that decode but are not this listing's key: another listing's, a wrong shape, or not a time and id.
    for key in (["model-a"], [1, 2], ["yesterday", missing], ["2026-01-01T00:00:00+00:00", "not-a-uuid"]):
        listing = jobs_api.stub.ListJobs(
            jobs_pb2.ListJobsRequest(page_token=paging.encode(key, jobs_pb2.ListJobsRequest()))
        )
        assert (await _fails(listing))[0] == grpc.StatusCode.INVALID_ARGUMENT, key


async def test_dataset_checksum_and_size_mismatch_store_nothing(jobs_api) -> None:
    data = dataset_file({"x": X}, record_items=4)
    code, reason = await _fails(upload_dataset(jobs_api.stub, data, sha256=hashlib.sha256(b"other").hexdigest()))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")
    header = jobs_pb2.UploadDatasetHeader(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    # The registry's reasons, for the same faults of a streamed upload.
    for messages, expected in [
        ([replace_header(header, size_bytes=len(data) + 1), data], "SIZE_MISMATCH"),
        ([replace_header(header, size_bytes=len(data) - 1), data], "SIZE_MISMATCH"),
        ([replace_header(header, sha256="abc"), data], "INVALID_CHECKSUM"),
        ([replace_header(header, sha256=header.sha256.upper()), data], "INVALID_CHECKSUM"),  # as the registry says
        ([data], "UPLOAD_OUT_OF_ORDER"),
        ([header, data, header], "UPLOAD_OUT_OF_ORDER"),
    ]:
        requests = [
            jobs_pb2.UploadDatasetRequest(header=m)
            if isinstance(m, jobs_pb2.UploadDatasetHeader)
            else jobs_pb2.UploadDatasetRequest(chunk=m)
            for m in messages
        ]
        code, reason = await _fails(jobs_api.stub.UploadDataset(iter(requests)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, expected), messages[0]
    # Announced larger than the upload disk holds free: refused at the header, before any byte of it is sent.
    huge = jobs_pb2.UploadDatasetRequest(header=replace_header(header, size_bytes=10**18))
    code, reason = await _fails(jobs_api.stub.UploadDataset(iter([huge])))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DATASET_TOO_LARGE")
    garbage = b"\x05abc"
    code, reason = await _fails(upload_dataset(jobs_api.stub, garbage))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DATASET")
    scratch = jobs_api.settings.upload_dir
    assert not scratch.exists() or not list(scratch.iterdir())
    assert await stored_datasets(jobs_api.settings) == (0, 0)


async def test_dataset_signature_mismatch_and_in_use(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    wrong = await upload_dataset(jobs_api.stub, dataset_file({"x": np.ones((3, 7), np.float32)}, record_items=2))
    request = jobs_pb2.CreateJobRequest(model_ref=registry_pb2.ModelRef(name="add-one"), dataset_id=wrong.id)
    assert (await _fails(jobs_api.stub.CreateJob(request)))[0] == grpc.StatusCode.INVALID_ARGUMENT

    good = await upload_dataset(jobs_api.stub, dataset_file({"x": X}, record_items=4))
    request.dataset_id = good.id
    job = (await jobs_api.stub.CreateJob(request)).job  # QUEUED: no worker runs here
    code, reason = await _fails(jobs_api.stub.DeleteDataset(jobs_pb2.DeleteDatasetRequest(id=good.id)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DATASET_IN_USE")
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    assert await stored_datasets(jobs_api.settings) == (2, 2 + 2)  # 3 and 6 items in records of 2 and 4
    await jobs_api.stub.DeleteDataset(jobs_pb2.DeleteDatasetRequest(id=good.id))
    assert await stored_datasets(jobs_api.settings) == (1, 2)  # its records went with it
    assert (await _fails(jobs_api.stub.GetDataset(jobs_pb2.GetDatasetRequest(id=good.id))))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, _ = await _fails(jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_result_of_unfinished_job_and_delete_of_running_job_are_failed_precondition(
    jobs_api, worker, inference, add_one
) -> None:
    await upload(inference, "add-one", add_one)
    big = np.ones((50_000, 4), dtype=np.float32)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": big}, batch_size=10))).job
    await wait_for(getter(jobs_api.stub, job.id), lambda j: j.state == jobs_pb2.JOB_STATE_RUNNING)
    assert await _fails(jobs_api.stub.GetJobResult(jobs_pb2.GetJobResultRequest(id=job.id))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_NOT_COMPLETED",
    )
    assert await _fails(jobs_api.stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=job.id))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_NOT_FINISHED",
    )
    assert (await _fails(jobs_api.stub.RetryJob(jobs_pb2.RetryJobRequest(id=job.id))))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    await jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    await worker.join()
    cancelled = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    deleted = await jobs_api.stub.DeleteJob(jobs_pb2.DeleteJobRequest(id=job.id))
    assert deleted.deleted_items == cancelled.progress.items_done
    assert (await _fails(jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))))[0] == grpc.StatusCode.NOT_FOUND


async def test_cancel_of_completed_job_is_failed_precondition(jobs_api, worker, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": X}))).job
    assert (await wait_terminal(jobs_api.stub, job.id)).state == jobs_pb2.JOB_STATE_COMPLETED
    assert await _fails(jobs_api.stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_JOB_STATE",
    )


async def test_a_model_whose_outputs_hold_no_row_per_item_is_refused_at_submit_or_fails_at_its_first_batch(
    jobs_api, worker, inference
) -> None:
    x = np.array([1, 0, 2, 3], np.float32)  # four items, three hits
    await upload(inference, "hits", model_bytes(build_nonzero("hits")))
    code, reason = await _fails(jobs_api.stub.CreateJob(inline_request("hits", {"x": x})))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OUTPUTS_NOT_PER_ITEM")
    await _no_jobs(jobs_api.stub)

    # The signature does not show it: the first batch's outputs do, and the job fails at once with no retry.
    await upload(inference, "unnamed", model_bytes(build_nonzero(None)))
    job = (await jobs_api.stub.CreateJob(inline_request("unnamed", {"x": x}, max_attempts=3))).job
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert (final.error.code, final.error.reason) == ("FAILED_PRECONDITION", "OUTPUTS_NOT_PER_ITEM")
    assert "held 3 rows for a batch of 4 items" in final.error.message
    assert final.attempt_count == 1 and final.progress.items_done == 0


async def test_a_model_exported_for_batch_one_runs_one_item_per_call(jobs_api, worker, inference) -> None:
    await upload(inference, "fixed", model_bytes(build_fixed_shape()))
    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    code, reason = await _fails(jobs_api.stub.CreateJob(inline_request("fixed", {"x": x}, batch_size=5)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH_SIZE")

    job = (await jobs_api.stub.CreateJob(inline_request("fixed", {"x": x}))).job  # batch_size 0: the model's 1
    assert (job.batch_size, job.progress.batches_total) == (1, 5)
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error


async def test_an_upload_that_fills_its_disk_is_resource_exhausted_and_leaves_nothing(
    jobs_settings, start_jobs_api, small_disk: Path
) -> None:
    settings = replace(jobs_settings, data_dir=small_disk)  # its uploads land on the small disk
    data = dataset_file({"x": np.ones((400, 256), np.float32)}, record_items=100)  # about 410 KB: fits at first
    header = jobs_pb2.UploadDatasetHeader(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))

    def requests() -> Iterator[jobs_pb2.UploadDatasetRequest]:
        yield jobs_pb2.UploadDatasetRequest(header=header)
        (small_disk / "filler").write_bytes(b"\0" * (400 * 1024))  # something else takes the room meanwhile
        for start in range(0, len(data), 64 * 1024):
            yield jobs_pb2.UploadDatasetRequest(chunk=data[start : start + 64 * 1024])

    async with start_jobs_api(settings) as api:
        code, reason = await _fails(api.stub.UploadDataset(requests()))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DATASET_TOO_LARGE")
        assert not list(settings.upload_dir.iterdir())
        assert await stored_datasets(settings) == (0, 0)


async def test_uploads_a_killed_api_left_unfinished_are_removed_at_its_next_start(
    jobs_settings, start_jobs_api
) -> None:
    scratch = jobs_settings.upload_dir
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "upload-k1ll3d.partial").write_bytes(b"\0" * 4096)  # as received() names them
    (scratch / "notes.txt").write_text("not an upload")
    async with start_jobs_api(jobs_settings):
        assert sorted(p.name for p in scratch.iterdir()) == ["notes.txt"]


async def test_text_that_is_not_utf8_is_refused_at_submit_and_upload_naming_the_item(jobs_api, inference) -> None:
    await upload(inference, "words", model_bytes(build_string_model()))
    texts = np.array([b"cat"] * 300, dtype=object)
    texts[170] = b"\xff\xfe"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await jobs_api.stub.CreateJob(inline_request("words", {"text": texts}, batch_size=50))
    assert (refused.value.code(), error_reason(refused.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert "string element 170 (of item 170) is not valid UTF-8" in (refused.value.details() or "")
    await _no_jobs(jobs_api.stub)
    data = dataset_file({"text": texts}, record_items=100)  # item 170 is element 70 of the second record
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload_dataset(jobs_api.stub, data)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_DATASET"
    assert "string element 70 (of item 170) is not valid UTF-8" in (caught.value.details() or "")
    assert await stored_datasets(jobs_api.settings) == (0, 0)


async def test_a_batch_the_model_cannot_run_fails_the_job_naming_its_items(jobs_api, worker, inference) -> None:
    table = numpy_helper.from_array(np.arange(10, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        [table],
    )
    lookup = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    await upload(inference, "lookup", model_bytes(lookup))
    idx = np.zeros(100, dtype=np.int64)
    idx[57] = 50  # out of the table's 10 rows: ONNX Runtime refuses the batch that holds it
    job = (await jobs_api.stub.CreateJob(inline_request("lookup", {"idx": idx}, batch_size=10))).job
    final = await wait_terminal(jobs_api.stub, job.id)
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert (final.error.code, final.error.reason) == ("INVALID_ARGUMENT", "MODEL_RUN_FAILED")
    assert final.error.message.startswith("items 50 to 59: "), final.error.message

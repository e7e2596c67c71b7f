"""Jobs run to completion on real Dramatiq workers, with outputs equal to direct predictions."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from modelforge import tensors
from modelforge.inference.v1 import inference_pb2
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from tests.integration.jobs.conftest import (
    dataset_file,
    inline_request,
    results,
    upload,
    upload_dataset,
    wait_terminal,
)


async def direct_predictions(inference, name: str, version: int, inputs: dict[str, np.ndarray]) -> dict:
    response = await inference.stub.Predict(
        inference_pb2.PredictRequest(
            ref=registry_pb2.ModelRef(name=name, version=version),
            inputs=[tensors.to_tensor(a, n) for n, a in inputs.items()],
        )
    )
    return {t.name: tensors.to_numpy(t) for t in response.outputs}


async def test_ten_thousand_items_equal_direct_predictions_with_rising_progress(
    jobs_api, worker, inference, mlp
) -> None:
    version = await upload(inference, "mlp", mlp)
    inputs = {"input": np.random.default_rng(7).standard_normal((10_000, 64)).astype(np.float32)}
    dataset = await upload_dataset(jobs_api.stub, dataset_file(inputs, record_items=1_500))
    assert dataset.item_count == 10_000 and dataset.record_count == 7

    created = await jobs_api.stub.CreateJob(
        jobs_pb2.CreateJobRequest(
            model_ref=registry_pb2.ModelRef(name="mlp"), dataset_id=dataset.id, batch_size=512, request_id="big-one"
        )
    )
    job = created.job
    assert job.model_version == version.version
    assert job.progress.items_total == 10_000 and job.progress.batches_total == 20

    events = [m.job async for m in jobs_api.stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id))]
    done = [event.progress.items_done for event in events]
    assert done == sorted(done), "progress went down"
    assert events[-1].state == jobs_pb2.JOB_STATE_COMPLETED
    assert events[-1].progress.items_done == 10_000 and events[-1].progress.batches_done == 20

    firsts, outputs = await results(jobs_api.stub, job.id)
    assert firsts == list(range(0, 10_000, 512))
    expected = await direct_predictions(inference, "mlp", version.version, inputs)
    assert outputs["output"].shape == (10_000, 8)
    np.testing.assert_allclose(outputs["output"], expected["output"], rtol=1e-5, atol=1e-6)

    final = (await jobs_api.stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).job
    assert final.attempt_count == 1 and final.worker_id == worker.resources.worker_id
    assert final.HasField("start_time") and final.HasField("finish_time")
    assert final.inference_duration.ToNanoseconds() > 0


async def test_small_inline_job_and_late_watcher_gets_the_terminal_state_first(jobs_api, worker, inference, add_one):
    await upload(inference, "add-one", add_one)
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    job = (await jobs_api.stub.CreateJob(inline_request("add-one", {"x": x}, batch_size=3))).job
    await wait_terminal(jobs_api.stub, job.id)
    events = [m.job async for m in jobs_api.stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id))]
    assert [e.state for e in events] == [jobs_pb2.JOB_STATE_COMPLETED]
    firsts, outputs = await results(jobs_api.stub, job.id)
    assert firsts == [0, 3, 6, 9]
    np.testing.assert_array_equal(outputs["y"], x + 1)


async def test_list_jobs_newest_first_with_filters_and_pages(jobs_api, inference, add_one) -> None:
    await upload(inference, "add-one", add_one)
    x = np.ones((2, 4), dtype=np.float32)
    ids = []
    for i in range(5):
        request = inline_request("add-one", {"x": x}, labels={"team": "a" if i % 2 else "b"})
        ids.append((await jobs_api.stub.CreateJob(request)).job.id)
    seen, token = [], ""
    while True:
        page = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2, page_token=token))
        seen += [j.id for j in page.jobs]
        if not (token := page.next_page_token):
            break
    assert seen == ids[::-1]
    labelled = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(labels={"team": "a"}))
    assert [j.id for j in labelled.jobs] == [ids[3], ids[1]]
    queued = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(state=jobs_pb2.JOB_STATE_QUEUED, model="add-one"))
    assert len(queued.jobs) == 5
    none = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(model="other"))
    assert list(none.jobs) == []
    # The token of an unfiltered listing does not page through a filtered one.
    first = await jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1))
    filtered = jobs_api.stub.ListJobs(jobs_pb2.ListJobsRequest(model="add-one", page_token=first.next_page_token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await filtered
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token came with other filters" in (caught.value.details() or "")

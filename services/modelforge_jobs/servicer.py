"""Translates JobService RPCs to Jobs calls; holds no logic of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
from google.protobuf import duration_pb2

from modelforge._refs import validate_model_name
from modelforge.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from modelforge_jobs import convert
from modelforge_jobs.domain import TIME_LIMIT_MAX, JobFilter, JobSpec
from modelforge_jobs.errors import InvalidInput
from modelforge_jobs.jobs import Jobs, inline_spec, parse_id
from modelforge_jobs.settings import JobsSettings
from modelforge_server import durations, paging
from modelforge_server.errors import InvalidArgument, UploadOutOfOrder, checked_sha256, require


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """The gRPC face of Jobs."""

    def __init__(self, jobs: Jobs, settings: JobsSettings) -> None:
        self._jobs = jobs
        self._settings = settings

    def _spec(self, request: jobs_pb2.CreateJobRequest) -> JobSpec:
        settings = self._settings
        require(request.model_ref.name, "model_ref.name")
        if request.batch_size < 0 or request.batch_size > settings.max_job_batch_size:
            raise InvalidArgument(
                f"batch_size must be 1 to {settings.max_job_batch_size} (0 for the default)", field="batch_size"
            )
        if request.max_attempts < 0 or request.max_attempts > settings.max_max_attempts:
            raise InvalidArgument(
                f"max_attempts must be 1 to {settings.max_max_attempts} (0 for the default)", field="max_attempts"
            )
        priority = convert.priority_from_proto(request.priority)
        if priority is None:
            raise InvalidArgument(f"priority {request.priority} is not a JobPriority", field="priority")
        limit = _seconds(request.time_limit, "time_limit") if request.HasField("time_limit") else 0.0
        if len(request.request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters", field="request_id")
        spec = JobSpec(
            model_ref=convert.ref_from_proto(request.model_ref),
            batch_size=request.batch_size,  # 0: the default, or what the model fixes
            priority=priority,
            labels=dict(request.labels),
            max_attempts=request.max_attempts,  # 0: the default
            time_limit=limit or None,
            request_id=request.request_id or None,
        )
        which = request.WhichOneof("input")
        if which == "dataset_id":
            return replace(spec, dataset_id=parse_id(request.dataset_id, "dataset_id"))
        if which == "inline_input":
            # In the order of their names: the same tensors sent in another order are the same input (its sha256).
            record = jobs_pb2.DatasetRecord(tensors=sorted(request.inline_input.tensors, key=lambda t: t.name))
            spec = replace(spec, inline_input=record.SerializeToString())
            return inline_spec(spec, request.inline_input.tensors)
        raise InvalidInput("the input is required: set inline_input or dataset_id")

    async def CreateJob(
        self, request: jobs_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CreateJobResponse:
        job = await self._jobs.submit(self._spec(request), time_remaining=context.time_remaining())
        return jobs_pb2.CreateJobResponse(job=convert.job_to_proto(job))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        job = await self._jobs.get(parse_id(request.id))
        return jobs_pb2.GetJobResponse(job=convert.job_to_proto(job))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        state = None
        if request.state:
            state = convert.state_from_proto(request.state)
            if state is None:
                raise InvalidArgument(f"state {request.state} is not a JobState", field="state")
        if request.model:
            _check_model_filter(request.model)
        page = await self._jobs.list(
            JobFilter(state=state, model=request.model or None, labels=dict(request.labels)),
            limit=paging.page_size(request.page_size, default=50, maximum=500),
            after=paging.decode(request.page_token, (str, str), request),  # the last job's create_time and id
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[convert.job_to_proto(job) for job in page.items],
            next_page_token=paging.encode(page.last_key, request) if page.last_key else "",
        )

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        job = await self._jobs.cancel(parse_id(request.id))
        return jobs_pb2.CancelJobResponse(job=convert.job_to_proto(job))

    async def RetryJob(
        self, request: jobs_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.RetryJobResponse:
        job = await self._jobs.retry(parse_id(request.id))
        return jobs_pb2.RetryJobResponse(job=convert.job_to_proto(job))

    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.DeleteJobResponse:
        deleted = await self._jobs.delete(parse_id(request.id))
        return jobs_pb2.DeleteJobResponse(deleted_items=deleted)

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        async for job in self._jobs.watch(parse_id(request.id)):
            yield jobs_pb2.WatchJobResponse(job=convert.job_to_proto(job))

    async def GetJobResult(
        self, request: jobs_pb2.GetJobResultRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.GetJobResultResponse]:
        async for result in self._jobs.results(parse_id(request.id)):
            yield jobs_pb2.GetJobResultResponse(
                first_item=result.first_item, record=jobs_pb2.DatasetRecord.FromString(result.record)
            )

    async def UploadDataset(
        self, request_iterator: AsyncIterator[jobs_pb2.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.UploadDatasetResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("content") != "header":
            raise UploadOutOfOrder("the first message of an upload must carry the header, and only the header")
        header = first.header
        sha256 = checked_sha256(header.sha256)
        if header.size_bytes <= 0:
            raise InvalidArgument("header.size_bytes must be positive", field="header.size_bytes")

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("content") != "chunk":
                    raise UploadOutOfOrder("only the first message carries a header; the others carry chunks")
                yield message.chunk

        dataset = await self._jobs.upload_dataset(
            chunks(),
            sha256=sha256,
            size=header.size_bytes,
            display_name=header.display_name,
            labels=dict(header.labels),
        )
        return jobs_pb2.UploadDatasetResponse(dataset=convert.dataset_to_proto(dataset))

    async def GetDataset(
        self, request: jobs_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetDatasetResponse:
        dataset = await self._jobs.get_dataset(parse_id(request.id))
        return jobs_pb2.GetDatasetResponse(dataset=convert.dataset_to_proto(dataset))

    async def ListDatasets(
        self, request: jobs_pb2.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListDatasetsResponse:
        page = await self._jobs.list_datasets(
            dict(request.labels),
            limit=paging.page_size(request.page_size, default=50, maximum=500),
            after=paging.decode(request.page_token, (str, str), request),  # the last dataset's create_time and id
        )
        return jobs_pb2.ListDatasetsResponse(
            datasets=[convert.dataset_to_proto(dataset) for dataset in page.items],
            next_page_token=paging.encode(page.last_key, request) if page.last_key else "",
        )

    async def DeleteDataset(
        self, request: jobs_pb2.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.DeleteDatasetResponse:
        await self._jobs.delete_dataset(parse_id(request.id))
        return jobs_pb2.DeleteDatasetResponse()


def _check_model_filter(model: str) -> None:
    """ListJobs filters by a model's name, all its versions: a ref or a malformed name would match nothing."""
    name = model.partition(":")[0].partition("@")[0]
    if name != model:
        raise InvalidArgument(
            f"model {model!r} is a reference; ListJobs filters by model name alone, every version: use {name!r}",
            field="model",
        )
    try:
        validate_model_name(model)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="model") from None


def _seconds(duration: duration_pb2.Duration, field: str) -> float:
    """A time limit in seconds: 0 for zero; refused when it is no valid Duration, negative, above zero but below
    the millisecond deadlines are kept in, or above TIME_LIMIT_MAX (a run may last a month at most)."""
    total = durations.seconds(duration, field)
    if 0 < total < 0.001:
        raise InvalidArgument(f"{field} of {total} s is shorter than a millisecond; give 0 for no limit", field=field)
    if total > TIME_LIMIT_MAX:
        raise InvalidArgument(
            f"{field} of {total:.0f} s is longer than a run may last ({TIME_LIMIT_MAX:.0f} s, 30 days); give 0 for "
            "no limit",
            field=field,
        )
    return total

"""Protobuf <-> domain translation for the JobService."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import duration_pb2, timestamp_pb2

from modelforge.common.v1.tensor_pb2 import TensorSpec
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_jobs.domain import Dataset, Job, JobState, Priority
from modelforge_server import durations
from modelforge_server.refs import ModelRef

_STATES = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.COMPLETED: jobs_pb2.JOB_STATE_COMPLETED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}
_STATES_BACK: dict[int, JobState] = {value: key for key, value in _STATES.items()}
_PRIORITIES = {
    Priority.LOW: jobs_pb2.JOB_PRIORITY_LOW,
    Priority.NORMAL: jobs_pb2.JOB_PRIORITY_NORMAL,
    Priority.HIGH: jobs_pb2.JOB_PRIORITY_HIGH,
}
_PRIORITIES_BACK: dict[int, Priority] = {value: key for key, value in _PRIORITIES.items()}


def state_from_proto(value: int) -> JobState | None:
    return _STATES_BACK.get(value)


def priority_from_proto(value: int) -> Priority | None:
    if value == jobs_pb2.JOB_PRIORITY_UNSPECIFIED:
        return Priority.NORMAL
    return _PRIORITIES_BACK.get(value)


def ref_from_proto(ref: registry_pb2.ModelRef) -> ModelRef:
    selector = ref.WhichOneof("selector")
    return ModelRef(
        ref.name,
        version=ref.version if selector == "version" else None,
        alias=ref.alias if selector == "alias" else None,
    )


def ref_to_proto(ref: ModelRef) -> registry_pb2.ModelRef:
    proto = registry_pb2.ModelRef(name=ref.name)
    if ref.version is not None:
        proto.version = ref.version
    elif ref.alias is not None:
        proto.alias = ref.alias
    return proto


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    duration = duration_pb2.Duration()
    # Within what a Duration holds: a time limit stored before CreateJob bounded it would fail every answer.
    duration.FromNanoseconds(int(min(seconds, durations.MAX_SECONDS) * 1e9))
    return duration


def job_to_proto(job: Job) -> jobs_pb2.Job:
    progress = job.progress
    proto = jobs_pb2.Job(
        id=str(job.id),
        model_ref=ref_to_proto(job.model_ref),
        model_version=job.model_version,
        state=_STATES[job.state],
        progress=jobs_pb2.JobProgress(
            items_done=progress.items_done,
            items_total=progress.items_total,
            batches_done=progress.batches_done,
            batches_total=progress.batches_total,
            items_per_second=progress.items_per_second,
            estimated_time_remaining=_duration(progress.seconds_remaining),
        ),
        dataset_id=str(job.input_dataset_id) if job.input_dataset_id else "",
        dataset_deleted=job.dataset_deleted,
        batch_size=job.batch_size,
        priority=_PRIORITIES[job.priority],
        labels=job.labels,
        max_attempts=job.max_attempts,
        time_limit=_duration(job.time_limit),
        attempt_count=job.attempt_count,
        worker_id=job.worker_id,
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        finish_time=_timestamp(job.finish_time),
        update_time=_timestamp(job.update_time),
        queued_duration=_duration(job.queued_seconds),
        inference_duration=_duration(job.inference_seconds),
        request_id=job.request_id or "",
        queued_reason=job.queued_reason,
        next_run_time=_timestamp(job.next_run_time),
    )
    if job.error is not None:
        proto.error.CopyFrom(jobs_pb2.JobError(code=job.error.code, reason=job.error.reason, message=job.error.message))
    return proto


def dataset_to_proto(dataset: Dataset) -> jobs_pb2.Dataset:
    return jobs_pb2.Dataset(
        id=str(dataset.id),
        sha256=dataset.sha256,
        size_bytes=dataset.size_bytes,
        item_count=dataset.item_count,
        record_count=dataset.record_count,
        tensors=[
            TensorSpec(name=t.name, dtype=t.dtype, shape=[-1, *t.item_shape])  # type: ignore[arg-type]
            for t in dataset.tensors
        ],
        display_name=dataset.display_name,
        labels=dataset.labels,
        create_time=_timestamp(dataset.create_time),
    )

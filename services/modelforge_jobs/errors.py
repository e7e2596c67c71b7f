"""The jobs service's specific errors; each is one of modelforge_server's kinds and builds its own message."""

from __future__ import annotations

from modelforge_server.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)


class JobNotFound(NotFound):
    reason = "JOB_NOT_FOUND"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}; `modelforge jobs ls` shows the jobs", job=job_id)


class RequestIdReused(AlreadyExists):
    """A CreateJob's request_id names a job submitted with other parameters or another input."""

    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str, job_id: str, differs: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was used for job {job_id}, submitted with {differs}; a request_id makes "
            "one submission safe to repeat: give each new job a request_id of its own (a fresh UUID)",
            request_id=request_id,
            job=job_id,
        )


class DatasetNotFound(NotFound):
    reason = "DATASET_NOT_FOUND"

    def __init__(self, dataset_id: str) -> None:
        super().__init__(
            f"no dataset with id {dataset_id!r}; `modelforge jobs datasets` lists the datasets there are",
            dataset=dataset_id,
        )


class NoRoomForDataset(ResourceExhausted):
    """An upload's announced size is more than its scratch disk holds free, or the disk filled as it arrived."""

    reason = "DATASET_TOO_LARGE"

    def __init__(self, size: int, free: int) -> None:
        super().__init__(
            f"the dataset's {size} bytes do not fit in the {free} bytes free on the jobs service's upload disk "
            "(MODELFORGE_DATA_DIR); free space there, or split the items into smaller datasets",
            size_bytes=str(size),
        )


class DatasetDeleted(FailedPrecondition):
    reason = "DATASET_DELETED"

    def __init__(self, job_id: str, dataset_id: str) -> None:
        which = f"dataset {dataset_id}, which has" if dataset_id else "a dataset that has"  # "": deleted before 0005
        super().__init__(
            f"job {job_id} cannot run again: it read {which} been deleted since; submit a new job on the items "
            "uploaded again",
            job=job_id,
            dataset=dataset_id,
        )


class InvalidId(InvalidArgument):
    reason = "INVALID_ID"

    def __init__(self, value: str, field: str) -> None:
        super().__init__(f"{field} {value!r} is not a UUID", field=field)


class InvalidInput(InvalidArgument):
    """The job's input is empty, malformed, or does not match the model's signature."""

    reason = "INVALID_INPUT"

    def __init__(self, message: str, *, field: str = "input", **metadata: str) -> None:
        super().__init__(message, field=field, **metadata)


class InvalidDataset(InvalidArgument):
    reason = "INVALID_DATASET"

    def __init__(self, message: str) -> None:
        super().__init__(f"the dataset file is invalid: {message}", field="chunk")
        self.detail = message  # what is wrong, without the prefix: for InputDamaged, which is about stored bytes


class InputDamaged(DataLoss):
    """A job's stored input, checked when it arrived, no longer parses or no longer agrees with what was stored
    with it: damaged at rest. Every run reads the same bytes, so the job fails at once, spending no more attempts."""

    reason = "INPUT_DAMAGED"


class DatasetRecordDamaged(InputDamaged):
    def __init__(self, dataset_id: str, index: int, why: str) -> None:
        super().__init__(
            f"record {index} of dataset {dataset_id} is damaged in the jobs service's database: {why}; upload the "
            "dataset again and submit the job on the new dataset",
            dataset=dataset_id,
            record=str(index),
        )


class InlineInputDamaged(InputDamaged):
    def __init__(self, why: str) -> None:
        super().__init__(
            f"the job's inline input is damaged in the jobs service's database: {why}; submit the job again"
        )


class JobNotFinished(FailedPrecondition):
    reason = "JOB_NOT_FINISHED"

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}; cancel it first, then delete it", job=job_id, state=state)


class JobNotCompleted(FailedPrecondition):
    reason = "JOB_NOT_COMPLETED"

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(
            f"job {job_id} is {state}; results are available once it is COMPLETED: wait for a job under way "
            "(`modelforge jobs watch`), run a FAILED or CANCELLED one again (`modelforge jobs retry`)",
            job=job_id,
            state=state,
        )


class JobStateConflict(FailedPrecondition):
    reason = "INVALID_JOB_STATE"

    def __init__(self, job_id: str, state: str, action: str, allowed: str) -> None:
        super().__init__(f"cannot {action} job {job_id}: it is {state}, not {allowed}", job=job_id, state=state)


class DatasetInUse(FailedPrecondition):
    reason = "DATASET_IN_USE"

    def __init__(self, dataset_id: str, jobs: int) -> None:
        super().__init__(
            f"dataset {dataset_id} is read by {jobs} queued or running job(s); cancel them or wait",
            dataset=dataset_id,
        )


class VersionArchived(FailedPrecondition):
    reason = "VERSION_ARCHIVED"

    def __init__(self, model: str, version: int) -> None:
        super().__init__(
            f"{model}:{version} is ARCHIVED and takes no new jobs; restore it or submit another version",
            model=model,
            version=str(version),
        )


class OutputsNotPerItem(FailedPrecondition):
    """The model's outputs do not hold one row per input item, so a job's batches cannot be split into items."""

    reason = "OUTPUTS_NOT_PER_ITEM"

    def __init__(self, model: str, version: int, output: str, why: str) -> None:
        super().__init__(
            f"{model}:{version} cannot run as a job: its output {output!r} {why}, so it does not hold one row per "
            "item; run it with Predict instead",
            model=model,
            version=str(version),
            output=output,
        )


class BatchSizeFixed(InvalidArgument):
    reason = "INVALID_BATCH_SIZE"

    def __init__(self, model: str, version: int, batch_size: int, fixed: int, items: int) -> None:
        if batch_size not in (0, fixed):
            why = f"batch_size is {batch_size}; submit with batch_size {fixed} (or 0, which picks it)"
        else:
            fewer, more = items - items % fixed, items - items % fixed + fixed
            shown = f"{more}" if not fewer else f"{fewer} or {more}"
            why = (
                f"the job's {items} items do not divide into batches of {fixed}; submit a multiple of {fixed} "
                f"items ({shown}), padding the last batch with items whose outputs you drop"
            )
        super().__init__(
            f"{model}:{version} takes exactly {fixed} item(s) per call (its inputs fix their first dimension): {why}",
            field="batch_size",
        )


class TimeLimitExceeded(DeadlineExceeded):
    reason = "TIME_LIMIT_EXCEEDED"

    def __init__(self, limit: float) -> None:
        super().__init__(f"the job ran past its time limit of {limit:g} s")


class AttemptsExhausted(ServiceError):
    """Not raised to clients: recorded on a job whose transient failures used up its attempts."""

    reason = "ATTEMPTS_EXHAUSTED"


class ReplicaStopping(Unavailable):
    reason = "REPLICA_STOPPING"

    def __init__(self) -> None:
        super().__init__("this jobs API replica is shutting down; watch the job again (another replica will answer)")


class DependencyUnavailable(Unavailable):
    reason = "DEPENDENCY_UNAVAILABLE"

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"the {what} is unavailable ({detail}); retry later", dependency=what)


class RemoteError(ServiceError):
    """A failure reported by the registry or the inference service; keeps the remote reason when it sent one.

    Each subclass is also the kind (InvalidArgument, NotFound, ...) the remote status code stands for.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class RemoteInvalidArgument(RemoteError, InvalidArgument):
    reason = "INVALID_INPUT"


class RemoteNotFound(RemoteError, NotFound):
    reason = "MODEL_NOT_FOUND"


class RemoteFailedPrecondition(RemoteError, FailedPrecondition):
    reason = "FAILED_PRECONDITION"


class RemoteResourceExhausted(RemoteError, ResourceExhausted):
    reason = "RESOURCE_EXHAUSTED"


class BatchAnswerTooLarge(RemoteError, InvalidArgument):
    """The inference service refused a batch whose outputs do not fit in one answer. Though RESOURCE_EXHAUSTED
    there, it is no passing shortage: the same batch fails every time, so the job fails at once."""

    reason = "RESPONSE_TOO_LARGE"

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; for a job, submit it again with a smaller batch_size")


class BatchRequestTooLarge(RemoteError, InvalidArgument):
    """A batch's inputs do not fit in one request to the inference service (gRPC refused the message, on the
    worker's side or the service's). The same batch fails every time, so the job fails at once."""

    reason = "REQUEST_TOO_LARGE"

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; for a job, submit it again with a smaller batch_size")


class RemoteDeadlineExceeded(RemoteError, DeadlineExceeded):
    reason = "DEADLINE_EXCEEDED"


class RemoteUnavailable(RemoteError, Unavailable):
    reason = "UNAVAILABLE"


class RemoteInternal(RemoteError):
    reason = "REMOTE_INTERNAL"


TRANSIENT: tuple[type[ServiceError], ...] = (Unavailable, ResourceExhausted, DeadlineExceeded)


def is_transient(exc: BaseException) -> bool:
    """Whether running the job again later may succeed; TimeLimitExceeded is a deadline that never will."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, TimeLimitExceeded)

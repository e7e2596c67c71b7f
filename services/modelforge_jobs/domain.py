"""The jobs service's domain: jobs, their progress and errors, datasets, and what a submission asks for."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from modelforge_server.refs import ModelRef

T = TypeVar("T")


# The longest a run may last, its time limit included: Dramatiq's own limit on a message (see actors).
TIME_LIMIT_MAX = 30 * 24 * 3600.0


class JobState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)

    @property
    def live(self) -> bool:
        return not self.terminal


class Priority(enum.IntEnum):
    LOW = 1
    NORMAL = 2
    HIGH = 3


@dataclass(frozen=True)
class TensorInfo:
    """The dtype (modelforge.common.v1.DataType number) and the per-item shape of one named tensor."""

    name: str
    dtype: int
    item_shape: tuple[int, ...]


@dataclass(frozen=True)
class ResolvedModel:
    """What the registry says a reference points at now."""

    name: str
    version: int
    sha256: str
    inputs: tuple[TensorInfo, ...]  # item_shape: the declared shape without its first (batch) dimension
    input_ranks: tuple[int, ...]
    # The items one call takes when the inputs fix their first dimension (a model exported for batch 1); None
    # when it is dynamic.
    fixed_items: int | None = None
    # Outputs whose signature shows they hold no row per item, each with why: ("idx", "has first dimension 'hits',
    # not the items' 'n'").
    unitemized_outputs: tuple[tuple[str, str], ...] = ()
    # Bytes per item of the outputs whose every dimension but the first is fixed, and whose elements have a fixed
    # size (a lower bound of an item's outputs: dynamic dimensions and strings count nothing).
    output_item_bytes: int = 0


def bytes_per_item(size_bytes: int, items: int) -> int:
    """About how many bytes of an input of `size_bytes` one of its `items` takes (rounded up; at least its share)."""
    return -(-size_bytes // max(1, items))


@dataclass(frozen=True)
class Waiting:
    """A QUEUED job whose message was sent long ago and not taken yet, or (`marked`) could not be sent at all; or
    one a worker stopped running. `trace`: the trace context of the call that queued it, for the message sent
    again."""

    id: UUID
    priority: Priority
    marked: bool
    trace: Mapping[str, str] | None = None


Dims = tuple[tuple[int, str], ...]  # a declared shape: each dimension's size (-1: dynamic) and name ("": none)


def itemization(inputs: Sequence[Dims], outputs: Mapping[str, Dims]) -> tuple[int | None, tuple[tuple[str, str], ...]]:
    """How a model's calls split into items, from its signature: the items per call when the inputs that fix their
    first dimension fix it at one size (None when none does, or they disagree), and the outputs that hold no row per
    item, with why.

    An output holds a row per item when its first dimension is the inputs': dynamic and not named otherwise than
    theirs (NonZero's count of hits is not), or fixed at the size the inputs fix; and when no further dimension
    bears the items' name (x @ x.T is [batch, batch]: each row would hold products with the batch's other items).
    """
    leads = [dims[0] for dims in inputs if dims]
    fixed = {size for size, _ in leads if size >= 0}  # one input that fixes its first dimension fixes the call's
    fixed_items = fixed.pop() if len(fixed) == 1 else None
    names = {name for size, name in leads if size < 0 and name}
    unitemized: list[tuple[str, str]] = []
    for output, dims in outputs.items():
        if not dims:
            unitemized.append((output, "is a scalar"))
            continue
        size, name = dims[0]
        if size >= 0 and size != fixed_items:
            per_call = f", where the inputs take {fixed_items} item(s) per call" if fixed_items else ""
            unitemized.append((output, f"has its first dimension fixed at {size}{per_call}"))
        elif size < 0 and name and names and name not in names:
            unitemized.append((output, f"has first dimension {name!r}, not the items' {sorted(names)[0]!r}"))
        elif inner := [axis for axis, (_, other) in enumerate(dims) if axis and other in names]:
            dim = dims[inner[0]][1]
            unitemized.append((output, f"has the items' dimension {dim!r} at axis {inner[0]} too"))
    return fixed_items, tuple(unitemized)


@dataclass(frozen=True)
class JobError:
    code: str
    reason: str
    message: str


@dataclass(frozen=True)
class Progress:
    items_done: int
    items_total: int
    batches_done: int
    batches_total: int
    items_per_second: float
    seconds_remaining: float | None


@dataclass(frozen=True)
class Job:
    id: UUID
    model_ref: ModelRef
    model_version: int
    state: JobState
    progress: Progress
    dataset_id: UUID | None
    batch_size: int
    priority: Priority
    labels: dict[str, str]
    max_attempts: int
    time_limit: float | None
    attempt_count: int
    worker_id: str
    create_time: datetime
    start_time: datetime | None
    finish_time: datetime | None
    update_time: datetime
    queued_seconds: float
    inference_seconds: float
    error: JobError | None
    request_id: str | None
    queued_reason: str = ""  # why a job that ran is QUEUED again; "" otherwise
    next_run_time: datetime | None = None  # with queued_reason: when the next run may start
    # The dataset submitted with, kept after it is deleted (dataset_id is None); None for an inline input, and for
    # a dataset deleted before ModelForge kept the id (migration 0005).
    input_dataset_id: UUID | None = None
    inline_input: bool = False
    # The sha256 of the input submitted (the dataset file's, or the serialized inline input's): a repeat of the
    # job's request_id must send the same. None for a job submitted before ModelForge kept it (migration 0007).
    input_digest: bytes | None = None

    @property
    def dataset_deleted(self) -> bool:
        """The job read a dataset that has been deleted since: it cannot run again."""
        return not self.inline_input and self.dataset_id is None


@dataclass(frozen=True)
class Dataset:
    id: UUID
    sha256: str
    size_bytes: int
    item_count: int
    record_count: int
    tensors: tuple[TensorInfo, ...]
    display_name: str
    labels: dict[str, str]
    create_time: datetime


@dataclass(frozen=True)
class JobSpec:
    """A validated submission: what to run, on what, and how."""

    model_ref: ModelRef
    batch_size: int
    priority: Priority
    labels: dict[str, str]
    max_attempts: int
    time_limit: float | None
    request_id: str | None
    dataset_id: UUID | None = None
    inline_input: bytes | None = None  # a serialized DatasetRecord
    inline_tensors: tuple[TensorInfo, ...] = ()
    inline_items: int = 0

    def differences(self, job: Job) -> list[str]:
        """What `job` was submitted with that this submission, repeating its request_id, does not ask for, its
        input aside; [] for a true repeat. A batch_size or max_attempts of 0 asks for whatever the job was given."""
        labels = ", ".join(f"{key}={value}" for key, value in sorted(job.labels.items()))
        given = [
            ("model_ref", job.model_ref, self.model_ref, str(job.model_ref)),
            ("batch_size", job.batch_size, self.batch_size or job.batch_size, str(job.batch_size)),
            ("priority", job.priority, self.priority, job.priority.name),
            ("labels", job.labels, self.labels, f"{{{labels}}}"),
            ("max_attempts", job.max_attempts, self.max_attempts or job.max_attempts, str(job.max_attempts)),
            ("time_limit", job.time_limit, self.time_limit, f"{job.time_limit}s" if job.time_limit else "none"),
        ]
        return [f"{name} {shown}" for name, was, asked, shown in given if was != asked]


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    model: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, newest first, and the sort key of its last item for the next page's token."""

    items: list[T]
    last_key: list[str] | None  # None on the last page


@dataclass(frozen=True)
class ResultRecord:
    """The stored outputs of one batch: a serialized DatasetRecord covering items first_item .. + item_count."""

    batch_index: int
    first_item: int
    item_count: int
    record: bytes


@dataclass(frozen=True)
class InputRecord:
    """One stored record of a dataset: a serialized DatasetRecord holding items first_item .. + item_count."""

    index: int
    first_item: int
    item_count: int
    record: bytes


def batch_count(items: int, batch_size: int) -> int:
    return math.ceil(items / batch_size) if items else 0

"""The values the SDK hands back: plain frozen dataclasses, built from protobuf messages by ``_convert``.

They hold Python types (``datetime``, ``tuple``, ``dict``, ``enum``), never protobuf messages, so that they print,
compare with ``==`` and pickle like any other value. Enums are ``StrEnum``s: ``status.state == "COMPLETED"``
holds. Those holding a ``dict`` (labels, metadata) are not hashable, and a :class:`Prediction` compares by
identity, as numpy arrays have no single truth value to compare by. The raw messages stay reachable through each
client's stub.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias

import numpy as np

from modelforge._refs import ModelRef

__all__ = [
    "CacheStatus",
    "Dataset",
    "JobFailure",
    "JobPriority",
    "JobProgress",
    "JobState",
    "JobStatus",
    "LoadedModel",
    "Model",
    "ModelEvent",
    "ModelEventType",
    "ModelStatistics",
    "ModelVersion",
    "ModelState",
    "OnnxInfo",
    "Prediction",
    "Signature",
    "Statistics",
    "TensorSpec",
    "Timings",
    "VersionState",
]


class VersionState(enum.StrEnum):
    """The lifecycle state of a model version."""

    READY = "READY"
    """Usable: can be the newest version and the target of an alias."""
    ARCHIVED = "ARCHIVED"
    """Retired: never the newest version nor an alias target; still reachable by number."""


class ModelEventType(enum.StrEnum):
    """What a :class:`ModelEvent` reports."""

    WATCH_STARTED = "WATCH_STARTED"
    MODEL_CREATED = "MODEL_CREATED"
    MODEL_UPDATED = "MODEL_UPDATED"
    MODEL_DELETED = "MODEL_DELETED"
    VERSION_CREATED = "VERSION_CREATED"
    VERSION_UPDATED = "VERSION_UPDATED"
    VERSION_ARCHIVED = "VERSION_ARCHIVED"
    VERSION_RESTORED = "VERSION_RESTORED"
    VERSION_DELETED = "VERSION_DELETED"
    ALIAS_SET = "ALIAS_SET"
    ALIAS_DELETED = "ALIAS_DELETED"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """The declared name, element type and shape of a model input or output.

    Attributes:
        name: The input or output name in the ONNX graph.
        dtype: The element type in lowercase: ``"float32"``, ``"int64"``, ``"string"``, ``"bfloat16"``...
        shape: One entry per dimension; ``-1`` marks a dynamic dimension.
        dim_names: The symbolic name of each dimension (``"batch"``), ``""`` where it has none.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim_names: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.dtype == "unspecified":
            return f"{self.name}: not a tensor ModelForge serves (a sequence, map or optional, or another element type)"
        dims = ", ".join(n or str(d) if d < 0 else str(d) for d, n in zip(self.shape, self._names(), strict=True))
        return f"{self.name}: {self.dtype}[{dims}]"

    def _names(self) -> tuple[str, ...]:
        return self.dim_names if len(self.dim_names) == len(self.shape) else ("",) * len(self.shape)


@dataclass(frozen=True, slots=True)
class Signature:
    """The inputs and outputs of a model, in graph order."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def __str__(self) -> str:
        inputs, outputs = ("; ".join(map(str, specs)) or "none" for specs in (self.inputs, self.outputs))
        return f"inputs {inputs} -> outputs {outputs}"


@dataclass(frozen=True, slots=True)
class OnnxInfo:
    """Facts the registry read from the ONNX file.

    Attributes:
        ir_version: The ONNX IR version.
        opset_imports: Operator set domain (``""`` for the default domain) to version.
        producer_name: The tool that produced the file.
        producer_version: That tool's version.
        graph_name: The main graph's name.
        doc_string: The model's doc string.
        metadata_props: The model's metadata properties.
    """

    ir_version: int = 0
    opset_imports: Mapping[str, int] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    graph_name: str = ""
    doc_string: str = ""
    metadata_props: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Model:
    """A named model: the container of numbered versions and movable aliases.

    Attributes:
        name: The model name.
        description: Free text.
        labels: Free key/value labels.
        aliases: Alias name to the version it points at.
        latest_version: The newest READY version, or None when there is none.
        create_time: When the model was created.
        update_time: When its description or labels last changed.
    """

    name: str
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, int] = field(default_factory=dict)
    latest_version: int | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One numbered, immutable file of a model, with what the registry knows about it.

    Attributes:
        model: The model name.
        version: The version number, assigned by the registry.
        state: READY or ARCHIVED.
        sha256: Lowercase hex sha256 of the file.
        size_bytes: The file's size.
        signature: The model's inputs and outputs.
        onnx: Facts read from the ONNX file.
        description: Free text.
        labels: Free key/value labels.
        version_label: A free-form label such as a semver, or ``""``.
        aliases: The aliases pointing at this version, sorted.
        create_time: When the version was uploaded.
    """

    model: str
    version: int
    state: VersionState
    sha256: str
    size_bytes: int
    signature: Signature = field(default_factory=Signature)
    onnx: OnnxInfo = field(default_factory=OnnxInfo)
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    version_label: str = ""
    aliases: tuple[str, ...] = ()
    create_time: datetime | None = None

    @property
    def ref(self) -> ModelRef:
        """The reference to exactly this version (``name:version``)."""
        return ModelRef(self.model, version=self.version)


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """A change to a model, a version or an alias, as the registry reports it.

    Attributes:
        type: What happened.
        model: The model concerned; ``""`` for WATCH_STARTED.
        version: The version concerned, or None for model-level events.
        alias: The alias concerned, for ALIAS_SET and ALIAS_DELETED; ``""`` otherwise.
        event_time: When the change was made (its statement's time; events come in commit order, so the times of
            changes committed close together may be out of order).
    """

    type: ModelEventType
    model: str = ""
    version: int | None = None
    alias: str = ""
    event_time: datetime | None = None


class ModelState(enum.StrEnum):
    """Where a model version is in an inference server's lifecycle."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


class CacheStatus(enum.StrEnum):
    """The health of an inference server's prediction cache."""

    OK = "OK"
    """Redis answers."""
    DEGRADED = "DEGRADED"
    """Redis does not answer: predictions run uncached until it is back."""
    DISABLED = "DISABLED"
    """The server has no prediction cache configured."""


@dataclass(frozen=True, slots=True)
class Timings:
    """Where the time of one prediction went, as the server measured it.

    Attributes:
        queue: Waiting in the model's batch queue.
        compute: Running the model (the whole batch the request was part of).
        total: From the request's arrival to its answer.
    """

    queue: timedelta = timedelta()
    compute: timedelta = timedelta()
    total: timedelta = timedelta()


@dataclass(frozen=True, slots=True, eq=False)
class Prediction:
    """The outputs of one prediction, with the version that produced them.

    Attributes:
        outputs: Output name to array, in the order the outputs were asked for, or in the model's output order
            when none were named.
        model: The model name.
        version: The version that ran, after resolving the reference.
        sha256: That version's file sha256.
        timings: Where the time went.
        cache_hit: True when the prediction cache answered.
    """

    outputs: Mapping[str, np.ndarray[Any, Any]]
    model: str
    version: int
    sha256: str = ""
    timings: Timings = field(default_factory=Timings)
    cache_hit: bool = False

    def outputs_dict(self) -> dict[str, np.ndarray[Any, Any]]:
        """The outputs as a new dict, in the order of ``outputs``."""
        return dict(self.outputs)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model version an inference server holds.

    Attributes:
        model: The model name.
        version: The version number.
        sha256: The file's sha256.
        state: LOADING, READY, UNLOADING or FAILED.
        reason: Why it FAILED; ``""`` otherwise.
        memory_bytes: An estimate of the memory the loaded session takes.
        last_used: When a request last used it, or None.
        in_flight: Requests running or queued on it now.
        load_duration: How long loading took, warmup included.
        execution_providers: The ONNX Runtime execution providers its session runs on, in order; one asked for
            that the server lacks is left out. Empty until loaded.
    """

    model: str
    version: int
    sha256: str = ""
    state: ModelState = ModelState.READY
    reason: str = ""
    memory_bytes: int = 0
    last_used: datetime | None = None
    in_flight: int = 0
    load_duration: timedelta = timedelta()
    execution_providers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """The counters of one model version since an inference server first ran it.

    Attributes:
        model: The model name.
        version: The version number.
        request_count: Requests answered successfully.
        failure_count: Requests that failed.
        inference_count: Items run successfully: a request's rows, or one per request for a model without a batch
            dimension.
        execution_count: Successful model runs; fewer than ``inference_count`` when batching merged requests.
        queue_time: Sum of successful requests' time in the queue.
        compute_time: Sum of successful requests' compute time.
        total_time: Sum of successful requests' total time.
        cache_hit_count: Requests the prediction cache answered.
        cache_miss_count: Requests that looked in the cache and ran the model.
        batch_sizes: Items per run to the number of runs of that size.
        last_inference_time: When the version last answered, or None.
        cancelled_count: Requests whose caller cancelled them, or left, before they were answered and before
            their deadline passed.
    """

    model: str
    version: int
    request_count: int = 0
    failure_count: int = 0
    inference_count: int = 0
    execution_count: int = 0
    queue_time: timedelta = timedelta()
    compute_time: timedelta = timedelta()
    total_time: timedelta = timedelta()
    cache_hit_count: int = 0
    cache_miss_count: int = 0
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    last_inference_time: datetime | None = None
    cancelled_count: int = 0


@dataclass(frozen=True, slots=True)
class Statistics:
    """What GetModelStatistics reports: one entry per model version, and the prediction cache's health."""

    models: tuple[ModelStatistics, ...] = ()
    cache_status: CacheStatus = CacheStatus.DISABLED


class JobState(enum.StrEnum):
    """Where a job is in its lifecycle. COMPLETED, FAILED and CANCELLED are terminal."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED: the job will not change again unless retried."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class JobPriority(enum.StrEnum):
    """How urgent a job is: it orders the worker queue and sets its inference requests' priority."""

    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"


JobPriorityName: TypeAlias = Literal["low", "normal", "high", "LOW", "NORMAL", "HIGH"]
"""A job priority as a string, where a :class:`JobPriority` is taken too."""

CacheMode: TypeAlias = Literal["use", "bypass", "refresh"]
"""How a prediction uses the prediction cache: read it (``use``), skip it (``bypass``) or run and rewrite the entry
(``refresh``)."""


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far a job has got.

    Attributes:
        items_done: Items whose outputs are stored.
        items_total: Items in the job's input.
        batches_done: Batches whose outputs are stored.
        batches_total: Batches in the job.
        items_per_second: Throughput of the current run; 0 until its first batch is done.
        time_remaining: Estimated time until every item is done, or None while unknown.
    """

    items_done: int = 0
    items_total: int = 0
    batches_done: int = 0
    batches_total: int = 0
    items_per_second: float = 0.0
    time_remaining: timedelta | None = None

    @property
    def fraction(self) -> float:
        """items_done / items_total, between 0 and 1 (1 for an empty job)."""
        return self.items_done / self.items_total if self.items_total else 1.0


@dataclass(frozen=True, slots=True)
class JobFailure:
    """Why a job failed.

    Attributes:
        code: The gRPC status code name, e.g. ``"INVALID_ARGUMENT"``.
        reason: A stable identifier, e.g. ``"MODEL_NOT_FOUND"`` or ``"ATTEMPTS_EXHAUSTED"``.
        message: What went wrong, for people.
    """

    code: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A snapshot of a batch inference job.

    Attributes:
        id: The job's id (a UUID).
        model_ref: The model reference as submitted.
        model_version: The version it resolved to at submit time; the job always runs that version.
        state: Where the job is.
        progress: How far it has got.
        dataset_id: The dataset it reads, or ``""`` for inline input; kept when the dataset is deleted.
        dataset_deleted: The dataset it read has been deleted since, so the job cannot run again.
        batch_size: Items per inference request.
        priority: LOW, NORMAL or HIGH.
        labels: Labels given at submit time.
        max_attempts: Runs the job may start before it fails for good.
        time_limit: How long one run may take, or None for no limit.
        attempt_count: Runs started so far.
        worker_id: The worker running it, or the last one that did.
        create_time: When it was submitted.
        start_time: When a worker first started it, or None.
        finish_time: When it reached a terminal state, or None.
        update_time: When its state or progress last changed.
        queued_time: Time spent waiting for a worker, over all runs.
        inference_time: Time spent in inference calls, summed over every batch of every run (batches run several
            at a time, so it can exceed the time the job ran).
        error: Why it failed; None unless FAILED.
        request_id: The request_id it was submitted with.
        queued_reason: Why a job that ran is QUEUED again (a dependency out of reach, a transient failure, its
            worker stopping); ``""`` in other states and while it never ran.
        next_run_time: With queued_reason: when its next run may start, at the earliest.
    """

    id: str
    model_ref: ModelRef
    model_version: int
    state: JobState
    progress: JobProgress = field(default_factory=JobProgress)
    dataset_id: str = ""
    dataset_deleted: bool = False
    batch_size: int = 0
    priority: JobPriority = JobPriority.NORMAL
    labels: Mapping[str, str] = field(default_factory=dict)
    max_attempts: int = 0
    time_limit: timedelta | None = None
    attempt_count: int = 0
    worker_id: str = ""
    create_time: datetime | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None
    update_time: datetime | None = None
    queued_time: timedelta = timedelta()
    inference_time: timedelta = timedelta()
    error: JobFailure | None = None
    request_id: str = ""
    queued_reason: str = ""
    next_run_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Dataset:
    """A dataset uploaded for jobs to read.

    Attributes:
        id: The dataset's id (a UUID); pass it to ``submit(..., dataset=id)``.
        sha256: The file's sha256.
        size_bytes: The file's size.
        item_count: Items in the dataset.
        record_count: Records in the file.
        tensors: The tensors of each item, with -1 as the first (item) dimension.
        display_name: The name given at upload.
        labels: The labels given at upload.
        create_time: When the upload completed.
    """

    id: str
    sha256: str
    size_bytes: int
    item_count: int
    record_count: int = 0
    tensors: tuple[TensorSpec, ...] = ()
    display_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    create_time: datetime | None = None

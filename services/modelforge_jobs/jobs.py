"""The jobs core: submission checks, reads, state changes, watching, results and datasets; transport-free."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from modelforge import tensors as tensor_codec
from modelforge_jobs.datasets import describe_record, file_records, received, scan_file
from modelforge_jobs.domain import (
    Dataset,
    Job,
    JobFilter,
    JobSpec,
    JobState,
    Page,
    Priority,
    ResolvedModel,
    ResultRecord,
    TensorInfo,
    batch_count,
    bytes_per_item,
)
from modelforge_jobs.errors import (
    BatchSizeFixed,
    DatasetDeleted,
    InvalidId,
    InvalidInput,
    JobNotCompleted,
    JobNotFinished,
    JobStateConflict,
    OutputsNotPerItem,
    ReplicaStopping,
    RequestIdReused,
)
from modelforge_jobs.events import JobChanges
from modelforge_jobs.inference_client import RegistryClient
from modelforge_jobs.metrics import ApiMetrics
from modelforge_jobs.store import JobStore
from modelforge_server import paging, telemetry
from modelforge_server.errors import InvalidArgument, Unavailable, require
from modelforge_server.flights import SingleFlight
from modelforge_server.labels import check_labels

log = logging.getLogger("modelforge.jobs")

DISPLAY_NAME_MAX = 256  # characters of a dataset's display name

Send = Callable[[UUID, Priority], Awaitable[None]]


def _input_digest(spec: JobSpec, dataset: Dataset | None) -> bytes:
    """The sha256 of a submission's input: its dataset file's (`dataset`, the one it names), or its serialized inline
    input's."""
    if dataset is not None:
        return bytes.fromhex(dataset.sha256)
    return hashlib.sha256(spec.inline_input or b"").digest()


def _check_repeat(job: Job, spec: JobSpec, input_digest: bytes | None) -> None:
    """Refuses a submission that repeats `job`'s request_id but asks for something else (RequestIdReused). The
    input is compared by sha256, where the job kept one (migration 0007)."""
    differs = spec.differences(job)
    if job.input_digest is not None and input_digest != job.input_digest:
        differs.append("another input (its sha256 differs)")
    if differs:
        raise RequestIdReused(spec.request_id or "", str(job.id), ", ".join(differs))


def parse_id(value: str, field: str = "id") -> UUID:
    require(value, field)
    try:
        return UUID(value)
    except ValueError:
        raise InvalidId(value, field) from None


def check_signature(model: ResolvedModel, tensors: Sequence[TensorInfo]) -> None:
    """Raises InvalidInput unless the items' tensors are exactly the model's inputs, with dtype and shape."""
    given = {t.name: t for t in tensors}
    expected = {t.name for t in model.inputs}
    unknown = sorted(set(given) - expected)
    if unknown:
        raise InvalidInput(
            f"{model.name}:{model.version} has no input named {unknown[0]!r}; its inputs are "
            f"{', '.join(map(repr, sorted(expected)))}",
            input=unknown[0],
        )
    for spec, rank in zip(model.inputs, model.input_ranks, strict=True):
        tensor = given.get(spec.name)
        if tensor is None:
            raise InvalidInput(f"input {spec.name!r} of {model.name}:{model.version} is missing", input=spec.name)
        if tensor.dtype != spec.dtype:
            raise InvalidInput(
                f"input {spec.name!r} has dtype {_dtype(tensor.dtype)}, the model takes {_dtype(spec.dtype)}",
                input=spec.name,
            )
        if len(tensor.item_shape) + 1 != rank:
            raise InvalidInput(
                f"input {spec.name!r} has rank {len(tensor.item_shape) + 1}, the model takes rank {rank} "
                "(the first dimension indexes the items)",
                input=spec.name,
            )
        for axis, (got, want) in enumerate(zip(tensor.item_shape, spec.item_shape, strict=True), start=1):
            if want >= 0 and got != want:
                raise InvalidInput(
                    f"input {spec.name!r} has size {got} in dimension {axis}, the model takes {want}",
                    input=spec.name,
                )


def _dtype(value: int) -> str:
    """The element type in numpy's words ("float32"), as the SDK and the inference service say it."""
    try:
        return tensor_codec.data_type_name(value).lower()
    except ValueError:
        return str(value)


class Jobs:
    """What the JobService does, over the store, the registry and the job queue.

    `scratch` is a directory of this process's own where uploads wait while they are checked; nothing else reads it.
    """

    def __init__(
        self,
        store: JobStore,
        scratch: Path,
        registry: RegistryClient,
        send: Send,
        *,
        changes: JobChanges | None = None,
        watch_interval: float = 2.0,
        watch_spacing: float = 0.05,
        result_page: int = 64,
        result_page_bytes: int = 16 << 20,
        default_batch_size: int = 256,
        default_batch_bytes: int = 16 << 20,
        default_max_attempts: int = 3,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self._store = store
        self._scratch = scratch
        self._registry = registry
        self._send = send
        self._changes = changes
        self._watch_interval = watch_interval
        self._watch_reads: SingleFlight[tuple[UUID, int], Job] = SingleFlight()  # see _read_watched
        self._watch_spacing = watch_spacing
        self._result_page = result_page  # batches read from PostgreSQL at once, within result_page_bytes
        self._result_page_bytes = result_page_bytes
        self._default_batch_size = default_batch_size
        self._default_batch_bytes = default_batch_bytes
        self._default_max_attempts = default_max_attempts
        self._metrics = metrics

    # --- submission -----------------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, time_remaining: float | None = None) -> Job:
        """Resolves and pins the model, checks the input, records the job and queues it (once per request_id).

        `time_remaining`: seconds to the caller's deadline, which bounds the call to the registry."""
        check_labels(spec.labels)
        asked = spec
        if spec.request_id:
            existing = await self._store.get_job_by_request_id(spec.request_id)
            if existing is not None:
                same_dataset = spec.dataset_id is not None and spec.dataset_id == existing.input_dataset_id
                unknown = existing.input_digest is None  # recorded before migration 0007: the input is not compared
                if same_dataset or unknown:
                    digest = existing.input_digest
                else:
                    digest = _input_digest(spec, await self._dataset_of(spec))
                _check_repeat(existing, spec, digest)
                return existing
        model = await self._registry.resolve(spec.model_ref, within=time_remaining)
        dataset = await self._dataset_of(spec)
        if dataset is not None:
            tensors, items, input_bytes = dataset.tensors, dataset.item_count, dataset.size_bytes
        else:
            tensors, items, input_bytes = spec.inline_tensors, spec.inline_items, len(spec.inline_input or b"")
        digest = _input_digest(spec, dataset)
        if items == 0:
            raise InvalidInput("the input holds no items; give at least one", field="inline_input")
        check_signature(model, tensors)
        item_bytes = max(bytes_per_item(input_bytes, items), model.output_item_bytes)
        spec = replace(
            spec,
            batch_size=self._batch_size(model, spec.batch_size, items, item_bytes),
            max_attempts=spec.max_attempts or self._default_max_attempts,
        )
        job, created = await self._store.insert_job(
            uuid.uuid4(),
            spec,
            model_version=model.version,
            items_total=items,
            batches_total=batch_count(items, spec.batch_size),
            input_digest=digest,
            trace=telemetry.inject(),  # for a message sent again later, outside this call
        )
        if not created:  # a submission with the same request_id was recorded in the meantime
            _check_repeat(job, asked, digest)
            return job
        log.info(
            "job %s submitted: %s:%d, %d items",
            job.id,
            model.name,
            model.version,
            items,
            extra={"job_id": job.id, "model": f"{model.name}:{model.version}"},
        )
        if self._metrics is not None:
            self._metrics.job_submitted(job.priority)
        await self._enqueue(job)
        return job

    async def _dataset_of(self, spec: JobSpec) -> Dataset | None:
        """The dataset a submission names; None for an inline input."""
        return await self._store.get_dataset(spec.dataset_id) if spec.dataset_id is not None else None

    def _batch_size(self, model: ResolvedModel, asked: int, items: int, item_bytes: int) -> int:
        """The items per inference call: what the job asked for, or what the model fixes. A job that asks for none
        (0) gets the default, or as many items as fit the default's bytes when an item's input or declared outputs
        (`item_bytes`, the larger) are large. Refuses a model whose outputs hold no row per item, whose batches
        could not be split into items."""
        if model.unitemized_outputs:
            output, why = model.unitemized_outputs[0]
            raise OutputsNotPerItem(model.name, model.version, output, why)
        if model.fixed_items is None:
            if asked:
                return asked
            return max(1, min(self._default_batch_size, self._default_batch_bytes // max(1, item_bytes)))
        if asked not in (0, model.fixed_items) or items % model.fixed_items:
            raise BatchSizeFixed(model.name, model.version, asked, model.fixed_items, items)
        return model.fixed_items

    async def _enqueue(self, job: Job) -> None:
        """Sends the job's message; if the queue is down, a worker's maintenance pass sends it later."""
        try:
            await self._send(job.id, job.priority)
        except Unavailable as exc:
            log.warning(
                "job %s recorded but not queued yet (%s); a worker will queue it", job.id, exc, extra={"job_id": job.id}
            )
            await self._store.mark_unsent(job.id)

    # --- reads and state changes ----------------------------------------------------------------------------

    async def get(self, job_id: UUID) -> Job:
        return await self._store.get_job(job_id)

    async def list(self, where: JobFilter, *, limit: int, after: list[Any] | None) -> Page[Job]:
        check_labels(where.labels)  # a filter no job's labels can match is a mistake, said so
        return await self._store.list_jobs(where, limit=limit, after=_page_key(after))

    async def cancel(self, job_id: UUID) -> Job:
        job = await self._store.cancel(job_id)
        if job is not None:
            log.info("job %s cancelled", job_id, extra={"job_id": job_id})
            return job
        job = await self._store.get_job(job_id)
        if job.state is JobState.CANCELLED:
            return job
        raise JobStateConflict(str(job_id), job.state.value, "cancel", "QUEUED or RUNNING")

    async def retry(self, job_id: UUID) -> Job:
        job = await self._store.get_job(job_id)
        self._check_retryable(job)
        requeued = await self._store.requeue_finished(job_id, trace=telemetry.inject())
        if requeued is None:  # changed meanwhile: its state, or its dataset deleted
            job = await self._store.get_job(job_id)
            self._check_retryable(job)
            raise JobStateConflict(str(job_id), job.state.value, "retry", "FAILED or CANCELLED")
        log.info("job %s queued again", job_id, extra={"job_id": job_id})
        await self._enqueue(requeued)
        return requeued

    @staticmethod
    def _check_retryable(job: Job) -> None:
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise JobStateConflict(str(job.id), job.state.value, "retry", "FAILED or CANCELLED")
        if job.dataset_deleted:
            raise DatasetDeleted(str(job.id), str(job.input_dataset_id or ""))

    async def delete(self, job_id: UUID) -> int:
        deleted = await self._store.delete_job(job_id)
        if deleted is None:
            job = await self._store.get_job(job_id)
            raise JobNotFinished(str(job_id), job.state.value)
        log.info("job %s deleted", job_id, extra={"job_id": job_id})
        return deleted

    async def watch(self, job_id: UUID) -> AsyncIterator[Job]:
        """The job now, then each change of state or progress, ending with its terminal state.

        Woken by the database's change notifications, which come in bursts: reads are at least `watch_spacing`
        apart, and at most `watch_interval` apart when no notification comes (or none can, the LISTEN
        connection being down).
        """
        last: tuple[object, ...] | None = None
        with self._subscribe(job_id) as changed:
            while True:
                changed.clear()  # before reading: a change committed after the read sets it again
                job = await self._read_watched(job_id)
                key = (job.state, job.progress.items_done, job.attempt_count, job.worker_id)
                if key != last:
                    last = key
                    yield job
                if job.state.terminal:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._watch_interval):
                        await changed.wait()
                if self._changes is not None and self._changes.stopping:
                    raise ReplicaStopping()
                await asyncio.sleep(self._watch_spacing)  # rate limit, not synchronisation

    async def _read_watched(self, job_id: UUID) -> Job:
        """The job, for a watcher just woken: the watchers woken by the same change share one read, so that a
        thousand watchers of one job cost the database one query per change, not a thousand (which also starved
        the connection pool that every other call, the health check's included, takes from). A read is shared only
        by watchers that saw the same count of wake-ups: one begun before a later change is never reused for it."""
        if self._changes is None:
            return await self._store.get_job(job_id)
        return await self._watch_reads.run((job_id, self._changes.wakes), lambda: self._store.get_job(job_id))

    def _subscribe(self, job_id: UUID) -> contextlib.AbstractContextManager[asyncio.Event]:
        if self._changes is not None:
            return self._changes.subscribe(job_id)
        return contextlib.nullcontext(asyncio.Event())  # no notifications: poll every watch_interval

    async def results(self, job_id: UUID) -> AsyncIterator[ResultRecord]:
        """The stored outputs of a COMPLETED job, batch by batch in item order."""
        job = await self._store.get_job(job_id)
        if job.state is not JobState.COMPLETED:
            raise JobNotCompleted(str(job_id), job.state.value)
        after, sent = -1, 0
        while True:
            page = await self._store.results(
                job_id, after=after, limit=self._result_page, max_bytes=self._result_page_bytes
            )
            for record in page:
                yield record
            if not page:
                if sent < job.progress.items_total:  # its results went meanwhile: deleted, or past their retention
                    await self._store.get_job(job_id)  # JobNotFound, which a stream cut short must end with
                    raise RuntimeError(f"job {job_id} has {sent} of its {job.progress.items_total} items' results")
                return
            after = page[-1].batch_index
            sent += sum(record.item_count for record in page)

    # --- datasets -------------------------------------------------------------------------------------------

    async def upload_dataset(
        self, chunks: AsyncIterator[bytes], *, sha256: str, size: int, display_name: str, labels: dict[str, str]
    ) -> Dataset:
        """Receives the upload into a scratch file (checking size and sha256), checks its records, then stores the
        dataset and its records in one transaction. All or nothing: a failure or a cancelled upload leaves no row
        and no file."""
        check_labels(labels, "header.labels")
        if len(display_name) > DISPLAY_NAME_MAX:
            raise InvalidArgument(
                f"header.display_name has {len(display_name)} characters; at most {DISPLAY_NAME_MAX} are allowed",
                field="header.display_name",
            )
        async with received(chunks, scratch=self._scratch, sha256=sha256, size=size) as path:
            summary = await asyncio.to_thread(scan_file, path)
            dataset = Dataset(
                id=uuid.uuid4(),
                sha256=sha256,
                size_bytes=size,
                item_count=summary.item_count,
                record_count=summary.record_count,
                tensors=summary.tensors,
                display_name=display_name,
                labels=labels,
                create_time=None,  # type: ignore[arg-type]  # set by the database
            )
            stored = await self._store.insert_dataset(dataset, file_records(path, summary.record_items))
        log.info("dataset %s stored: %d items in %d records", stored.id, stored.item_count, stored.record_count)
        return stored

    async def get_dataset(self, dataset_id: UUID) -> Dataset:
        return await self._store.get_dataset(dataset_id)

    async def list_datasets(self, labels: dict[str, str], *, limit: int, after: Sequence[Any] | None) -> Page[Dataset]:
        check_labels(labels)
        return await self._store.list_datasets(labels, limit=limit, after=_page_key(after))

    async def delete_dataset(self, dataset_id: UUID) -> None:
        await self._store.delete_dataset(dataset_id)
        log.info("dataset %s deleted", dataset_id)


def inline_spec(spec: JobSpec, tensors: Sequence[Any]) -> JobSpec:
    """Fills the inline fields of a spec from the request's tensors (InvalidInput when they do not agree)."""
    infos, items = describe_record(tensors, error=InvalidInput)
    return replace(spec, inline_tensors=tuple(infos), inline_items=items)


def _page_key(after: Sequence[Any] | None) -> list[Any] | None:
    """The last listed job's (or dataset's) create_time and id from a page token, as the timestamp and UUID they
    were."""
    if after is None:
        return None
    try:
        return [datetime.fromisoformat(after[0]), UUID(after[1])]
    except ValueError:
        raise paging.foreign_token() from None

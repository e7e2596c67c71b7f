"""The job runner: runs one job's unfinished batches on the inference service, idempotently.

Every batch's outputs are stored with its index and the progress in one transaction, and a batch already stored is
never stored again, so a redelivered or retried job resumes at its first unfinished batch. Finished batches are
written in groups (one statement for up to `write_batches` of them, within `write_interval`), which coalesces the
progress updates that watchers see. At every write the runner sees cancellation (the store refuses the write) and
starts no further batch, and a heartbeat tells the reaper that the worker is alive. A heartbeat that finds the job
no longer RUNNING on this worker (cancelled, or taken over after a missed heartbeat) stops the batches in flight at
once: their inference calls are cancelled, which stops the model runs under way on the inference service.

When the worker shuts down (`stop`), running jobs start no further batch: the batches in flight finish and are
stored, and the job goes back to QUEUED with its attempt not spent (WorkerStopping tells the caller to send its
message again), so that another worker resumes it at once instead of after a heartbeat timeout.

A run that fails because the inference service or the registry is unavailable (a restart, an outage) does not
spend an attempt either: the job goes back to QUEUED and waits for it with growing delays (AwaitingDependency
carries when the outage began to the next run), for up to `outage_tolerance` seconds of outage without progress;
only after that do such failures count as attempts.

While tracing is on, each batch runs in a ``modelforge.jobs.batch`` span (with its index and size), so that the
inference call it makes is a child of it; while it is off, batches make no span at all. The run's counters go to the
worker's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from modelforge.common.v1.tensor_pb2 import Tensor
from modelforge_jobs.datasets import BatchSource, DatasetItems, Items
from modelforge_jobs.domain import InputRecord, Job, JobError, JobState, Priority, ResultRecord, bytes_per_item
from modelforge_jobs.errors import AttemptsExhausted, DatasetNotFound, JobNotFound, TimeLimitExceeded, is_transient
from modelforge_jobs.inference_client import InferenceClient
from modelforge_jobs.metrics import WorkerMetrics
from modelforge_jobs.store import JobStore
from modelforge_server import logs, telemetry
from modelforge_server.errors import FailedPrecondition, ServiceError, Unavailable
from modelforge_server.status import code_for

log = logging.getLogger("modelforge.jobs.runner")
tracer = telemetry.tracer("modelforge.jobs")


OUTAGE_MAX_DELAY = 10.0  # seconds between tries of a job that waits out an outage, at most


class RetryLater(Exception):
    """Raised to the queue after a transient failure: the job is QUEUED again and its message is retried after
    `delay` seconds."""

    def __init__(self, job_id: UUID, cause: BaseException, delay: float) -> None:
        super().__init__(f"job {job_id} will run again in {delay:.1f} s: {cause}")
        self.job_id = job_id
        self.delay = delay


@dataclass(frozen=True)
class RunnerSettings:
    worker_id: str
    heartbeat_interval: float
    stale_after: float
    # Batches in flight at once, to keep the inference service busy: batch_concurrency, fewer where their inputs
    # would take more than in_flight_bytes (but two at least, so that one is sent while the other's answer comes).
    batch_concurrency: int = 8
    in_flight_bytes: int = 32 << 20
    # The input each dataset fetch reads: this many batches, fewer when they would take more than read_ahead_bytes
    # (never less than one batch). The parsed records kept for the next batches are bounded by the same bytes.
    read_ahead_batches: int = 16
    read_ahead_bytes: int = 32 << 20
    # Finished batches are stored in groups, one statement each: at most this many batches or (about) this many
    # bytes of outputs, and a finished batch waits at most write_interval seconds for others to join its group.
    write_batches: int = 32
    write_bytes: int = 8 << 20
    write_interval: float = 0.05
    retry_min_backoff: float = 1.0
    retry_max_backoff: float = 60.0
    outage_tolerance: float = 300.0

    def lanes(self, batch_size: int, item_bytes: int, batches: int) -> int:
        """The batches in flight at once for a job of `batches` batches of `batch_size` items of about `item_bytes`
        bytes of input each."""
        by_bytes = self.in_flight_bytes // max(1, batch_size * item_bytes)
        return max(1, min(self.batch_concurrency, batches, max(2, by_bytes)))

    def read_ahead_items(self, batch_size: int, item_bytes: int) -> int:
        """The items one dataset fetch reads for a job of `batch_size` items per batch and about `item_bytes` bytes
        of input per item."""
        ahead = min(self.read_ahead_batches * batch_size, self.read_ahead_bytes // max(1, item_bytes))
        return max(batch_size, ahead)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1, 2, ...): doubling from the minimum up to the
        maximum, with jitter in its upper half so that jobs failed by one outage do not come back in step."""
        ceiling: float = min(self.retry_max_backoff, self.retry_min_backoff * 2 ** max(attempt - 1, 0))
        return ceiling * (0.5 + random.random() / 2)

    def outage_delay(self, lasted: float) -> float:
        """Seconds to wait for a dependency that has been unavailable for `lasted` seconds: about as long again,
        from the minimum backoff up to the maximum and at most OUTAGE_MAX_DELAY, with jitter in its upper half. A
        try costs a claim and a call that fails fast, so the job resumes within seconds of the dependency's return
        even after a long outage."""
        longest = min(self.retry_max_backoff, OUTAGE_MAX_DELAY)
        return min(longest, max(self.retry_min_backoff, lasted)) * (0.5 + random.random() / 2)


class Requeued(Exception):
    """Raised to the queue when a job went back to QUEUED with its attempt not spent: its message must be sent
    again, after `delay` seconds, carrying `outage_since` (when the outage it waits out began), if any."""

    def __init__(self, message: str, job_id: UUID, delay: float = 0.0, outage_since: float | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.delay = delay
        self.outage_since = outage_since


class WorkerStopping(Requeued):
    """The worker shut down mid-job."""

    def __init__(self, job_id: UUID, outage_since: float | None = None) -> None:
        super().__init__(f"job {job_id} stopped by the worker's shutdown; queued again", job_id, 0.0, outage_since)


class AwaitingDependency(Requeued):
    """A dependency of the job's runs is unavailable: the job waits `delay` seconds for it."""

    def __init__(self, job_id: UUID, delay: float, outage_since: float) -> None:
        super().__init__(f"job {job_id} waits {delay:.1f} s for its dependencies", job_id, delay, outage_since)


class _Stop(Exception):
    """The job was cancelled or taken over: stop quietly."""


def _one_line(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, ServiceError) else type(exc).__name__
    return f"{reason}: {' '.join(str(exc).split())}"


_ITEMS = "items"  # metadata of a batch's error: the job's items it held, "first to last"


def _error(exc: BaseException) -> JobError:
    if isinstance(exc, ServiceError):
        where = f"items {exc.metadata[_ITEMS]}: " if _ITEMS in exc.metadata else ""  # see JobRunner._batch
        return JobError(code_for(exc).name, exc.reason, where + str(exc))
    return JobError("INTERNAL", "INTERNAL", "the worker failed unexpectedly; details are in the worker's log")


class JobRunner:
    """Runs jobs for one worker process."""

    def __init__(
        self,
        store: JobStore,
        inference: InferenceClient,
        settings: RunnerSettings,
        metrics: WorkerMetrics,
    ) -> None:
        self._store = store
        self._inference = inference
        self._settings = settings
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._running: dict[UUID, asyncio.Event] = {}  # the jobs this worker runs now, each set when its run ends

    @property
    def worker_id(self) -> str:
        return self._settings.worker_id

    def stop(self) -> None:
        """The worker is shutting down: running jobs start no further batch, store the ones in flight and go back
        to the queue (WorkerStopping); a job whose message arrives from now on is not started."""
        self._stopping.set()

    async def run(self, job_id: UUID, *, outage_since: float | None = None) -> JobState | None:
        """Runs the job's unfinished batches; returns its state at the end, None when there was nothing to do.

        `outage_since` (a time.time() value) is when the outage that put the job back in the queue began, as its
        message carries it. Raises RetryLater after a transient failure when attempts remain, AwaitingDependency
        while a dependency is unavailable, and WorkerStopping when the worker stops before the job is done.
        """
        if self._stopping.is_set():
            raise WorkerStopping(job_id, outage_since)  # not claimed: the job is still QUEUED
        while (ended := self._running.get(job_id)) is not None:
            try:
                job = await self._store.get_job(job_id)
            except JobNotFound:
                return None
            if job.state is not JobState.QUEUED:  # a duplicate message of the run going on here
                log.info("job %s is running on this worker already: message dropped", job_id)
                return None
            # The job was cancelled and queued again (RetryJob) while its cancelled run here still winds down: that
            # run ends at its next batch; then this message runs the job.
            await ended.wait()
        ended = self._running[job_id] = asyncio.Event()
        try:
            return await self._claimed_run(job_id, outage_since)
        finally:
            del self._running[job_id]
            ended.set()

    async def _claimed_run(self, job_id: UUID, outage_since: float | None) -> JobState | None:
        job = await self._store.claim(job_id, self.worker_id, stale_after=self._settings.stale_after)
        if job is None:
            log.info("job %s is not QUEUED (finished, cancelled, or running elsewhere): message dropped", job_id)
            return None
        self._metrics.started.inc()
        with logs.bind(model=f"{job.model_ref.name}:{job.model_version}"):
            log.info("job %s running, attempt %d of %d", job_id, job.attempt_count, job.max_attempts)
            try:
                async with self._heartbeat(job_id) as lost:
                    state = await self._run_batches(job, lost)
            except _Stop:
                self._metrics.stopped.inc()
                try:
                    return (await self._store.get_job(job_id)).state
                except JobNotFound:  # cancelled, then deleted
                    return None
            except WorkerStopping:
                self._metrics.interrupted.inc()
                raise
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                    raise
                if isinstance(exc, Unavailable):
                    await self._await_dependency(job, exc, outage_since)
                return await self._failed(job, exc)
            self._metrics.completed.inc()
            return state

    async def _await_dependency(self, job: Job, exc: Unavailable, outage_since: float | None) -> None:
        """Puts the job back in the queue, its attempt not spent, to wait for the dependency that failed it
        (AwaitingDependency); returns, for the failure to count as an attempt, once the outage has lasted
        `outage_tolerance` seconds without the job storing a batch."""
        now = time.time()
        if outage_since is None:
            outage_since = now
        elif (await self._store.get_job(job.id)).progress.batches_done > job.progress.batches_done:
            outage_since = now  # a new outage: the last one ended when this run stored a batch
        lasted = now - outage_since
        if lasted >= self._settings.outage_tolerance:
            return
        delay = self._settings.outage_delay(lasted)
        reason = f"waiting for a dependency, the attempt not counted: {_one_line(exc)}"
        if not await self._store.release(job.id, self.worker_id, retry_in=delay, reason=reason, refund=True):
            return  # cancelled or taken over meanwhile: _failed finds it so
        log.warning(
            "job %s: %s; waiting %.1f s for it (unavailable for %.0f s), attempt %d not counted",
            job.id,
            _one_line(exc),
            delay,
            lasted,
            job.attempt_count,
        )
        self._metrics.retries.inc()
        raise AwaitingDependency(job.id, delay, outage_since) from exc

    async def _failed(self, job: Job, exc: BaseException) -> JobState:
        if not isinstance(exc, ServiceError):
            log.error("job %s: unexpected failure", job.id, exc_info=exc)
        if is_transient(exc) or not isinstance(exc, ServiceError):
            if job.attempt_count < job.max_attempts:
                delay = self._settings.backoff(job.attempt_count)
                reason = f"attempt {job.attempt_count} of {job.max_attempts} failed: {_one_line(exc)}"
                if await self._store.release(job.id, self.worker_id, retry_in=delay, reason=reason):
                    # Expected while a dependency restarts: one line, no traceback.
                    log.warning(
                        "job %s: attempt %d of %d failed (%s); running again in %.1f s",
                        job.id,
                        job.attempt_count,
                        job.max_attempts,
                        _one_line(exc),
                        delay,
                    )
                    self._metrics.retries.inc()
                    raise RetryLater(job.id, exc, delay) from exc
                self._metrics.stopped.inc()
                return (await self._store.get_job(job.id)).state
            cause = _error(exc)
            error = JobError(
                cause.code,
                AttemptsExhausted.reason,
                f"gave up after {job.attempt_count} attempts; the last failed with: {cause.message}",
            )
        else:
            error = _error(exc)
        log.warning("job %s failed: %s %s", job.id, error.reason, error.message)
        if await self._store.fail(job.id, self.worker_id, error):
            self._metrics.failed.labels(error.reason).inc()
        return JobState.FAILED

    async def _load(self, job: Job) -> tuple[BatchSource, int]:
        """The job's input, and about how many bytes one of its items takes: a dataset is read from the database
        record by record as batches need it; an inline input is one record, read whole."""
        if job.dataset_id is not None:
            dataset_id = job.dataset_id
            try:
                dataset = await self._store.get_dataset(dataset_id)
            except DatasetNotFound:
                raise FailedPrecondition("the job's input is gone: its dataset was deleted") from None

            async def fetch(start: int, stop: int) -> list[InputRecord]:
                return await self._store.dataset_records(dataset_id, start, stop)

            # Batches are read in order, one at a time: each fetch reads ahead for the next few batches.
            item_bytes = bytes_per_item(dataset.size_bytes, dataset.item_count)
            source = DatasetItems(
                fetch,
                dataset_id=str(dataset_id),
                tensors=dataset.tensors,
                cached_records=2 * self._settings.batch_concurrency,
                cached_bytes=self._settings.read_ahead_bytes,
                read_ahead=self._settings.read_ahead_items(job.batch_size, item_bytes),
            )
            return source, item_bytes
        record = await self._store.inline_input(job.id)
        if record is None:
            raise FailedPrecondition("the job's input is gone: its dataset was deleted")
        items = await asyncio.to_thread(Items.from_bytes, record, delimited=False)
        return items, bytes_per_item(len(record), items.count)

    async def _run_batches(self, job: Job, lost: asyncio.Event) -> JobState:
        started = time.monotonic()
        deadline = started + job.time_limit if job.time_limit else None
        done = await self._store.done_batches(job.id)
        remaining = job.progress.batches_total - len(done)
        if remaining > 0:
            items, item_bytes = await self._load(job)
            lanes = self._settings.lanes(job.batch_size, item_bytes, remaining)
            todo = (index for index in range(job.progress.batches_total) if index not in done)  # not a list of them
            await _unless(lost, self._pipeline(job, items, todo, lanes, deadline))
        if await self._store.complete(job.id, self.worker_id):
            log.info("job %s completed", job.id)
            return JobState.COMPLETED
        stopping = "its worker stopped between batches; the attempt not counted"
        if self._stopping.is_set() and await self._store.release(
            job.id, self.worker_id, retry_in=0.0, reason=stopping, refund=True
        ):
            log.info("job %s: the worker is stopping; queued again, attempt %d not counted", job.id, job.attempt_count)
            raise WorkerStopping(job.id)
        raise _Stop

    async def _pipeline(
        self, job: Job, items: BatchSource, todo: Iterator[int], lanes: int, deadline: float | None
    ) -> None:
        """Runs the batches, `lanes` of them in flight; the first failure stops the others.

        One reader reads the batches' inputs in order, a little ahead of the lanes, so that the input is fetched
        once and never waited for; each lane runs a batch on the inference service and hands its outputs to one
        writer, which stores the finished batches a group at a time. Batches finished before a failure are still
        stored; after a cancel or a takeover nothing more is.
        """
        failure: list[BaseException] = []
        ready: asyncio.Queue[tuple[int, list[Tensor]] | None] = asyncio.Queue(maxsize=lanes)
        writer = _ResultWriter(self._store, job.id, self.worker_id, self._settings, self._metrics)

        async def reader() -> None:
            try:
                for index in todo:
                    if failure or self._stopping.is_set():
                        break
                    first = index * job.batch_size
                    last = min(first + job.batch_size, job.progress.items_total)
                    await ready.put((index, await items.read(first, last)))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                failure.append(exc)
            await ready.put(None)  # the end mark, passed on from lane to lane

        async def lane() -> None:
            while (entry := await ready.get()) is not None:
                if failure or self._stopping.is_set():
                    continue  # drain, so that the reader never waits on a full queue
                try:
                    await writer.add(*await self._batch(job, *entry, deadline))
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    failure.append(exc)
            ready.put_nowait(None)  # room: this lane just took it

        async def run_lanes() -> None:
            try:
                await asyncio.gather(*(lane() for _ in range(lanes)))
            finally:
                writer.close()  # the writer stores what is left, then ends

        async def write() -> None:
            try:
                await writer.run()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                failure.append(exc)
                writer.close()  # lanes waiting for room go on, and drop their outputs

        await asyncio.gather(reader(), run_lanes(), write())
        if failure:
            stops = [exc for exc in failure if isinstance(exc, _Stop)]
            raise stops[0] if stops else failure[0]

    async def _batch(
        self, job: Job, index: int, inputs: list[Tensor], deadline: float | None
    ) -> tuple[ResultRecord, float]:
        """Runs one batch on the inference service: its outputs as a result record, and the seconds it took."""
        first = index * job.batch_size
        last = min(first + job.batch_size, job.progress.items_total)
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeLimitExceeded(job.time_limit or 0.0)
        span: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if telemetry.tracing_enabled():
            attributes = {"modelforge.batch.index": index, "modelforge.batch.size": last - first}
            span = tracer.start_as_current_span("modelforge.jobs.batch", attributes=attributes)
        with span:
            began = time.monotonic()
            try:
                record = await self._inference.predict(
                    job.model_ref.name,
                    job.model_version,
                    inputs,
                    items=last - first,
                    priority=Priority(job.priority),
                    timeout=timeout,
                )
            except ServiceError as exc:
                if deadline is not None and time.monotonic() >= deadline and is_transient(exc):
                    raise TimeLimitExceeded(job.time_limit or 0.0) from exc
                # Which items failed: the inference service numbers elements within its request, the batch.
                exc.metadata.setdefault(_ITEMS, f"{first} to {last - 1}")
                raise
            seconds = time.monotonic() - began
        return ResultRecord(index, first, last - first, record), seconds

    @contextlib.asynccontextmanager
    async def _heartbeat(self, job_id: UUID) -> AsyncIterator[asyncio.Event]:
        """Beats while the job runs; the event it yields is set, and the beats end, once a beat finds the job no
        longer RUNNING on this worker."""
        lost = asyncio.Event()

        async def beat() -> None:
            while True:
                await asyncio.sleep(self._settings.heartbeat_interval)
                try:
                    if not await self._store.heartbeat(job_id, self.worker_id):
                        log.info("job %s is no longer running on this worker (cancelled or taken over)", job_id)
                        lost.set()
                        return
                except ServiceError as exc:
                    log.warning("job %s: heartbeat failed: %s", job_id, exc)

        task = asyncio.create_task(beat(), name=f"heartbeat-{job_id}")
        try:
            yield lost
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _unless(lost: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Awaits `work`, unless `lost` is set first: then `work` is cancelled and the job stops (_Stop)."""
    running = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait((running, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    if running.cancelled():
        raise _Stop
    running.result()


class _ResultWriter:
    """Stores a job's finished batches a group at a time: each write is one statement (one round trip, one commit,
    one progress update and one notification to watchers) for up to `write_batches` batches.

    A finished batch waits at most `write_interval` for others to share its write, less when a full group (by count
    or by bytes) is waiting; when the lanes are done, what is left is written at once. Lanes wait for room while
    two full groups are waiting, so the outputs held in memory stay bounded. A write that finds the job no longer
    RUNNING on this worker (cancelled, or taken over) raises _Stop, and nothing more is written.
    """

    def __init__(
        self, store: JobStore, job_id: UUID, worker_id: str, settings: RunnerSettings, metrics: WorkerMetrics
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._worker_id = worker_id
        self._settings = settings
        self._metrics = metrics
        self._pending: list[tuple[ResultRecord, float]] = []
        self._pending_bytes = 0
        self._since = 0.0  # when the oldest waiting batch began to wait (loop time)
        self._started = asyncio.Event()  # something waits to be written
        self._full = asyncio.Event()  # a full group waits, or the lanes are done
        self._room = asyncio.Event()  # lanes may add again
        self._closed = False

    async def add(self, result: ResultRecord, seconds: float) -> None:
        """Hands over one finished batch; waits while two full groups wait. Dropped once the writer is closed."""
        while self._group_waits(factor=2) and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return
        if not self._pending:
            self._since = asyncio.get_running_loop().time()
        self._pending.append((result, seconds))
        self._pending_bytes += len(result.record)
        self._started.set()
        if self._group_waits():
            self._full.set()

    def close(self) -> None:
        """No more batches: the writer writes what waits, then its run ends."""
        self._closed = True
        self._full.set()
        self._started.set()
        self._room.set()

    async def run(self) -> None:
        """Writes groups until closed and nothing waits; raises _Stop when the job stopped being ours."""
        while True:
            await self._started.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._since + self._settings.write_interval):
                    await self._full.wait()
            group = self._take()
            self._since = asyncio.get_running_loop().time()  # what is left waits from now
            if not self._pending and not self._closed:
                self._started.clear()
            if not self._closed and not self._group_waits():
                self._full.clear()
            self._room.set()
            if group:
                await self._write(group)
            elif self._closed:
                return

    def _group_waits(self, factor: int = 1) -> bool:
        """Whether `factor` full groups wait, counted in batches or in bytes."""
        return (
            len(self._pending) >= factor * self._settings.write_batches
            or self._pending_bytes >= factor * self._settings.write_bytes
        )

    def _take(self) -> list[tuple[ResultRecord, float]]:
        """The oldest waiting batches, up to a full group (at least one batch, however large)."""
        count = taken = 0
        limit, room = self._settings.write_batches, self._settings.write_bytes
        for result, _ in self._pending:
            if count == limit or (count and taken + len(result.record) > room):
                break
            count += 1
            taken += len(result.record)
        group, self._pending = self._pending[:count], self._pending[count:]
        self._pending_bytes -= taken
        return group

    async def _write(self, group: list[tuple[ResultRecord, float]]) -> None:
        results = [result for result, _ in group]
        seconds = sum(seconds for _, seconds in group)
        state = await self._store.store_batches(self._job_id, self._worker_id, results, seconds)
        if state is not JobState.RUNNING:
            self._closed = True
            self._room.set()
            first = min(result.batch_index for result in results)
            log.info(
                "job %s stops before batch %d: it is %s",
                self._job_id,
                first,
                state.value if state else "elsewhere",
            )
            raise _Stop
        for result, took in group:
            self._metrics.batch_stored(result.item_count, took)

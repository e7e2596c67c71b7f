"""JobsClient and AsyncJobsClient: batch inference jobs and their datasets, and the Job handles they return.

Same methods and arguments on both; the async ones are awaited. Requests are built and answers read through
``_convert``, so only the I/O differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeGuard, TypeVar

import grpc
import grpc.aio
import numpy as np

from modelforge import _arrayfiles, _convert
from modelforge._channel import CLIENT_TIMEOUT, JOBS, AsyncChannelClient, ChannelClient, Timeout, call_timeout
from modelforge._convert import DEFAULT_CHUNK_BYTES, MiB, Progress, ResultCheck, SavedResult
from modelforge._directories import MadeDirectories
from modelforge._domain import Dataset, JobPriority, JobPriorityName, JobState, JobStatus
from modelforge._errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    ModelForgeError,
    NotFoundError,
    UnavailableError,
    naming,
    translated,
    with_details,
)
from modelforge._refs import ModelRef
from modelforge.jobs.v1 import jobs_pb2 as pb
from modelforge.jobs.v1 import jobs_pb2_grpc

__all__ = ["AsyncJob", "AsyncJobsClient", "Job", "JobsClient"]

Inputs = Mapping[str, Any] | str | os.PathLike[str]
"""A job's items: input name to array (the first dimension counts the items), or a path to a ``.npz`` file."""

INLINE_LIMIT_BYTES = 4 * MiB
"""Inputs larger than this are uploaded as a dataset first instead of travelling inside CreateJob."""


def _arrays(source: Inputs) -> dict[str, np.ndarray[Any, Any]]:
    if isinstance(source, Mapping):
        return {name: np.asarray(value) for name, value in source.items()}
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"inputs must be a mapping of input name to array, e.g. {{'input': items}}, or the path of a .npz file; "
            f"got {type(source).__name__}"
        )
    loaded = _arrayfiles.read(source)
    if isinstance(loaded, np.ndarray):
        raise ValueError(
            f"{os.fspath(source)} holds one array, not a .npz archive of named inputs: pass a mapping of names to "
            "arrays"
        )
    return loaded


def _create_request(
    ref: str | ModelRef,
    *,
    inline: Mapping[str, Any] | None,
    dataset_id: str | None,
    batch_size: int,
    priority: JobPriority | JobPriorityName | None,
    labels: Mapping[str, str] | None,
    max_attempts: int,
    time_limit: float | None,
    request_id: str | None,
) -> pb.CreateJobRequest:
    request = pb.CreateJobRequest(
        model_ref=_convert.ref_proto(ref),
        batch_size=_convert.whole_number(batch_size, "batch_size"),
        priority=_convert.job_priority_proto(priority),
        labels=dict(labels or {}),
        max_attempts=_convert.whole_number(max_attempts, "max_attempts"),
        request_id=request_id or str(uuid.uuid4()),  # always set, so that gRPC may retry CreateJob safely
    )
    if inline is not None:
        request.inline_input.CopyFrom(_convert.inline_input(inline))
    else:
        request.dataset_id = "" if dataset_id is None else _convert.resource_id(dataset_id, "dataset")
    limit = _convert.duration_proto(time_limit, "time_limit")
    if limit is not None:
        request.time_limit.CopyFrom(limit)
    return request


def _plan_input(inputs: Inputs | None, dataset: str | None) -> tuple[dict[str, np.ndarray[Any, Any]] | None, bool]:
    """The arrays to send (None when a dataset id is given) and whether they go as a dataset upload."""
    if (inputs is None) == (dataset is None):
        raise ValueError("give the job's input as inputs=... (arrays or a .npz path) or dataset=... (an id)")
    if inputs is None:
        return None, False
    arrays = _arrays(inputs)
    return arrays, not isinstance(inputs, Mapping) or _convert.input_bytes(arrays) > INLINE_LIMIT_BYTES


def _summary(status: JobStatus) -> str:
    return f"{status.state.value}, {status.progress.items_done}/{status.progress.items_total} items"


# How long Job.watch keeps trying to reach a jobs API that went away before it gives up.
RECONNECT_SECONDS = 30.0


def _still_going(status: JobStatus, timeout: float | None) -> TimeoutError:
    """What `wait` raises when the job has not ended within ``timeout`` seconds."""
    return TimeoutError(
        f"job {status.id} is still {status.state.value} after {timeout} s "
        f"({status.progress.items_done}/{status.progress.items_total} items)"
    )


class _Reconnect:
    """The time a watch has left: its own timeout, and RECONNECT_SECONDS of failed attempts in a row."""

    def __init__(self, timeout: float | None) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._failing_since: float | None = None
        self._delay = 0.1

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def reached(self) -> None:
        self._failing_since, self._delay = None, 0.1

    def after_failure(self) -> float | None:
        """Seconds to wait before watching again; None when the watch has been failing for RECONNECT_SECONDS or
        its timeout would pass first."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        delay, self._delay = self._delay, min(self._delay * 2, 2.0)
        out_of_time = self._deadline is not None and now + delay >= self._deadline
        if now - self._failing_since >= RECONNECT_SECONDS or out_of_time:
            return None
        return delay


def _unused(uploaded: str | None, job: pb.Job) -> TypeGuard[str]:
    """Whether the dataset a submit uploaded went unused: the request_id named a job made before, by an earlier
    submit that uploaded its own copy."""
    return uploaded is not None and job.dataset_id != uploaded


def _not_completed(error: FailedPreconditionError, status: JobStatus) -> FailedPreconditionError:
    """The refusal of a result, with why the job failed when it did: the server's message says only that it is not
    COMPLETED."""
    if status.error is None:
        return error
    why = status.error
    return with_details(error, f"{error.details}. It failed with {why.code} {why.reason}: {why.message}")


class _ResultFile:
    """Where :meth:`Job.save_result` writes: a ``.npz`` archive, made beside its target and renamed onto it whole.

    Each output goes to a ``.npy`` file of its own, in a temporary directory in the target's directory, as its
    records arrive (:class:`~modelforge._convert.ResultCheck` says what to append); :meth:`commit` packs them into a
    zip archive there (stored, ZIP64, as ``numpy.savez`` writes one), copying a MiB at a time, and renames it onto
    the target. Nothing is made before the first record: a refused result leaves nothing behind. Missing
    directories above the target are made with the temporary one; :meth:`discard` removes all it made. OS errors
    name the target, not the temporary files.
    """

    def __init__(self, target: str | os.PathLike[str], items_total: int) -> None:
        self.target = Path(target)
        self._check = ResultCheck(items_total)
        self._directory: Path | None = None
        self._members: dict[str, IO[bytes]] = {}  # each output's .npy file, open for writing
        self._directories = MadeDirectories()

    def write(self, message: pb.GetJobResultResponse) -> None:
        """Appends one record's numeric outputs to their files."""
        with naming(self.target):
            for piece in self._check.accept(message):
                file = self._members.get(piece.output)
                if file is None:
                    file = self._member(piece.output)
                    descr = np.lib.format.dtype_to_descr(piece.array.dtype)
                    header = {"descr": descr, "fortran_order": False, "shape": piece.shape}
                    np.lib.format.write_array_header_1_0(file, header)  # as numpy.save writes it
                file.write(np.ascontiguousarray(piece.array).reshape(-1).view(np.uint8).data)

    def commit(self) -> SavedResult:
        """Saves the STRING outputs, packs every output into the archive and renames it onto the target."""
        saved, strings = self._check.finish()
        with naming(self.target):
            for name, array in strings.items():
                np.lib.format.write_array(self._member(name), array, allow_pickle=False)
            archive = self._temporary() / "result.npz"
            with zipfile.ZipFile(archive, "x", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name in saved:  # in the order of the outputs, as numpy.savez(**result()) would write them
                    file = self._members[name]
                    file.close()
                    with open(file.name, "rb") as source, zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        shutil.copyfileobj(source, member, MiB)
                    os.unlink(file.name)  # the disk holds the result about once: the archive and what is left to pack
            os.replace(archive, self.target)
        self._remove_temporary()
        return saved

    def discard(self) -> None:
        """Closes and removes every temporary file, their directory and the directories made above it."""
        self._remove_temporary()
        self._directories.remove()

    def _remove_temporary(self) -> None:
        for file in self._members.values():
            with contextlib.suppress(OSError):  # a failed flush: the file goes anyway
                file.close()
        self._members.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _temporary(self) -> Path:
        if self._directory is None:
            self._directories.make(self.target)
            self._directory = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".part", dir=self.target.parent)
            )
        return self._directory

    def _member(self, output: str) -> IO[bytes]:
        """A new .npy file for ``output``, named by number: an output's name need not be a file name."""
        file = self._members[output] = (self._temporary() / f"{len(self._members)}.npy").open("xb")
        return file


_T = TypeVar("_T")


async def _in_thread(work: Callable[[], _T]) -> _T:
    """Runs ``work`` in a thread. A cancellation waits for the thread to end before it goes on, so that the files the
    thread writes are not removed under it, nor made after they were removed."""
    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved, so that asyncio logs nothing: the cancellation is what goes on
        raise


class Job:
    """A handle on a batch inference job: its last known status, and what can be done with it.

    Attributes:
        status: The job as last seen (refreshed by :meth:`refresh`, :meth:`watch`, :meth:`wait`...).
    """

    def __init__(self, client: JobsClient, status: JobStatus) -> None:
        self._client = client
        self.status = status

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {_summary(self.status)})"

    @property
    def id(self) -> str:
        """The job's id."""
        return self.status.id

    def refresh(self, *, timeout: Timeout = CLIENT_TIMEOUT) -> JobStatus:
        """Fetches the job's current status.

        Args:
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            response = self._client.jobs_stub.GetJob(
                pb.GetJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        self.status = _convert.job_status(response.job)
        return self.status

    def watch(self, *, timeout: float | None = None) -> Iterator[JobStatus]:
        """Iterates over the job's status as it changes: the current one first, the terminal one last.

        A jobs API that goes away (a restart, a replica stopping) is watched again, for up to
        ``RECONNECT_SECONDS`` of trying; the status it gives first may repeat the last one seen.

        Args:
            timeout: Give up after this many seconds (DeadlineExceededError); None to watch until the end.
        """
        reconnect = _Reconnect(timeout)
        while True:
            with translated():  # a closed client fails here, before the call exists
                call = self._client.jobs_stub.WatchJob(pb.WatchJobRequest(id=self.id), timeout=reconnect.remaining())
            try:
                with translated():
                    for message in call:
                        reconnect.reached()
                        self.status = _convert.job_status(message.job)
                        yield self.status
                return
            except UnavailableError:
                if (delay := reconnect.after_failure()) is None:
                    raise
                time.sleep(delay)
            finally:
                call.cancel()

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Blocks until the job is COMPLETED, FAILED or CANCELLED and returns that status.

        Raises:
            TimeoutError: the job is still going after ``timeout`` seconds.
        """
        try:
            for _ in self.watch(timeout=timeout):
                pass
        except DeadlineExceededError:
            raise _still_going(self.status, timeout) from None
        return self.status

    def result(self, timeout: float | None = None) -> dict[str, np.ndarray[Any, Any]]:
        """Waits for the job, then returns its outputs: output name to one array over every item, in order.

        Raises:
            FailedPreconditionError: the job ended FAILED or CANCELLED; for a FAILED job the message ends with
                why (``status.error``).
            TimeoutError: the job is still going after ``timeout`` seconds.
            IntegrityError: the result stream skipped, repeated or missed items.
            ValueError: an output whose items change shape from one batch to the next: they make no one array.
        """
        self.wait(timeout)
        assembler = _convert.ResultAssembler(self.status.progress.items_total)
        with contextlib.closing(self._results()) as messages:
            for message in messages:
                assembler.accept(message)
        return assembler.finish()

    def save_result(
        self, path: str | os.PathLike[str], timeout: float | None = None
    ) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        """Waits for the job, then streams its outputs into a ``.npz`` file at ``path``, which ``np.load`` reads.

        The file holds what :meth:`result` returns, output name to one array over every item, but the outputs go to
        disk record by record as they arrive (a record holds one batch of the job): the memory taken is that of a
        few records, whatever the result's size.
        STRING outputs are the exception: they are gathered in memory and saved as ``str`` arrays (``bytes`` where
        an element is not UTF-8 text), so that ``np.load`` reads them without pickle. The file is written beside
        ``path`` and renamed onto it once whole, so that ``path`` never holds part of a result; a save that fails
        or is interrupted leaves no temporary file behind. ``path`` is used as given: no ``.npz`` is added to it.
        Missing directories above ``path`` are made, and removed again if the save fails.

        Returns:
            Output name to the dtype and shape of its array in the file.

        Raises:
            FailedPreconditionError: the job ended FAILED or CANCELLED; for a FAILED job the message ends with
                why (``status.error``).
            TimeoutError: the job is still going after ``timeout`` seconds.
            IntegrityError: the result stream skipped, repeated or missed items.
            ValueError: an output the file cannot hold: its items change shape from one batch to the next
                (:meth:`result` cannot join them either), or a STRING output has an element ending in a NUL byte,
                which numpy drops from ``str`` and ``bytes`` arrays (:meth:`result` returns it).
            OSError: the file cannot be written; the error names ``path``.
        """
        self.wait(timeout)
        file = _ResultFile(path, self.status.progress.items_total)
        try:
            with contextlib.closing(self._results()) as messages:
                for message in messages:
                    file.write(message)
            return file.commit()
        except BaseException:  # refused, failed, interrupted (Ctrl-C)...
            file.discard()
            raise

    def _results(self) -> Generator[pb.GetJobResultResponse, None, None]:
        """The messages of the job's result stream; FailedPreconditionError says why a FAILED job has none."""
        with translated():  # a closed client fails here, before the call exists
            call = self._client.jobs_stub.GetJobResult(pb.GetJobResultRequest(id=self.id))
        try:
            with translated():
                yield from call
        except FailedPreconditionError as exc:
            raise _not_completed(exc, self.status) from exc
        finally:
            call.cancel()

    def cancel(self, *, timeout: Timeout = CLIENT_TIMEOUT) -> JobStatus:
        """Cancels the job: a queued job never runs; a running one stops before its next batch.

        Args:
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            response = self._client.jobs_stub.CancelJob(
                pb.CancelJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        self.status = _convert.job_status(response.job)
        return self.status

    def retry(self, *, timeout: Timeout = CLIENT_TIMEOUT) -> JobStatus:
        """Runs a FAILED or CANCELLED job again from its first unfinished batch.

        Args:
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            response = self._client.jobs_stub.RetryJob(
                pb.RetryJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        self.status = _convert.job_status(response.job)
        return self.status

    def delete(self, *, dataset: bool = False, timeout: Timeout = CLIENT_TIMEOUT) -> int:
        """Deletes a finished job and its results; returns how many items' outputs went with it.

        Args:
            dataset: Delete the dataset the job read as well (the one :meth:`JobsClient.submit` uploaded for large
                arrays, or the one named with ``dataset=``), once the job is gone. Nothing more happens for a job
                of inline input, or whose dataset is gone already. A dataset that a queued or running job reads
                stays: FailedPreconditionError, raised after the job itself was deleted.
            timeout: Seconds allowed for each call, instead of the client's timeout; None for no limit.
        """
        and_dataset = _dataset_to_delete(self.status, dataset)
        with translated():
            response = self._client.jobs_stub.DeleteJob(
                pb.DeleteJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        if and_dataset:
            with contextlib.suppress(NotFoundError):
                self._client.delete_dataset(self.status.dataset_id, timeout=timeout)
        return int(response.deleted_items)


def _dataset_to_delete(status: JobStatus, wanted: object) -> bool:
    """Whether Job.delete(dataset=...) has a dataset to delete after the job: asked for, and one not gone already."""
    if not isinstance(wanted, bool):
        raise TypeError(f"dataset takes True or False (whether to delete the job's dataset too), not {wanted!r}")
    return wanted and bool(status.dataset_id) and not status.dataset_deleted


class JobsClient(ChannelClient):
    """A blocking client of the ModelForge jobs service.

    ::

        with JobsClient() as jobs:
            job = jobs.submit("fraud@production", {"input": features}, batch_size=512)
            for status in job.watch():
                print(status.progress.items_done, "/", status.progress.items_total)
            scores = job.result()["scores"]
            job.save_result("scores.npz")  # the same arrays, streamed to a file: for results larger than memory

    Args:
        target: ``host:port`` of the jobs service; defaults to ``MODELFORGE_JOBS_ADDRESS``, else
            ``127.0.0.1:50053``.
        channel: A channel of your own; the client does not close it. Excludes ``target``.
        timeout: Seconds allowed for each unary call; None for no limit. A method's own ``timeout=`` replaces it
            for that call, except on :meth:`Job.watch`, :meth:`Job.wait`, :meth:`Job.result` and
            :meth:`Job.save_result`, where ``timeout`` is how long to wait for the job. Watches, uploads and results
            (streams) have no limit.
        max_message_bytes: Largest message sent or received; None for what the service takes and gives with its
            default settings, 64 MiB.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(JOBS, target, channel, max_message_bytes)
        self.timeout = timeout
        """Seconds allowed for each call whose own ``timeout=`` says nothing else; None for no limit."""
        self.jobs_stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        """The generated stub over this client's channel, for calls the client does not wrap."""

    def submit(
        self,
        ref: str | ModelRef,
        inputs: Inputs | None = None,
        *,
        dataset: str | None = None,
        batch_size: int = 0,
        priority: JobPriority | JobPriorityName | None = None,
        labels: Mapping[str, str] | None = None,
        max_attempts: int = 0,
        time_limit: float | None = None,
        request_id: str | None = None,
        progress: Progress | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Job:
        """Submits a job that runs a model over many items, and returns its handle.

        The reference is resolved now and the job pinned to that version. Every argument is checked before a
        dataset is uploaded, and a dataset this call uploaded is deleted again when no job is made of it, whatever
        the reason (refused, failed, interrupted or cancelled).

        Args:
            ref: ``"name"``, ``"name:3"`` or ``"name@production"``.
            inputs: Input name to array (the first dimension counts the items), or a ``.npz`` path. Arrays over
                4 MiB, and files, are uploaded as a dataset first.
            dataset: The id of a dataset uploaded before, instead of ``inputs``.
            batch_size: Items per inference request; 0 for the server's default.
            priority: ``"low"``, ``"normal"`` or ``"high"``.
            labels: Labels, for filtering :meth:`list_jobs`.
            max_attempts: Runs the job may start; 0 for the server's default.
            time_limit: Seconds one run may take; None for no limit.
            request_id: Makes the submission idempotent; a fresh UUID when not given. A repeat answers the job
                the first submission made; one that asks for anything else raises :class:`AlreadyExistsError`.
            progress: Called as ``progress(bytes_sent, total_bytes)`` during a dataset upload.
            timeout: Seconds allowed for the CreateJob call, instead of the client's timeout; None for no limit. A
                dataset upload, being a stream, has no limit.

        Raises:
            ValueError: a malformed reference or argument, or a file that is not a ``.npz`` archive; raised
                before anything is uploaded.
            NotFoundError: unknown model, version, alias or dataset.
            InvalidArgumentError: empty input, or input that does not match the model's signature.
        """
        arrays, upload = _plan_input(inputs, dataset)
        # Built, and so checked, before any upload: a refused argument leaves nothing behind on the server.
        request = _create_request(
            ref,
            inline=None if upload else arrays,
            dataset_id=dataset,
            batch_size=batch_size,
            priority=priority,
            labels=labels,
            max_attempts=max_attempts,
            time_limit=time_limit,
            request_id=request_id,
        )
        uploaded = None  # a dataset this call made of the inputs: it goes unless a job uses it
        if upload and arrays is not None:
            request.dataset_id = uploaded = self.upload_dataset(arrays, progress=progress).id
        try:
            with translated():
                response = self.jobs_stub.CreateJob(request, timeout=call_timeout(timeout, self.timeout))
        except BaseException:  # refused, failed, interrupted (Ctrl-C)...
            if uploaded is not None:
                self._drop_upload(uploaded)
            raise
        if _unused(uploaded, response.job):
            self._drop_upload(uploaded)
        return Job(self, _convert.job_status(response.job))

    def _drop_upload(self, dataset_id: str) -> None:
        """Deletes a dataset that submit uploaded for a job it did not make. A job that was made after all (its
        CreateJob reached the server before the failure) keeps it: the delete is then refused, and that is fine."""
        with contextlib.suppress(ModelForgeError):
            self.delete_dataset(dataset_id)

    def get_job(self, job_id: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> Job:
        """Returns a handle on an existing job. Raises NotFoundError if there is none with that id, and ValueError,
        with no call made, for an id that is not a UUID.

        Args:
            job_id: The job's id.
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            response = self.jobs_stub.GetJob(
                pb.GetJobRequest(id=_convert.resource_id(job_id, "job_id")), timeout=call_timeout(timeout, self.timeout)
            )
        return Job(self, _convert.job_status(response.job))

    def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        model: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Iterator[Job]:
        """Iterates over jobs, newest first, fetching pages lazily; filtered by state, model name and labels.

        Args:
            timeout: Seconds allowed for each page's call, instead of the client's timeout; None for no limit.
        """
        token = ""
        state_value = _convert.job_state_proto(state)
        while True:
            request = pb.ListJobsRequest(
                page_size=_convert.whole_number(page_size, "page_size"),
                page_token=token,
                state=state_value,
                model=_convert.model_filter(model),
                labels=dict(labels or {}),
            )
            with translated():
                page = self.jobs_stub.ListJobs(request, timeout=call_timeout(timeout, self.timeout))
            yield from (Job(self, _convert.job_status(j)) for j in page.jobs)
            if not (token := page.next_page_token):
                return

    def upload_dataset(
        self,
        source: Inputs,
        *,
        display_name: str = "",
        labels: Mapping[str, str] | None = None,
        progress: Progress | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Dataset:
        """Uploads arrays (or a ``.npz`` file) as a dataset that jobs can read by id.

        Args:
            source: Input name to array (the first dimension counts the items), or a ``.npz`` path.
            display_name: A name for people.
            labels: Free labels.
            progress: Called as ``progress(bytes_sent, total_bytes)``. If it raises, the upload is cancelled,
                nothing is stored, and upload_dataset raises that exception.
            chunk_bytes: Bytes per message.
        """
        data = _convert.encode_dataset(_arrays(source))
        reporting = _convert.UploadProgress(progress)
        requests = _convert.dataset_upload_requests(
            data, display_name=display_name, labels=labels, chunk_bytes=chunk_bytes, progress=reporting
        )
        with _convert.reported(reporting), translated():
            response = self.jobs_stub.UploadDataset(requests)
        return _convert.dataset(response.dataset)

    def get_dataset(self, dataset_id: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> Dataset:
        """Returns one dataset. Raises NotFoundError if there is none with that id, and ValueError, with no call
        made, for an id that is not a UUID.

        Args:
            dataset_id: The dataset's id.
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            response = self.jobs_stub.GetDataset(
                pb.GetDatasetRequest(id=_convert.resource_id(dataset_id, "dataset_id")),
                timeout=call_timeout(timeout, self.timeout),
            )
        return _convert.dataset(response.dataset)

    def list_datasets(
        self, *, labels: Mapping[str, str] | None = None, page_size: int = 100, timeout: Timeout = CLIENT_TIMEOUT
    ) -> Iterator[Dataset]:
        """Iterates over datasets, newest first, fetching pages lazily; filtered by labels.

        Args:
            timeout: Seconds allowed for each page's call, instead of the client's timeout; None for no limit.
        """
        token = ""
        while True:
            request = pb.ListDatasetsRequest(
                page_size=_convert.whole_number(page_size, "page_size"), page_token=token, labels=dict(labels or {})
            )
            with translated():
                page = self.jobs_stub.ListDatasets(request, timeout=call_timeout(timeout, self.timeout))
            yield from (_convert.dataset(d) for d in page.datasets)
            if not (token := page.next_page_token):
                return

    def delete_dataset(self, dataset_id: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> None:
        """Deletes a dataset. Raises FailedPreconditionError while a queued or running job reads it.

        Args:
            dataset_id: The dataset's id.
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            self.jobs_stub.DeleteDataset(
                pb.DeleteDatasetRequest(id=_convert.resource_id(dataset_id, "dataset_id")),
                timeout=call_timeout(timeout, self.timeout),
            )


class AsyncJob:
    """The asyncio twin of :class:`Job`: the same methods, awaited."""

    def __init__(self, client: AsyncJobsClient, status: JobStatus) -> None:
        self._client = client
        self.status = status

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, {_summary(self.status)})"

    @property
    def id(self) -> str:
        """The job's id."""
        return self.status.id

    async def refresh(self, *, timeout: Timeout = CLIENT_TIMEOUT) -> JobStatus:
        """See :meth:`Job.refresh`."""
        with self._client._translated():
            response = await self._client.jobs_stub.GetJob(
                pb.GetJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        self.status = _convert.job_status(response.job)
        return self.status

    async def watch(self, *, timeout: float | None = None) -> AsyncIterator[JobStatus]:
        """See :meth:`Job.watch`; iterate with ``async for``."""
        reconnect = _Reconnect(timeout)
        while True:
            with self._client._translated():  # a closed client fails here, before the call exists
                call = self._client.jobs_stub.WatchJob(pb.WatchJobRequest(id=self.id), timeout=reconnect.remaining())
            try:
                with self._client._translated():
                    async for message in call:
                        reconnect.reached()
                        self.status = _convert.job_status(message.job)
                        yield self.status
                return
            except UnavailableError:
                if (delay := reconnect.after_failure()) is None:
                    raise
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """See :meth:`Job.wait`."""
        try:
            async for _ in self.watch(timeout=timeout):
                pass
        except DeadlineExceededError:
            raise _still_going(self.status, timeout) from None
        return self.status

    async def result(self, timeout: float | None = None) -> dict[str, np.ndarray[Any, Any]]:
        """See :meth:`Job.result`."""
        await self.wait(timeout)
        assembler = _convert.ResultAssembler(self.status.progress.items_total)
        async with contextlib.aclosing(self._results()) as messages:
            async for message in messages:
                assembler.accept(message)
        return assembler.finish()

    async def save_result(
        self, path: str | os.PathLike[str], timeout: float | None = None
    ) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        """See :meth:`Job.save_result`. Files are written in a thread; a cancelled save waits for that thread, then
        removes what it wrote."""
        await self.wait(timeout)
        file = _ResultFile(path, self.status.progress.items_total)
        try:
            async with contextlib.aclosing(self._results()) as messages:
                async for message in messages:
                    await _in_thread(functools.partial(file.write, message))
            return await _in_thread(file.commit)
        except BaseException:  # refused, failed, cancelled...
            file.discard()
            raise

    async def _results(self) -> AsyncGenerator[pb.GetJobResultResponse, None]:
        """See :meth:`Job._results`."""
        with self._client._translated():  # a closed client fails here, before the call exists
            call = self._client.jobs_stub.GetJobResult(pb.GetJobResultRequest(id=self.id))
        try:
            with self._client._translated():
                async for message in call:
                    yield message
        except FailedPreconditionError as exc:
            raise _not_completed(exc, self.status) from exc
        finally:
            call.cancel()

    async def cancel(self, *, timeout: Timeout = CLIENT_TIMEOUT) -> JobStatus:
        """See :meth:`Job.cancel`."""
        with self._client._translated():
            response = await self._client.jobs_stub.CancelJob(
                pb.CancelJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        self.status = _convert.job_status(response.job)
        return self.status

    async def retry(self, *, timeout: Timeout = CLIENT_TIMEOUT) -> JobStatus:
        """See :meth:`Job.retry`."""
        with self._client._translated():
            response = await self._client.jobs_stub.RetryJob(
                pb.RetryJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        self.status = _convert.job_status(response.job)
        return self.status

    async def delete(self, *, dataset: bool = False, timeout: Timeout = CLIENT_TIMEOUT) -> int:
        """See :meth:`Job.delete`."""
        and_dataset = _dataset_to_delete(self.status, dataset)
        with self._client._translated():
            response = await self._client.jobs_stub.DeleteJob(
                pb.DeleteJobRequest(id=self.id), timeout=call_timeout(timeout, self._client.timeout)
            )
        if and_dataset:
            with contextlib.suppress(NotFoundError):
                await self._client.delete_dataset(self.status.dataset_id, timeout=timeout)
        return int(response.deleted_items)


class AsyncJobsClient(AsyncChannelClient):
    """The asyncio twin of :class:`JobsClient`: the same methods, awaited; handles are :class:`AsyncJob`.

    ::

        async with AsyncJobsClient() as jobs:
            job = await jobs.submit("fraud@production", "items.npz")
            async for status in job.watch():
                ...
            outputs = await job.result()

    Args:
        target: ``host:port`` of the jobs service; defaults to ``MODELFORGE_JOBS_ADDRESS``, else
            ``127.0.0.1:50053``.
        channel: A ``grpc.aio`` channel of your own; the client does not close it. Excludes ``target``.
        timeout: Seconds allowed for each unary call; None for no limit. A method's own ``timeout=`` replaces it
            for that call, except on the handles' waits, as for :class:`JobsClient`.
        max_message_bytes: Largest message sent or received; None for what the service takes and gives with its
            default settings, 64 MiB.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(JOBS, target, channel, max_message_bytes)
        self.timeout = timeout
        """Seconds allowed for each call whose own ``timeout=`` says nothing else; None for no limit."""
        self.jobs_stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        """The generated stub over this client's channel, for calls the client does not wrap."""

    async def submit(
        self,
        ref: str | ModelRef,
        inputs: Inputs | None = None,
        *,
        dataset: str | None = None,
        batch_size: int = 0,
        priority: JobPriority | JobPriorityName | None = None,
        labels: Mapping[str, str] | None = None,
        max_attempts: int = 0,
        time_limit: float | None = None,
        request_id: str | None = None,
        progress: Progress | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> AsyncJob:
        """See :meth:`JobsClient.submit`. Reading and encoding the input run in a thread."""
        arrays, upload = await asyncio.to_thread(_plan_input, inputs, dataset)
        # Built, and so checked, before any upload: a refused argument leaves nothing behind on the server.
        request = await asyncio.to_thread(
            lambda: _create_request(
                ref,
                inline=None if upload else arrays,
                dataset_id=dataset,
                batch_size=batch_size,
                priority=priority,
                labels=labels,
                max_attempts=max_attempts,
                time_limit=time_limit,
                request_id=request_id,
            )
        )
        uploaded = None  # a dataset this call made of the inputs: it goes unless a job uses it
        if upload and arrays is not None:
            request.dataset_id = uploaded = (await self.upload_dataset(arrays, progress=progress)).id
        try:
            with self._translated():
                response = await self.jobs_stub.CreateJob(request, timeout=call_timeout(timeout, self.timeout))
        except BaseException:  # refused, failed, cancelled...
            if uploaded is not None:
                await self._drop_upload(uploaded)
            raise
        if _unused(uploaded, response.job):
            await self._drop_upload(uploaded)
        return AsyncJob(self, _convert.job_status(response.job))

    async def _drop_upload(self, dataset_id: str) -> None:
        """See :meth:`JobsClient._drop_upload`. Run after a cancellation too: the task's cancellation has been
        delivered by then, so this call goes ahead unless the task is cancelled once more."""
        with contextlib.suppress(ModelForgeError):
            await self.delete_dataset(dataset_id)

    async def get_job(self, job_id: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> AsyncJob:
        """See :meth:`JobsClient.get_job`."""
        with self._translated():
            response = await self.jobs_stub.GetJob(
                pb.GetJobRequest(id=_convert.resource_id(job_id, "job_id")), timeout=call_timeout(timeout, self.timeout)
            )
        return AsyncJob(self, _convert.job_status(response.job))

    async def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        model: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> AsyncIterator[AsyncJob]:
        """See :meth:`JobsClient.list_jobs`; iterate with ``async for``."""
        token = ""
        state_value = _convert.job_state_proto(state)
        while True:
            request = pb.ListJobsRequest(
                page_size=_convert.whole_number(page_size, "page_size"),
                page_token=token,
                state=state_value,
                model=_convert.model_filter(model),
                labels=dict(labels or {}),
            )
            with self._translated():
                page = await self.jobs_stub.ListJobs(request, timeout=call_timeout(timeout, self.timeout))
            for j in page.jobs:
                yield AsyncJob(self, _convert.job_status(j))
            if not (token := page.next_page_token):
                return

    async def upload_dataset(
        self,
        source: Inputs,
        *,
        display_name: str = "",
        labels: Mapping[str, str] | None = None,
        progress: Progress | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Dataset:
        """See :meth:`JobsClient.upload_dataset`. Encoding runs in a thread; progress is called on the loop."""
        data = await asyncio.to_thread(lambda: _convert.encode_dataset(_arrays(source)))
        reporting = _convert.UploadProgress(progress)
        requests = _convert.dataset_upload_requests(
            data, display_name=display_name, labels=labels, chunk_bytes=chunk_bytes, progress=reporting
        )
        with _convert.reported(reporting), self._translated():
            response = await self.jobs_stub.UploadDataset(requests)
        return _convert.dataset(response.dataset)

    async def get_dataset(self, dataset_id: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> Dataset:
        """See :meth:`JobsClient.get_dataset`."""
        with self._translated():
            response = await self.jobs_stub.GetDataset(
                pb.GetDatasetRequest(id=_convert.resource_id(dataset_id, "dataset_id")),
                timeout=call_timeout(timeout, self.timeout),
            )
        return _convert.dataset(response.dataset)

    async def list_datasets(
        self, *, labels: Mapping[str, str] | None = None, page_size: int = 100, timeout: Timeout = CLIENT_TIMEOUT
    ) -> AsyncIterator[Dataset]:
        """See :meth:`JobsClient.list_datasets`; iterate with ``async for``."""
        token = ""
        while True:
            request = pb.ListDatasetsRequest(
                page_size=_convert.whole_number(page_size, "page_size"), page_token=token, labels=dict(labels or {})
            )
            with self._translated():
                page = await self.jobs_stub.ListDatasets(request, timeout=call_timeout(timeout, self.timeout))
            for d in page.datasets:
                yield _convert.dataset(d)
            if not (token := page.next_page_token):
                return

    async def delete_dataset(self, dataset_id: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> None:
        """See :meth:`JobsClient.delete_dataset`."""
        with self._translated():
            await self.jobs_stub.DeleteDataset(
                pb.DeleteDatasetRequest(id=_convert.resource_id(dataset_id, "dataset_id")),
                timeout=call_timeout(timeout, self.timeout),
            )

"""Jobs figures: items/s of a large job over an uploaded dataset, and the submit-to-RUNNING overhead of small jobs.

Both go through the JobService's gRPC API as a user's program would; the job's own timestamps (create, start,
finish, written by the service) give the durations, so the watch's polling interval does not blur them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from modelforge import tensors
from modelforge.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from modelforge.registry.v1 import registry_pb2

_TERMINAL = {jobs_pb2.JOB_STATE_COMPLETED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}
_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


@dataclass(frozen=True)
class JobFigures:
    items: int
    batch_size: int
    upload_seconds: float
    queued_seconds: float  # create -> start (server timestamps)
    run_seconds: float  # start -> finish (server timestamps)
    wall_seconds: float  # CreateJob call -> COMPLETED seen by the client

    @property
    def items_per_second(self) -> float:
        return self.items / self.run_seconds if self.run_seconds else 0.0

    @property
    def wall_items_per_second(self) -> float:
        return self.items / self.wall_seconds if self.wall_seconds else 0.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def dataset_file(name: str, items: np.ndarray, *, record_items: int = 1024) -> bytes:
    """A dataset file: length-delimited DatasetRecords of `record_items` items each (see jobs.proto)."""
    parts: list[bytes] = []
    for start in range(0, len(items), record_items):
        record = jobs_pb2.DatasetRecord(tensors=[tensors.to_tensor(items[start : start + record_items], name=name)])
        body = record.SerializeToString()
        parts += (_varint(len(body)), body)
    return b"".join(parts)


def _upload_requests(data: bytes, chunk: int = 1 << 20) -> Iterator[jobs_pb2.UploadDatasetRequest]:
    yield jobs_pb2.UploadDatasetRequest(
        header=jobs_pb2.UploadDatasetHeader(
            display_name="bench", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )
    )
    for offset in range(0, len(data), chunk):
        yield jobs_pb2.UploadDatasetRequest(chunk=data[offset : offset + chunk])


def _seconds(start: object, end: object) -> float:
    return end.ToDatetime().timestamp() - start.ToDatetime().timestamp()  # type: ignore[attr-defined]


def _wait(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, timeout: float) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        for response in stub.WatchJob(
            jobs_pb2.WatchJobRequest(id=job_id), timeout=max(1.0, deadline - time.monotonic())
        ):
            if response.job.state in _TERMINAL:
                return response.job
        job = stub.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=10).job
        if job.state in _TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {jobs_pb2.JobState.Name(job.state)} after {timeout:.0f} s")


def _check(job: jobs_pb2.Job) -> jobs_pb2.Job:
    if job.state != jobs_pb2.JOB_STATE_COMPLETED:
        raise RuntimeError(
            f"job {job.id} ended {jobs_pb2.JobState.Name(job.state)}: {job.error.reason} {job.error.message}"
        )
    return job


def big_job(
    target: str, model: str, input_name: str, item: np.ndarray, *, items: int, batch_size: int, timeout: float
) -> JobFigures:
    """Runs `items` copies of `item` (with noise) through the model as one job over an uploaded dataset."""
    rng = np.random.default_rng(11)
    data = (np.repeat(item, items, axis=0) + rng.standard_normal((items, *item.shape[1:]), dtype=np.float32)).astype(
        item.dtype
    )
    file = dataset_file(input_name, data)
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        began = time.perf_counter()
        dataset = stub.UploadDataset(_upload_requests(file), timeout=timeout).dataset
        upload = time.perf_counter() - began
        submitted = time.perf_counter()
        created = stub.CreateJob(
            jobs_pb2.CreateJobRequest(
                model_ref=registry_pb2.ModelRef(name=model), dataset_id=dataset.id, batch_size=batch_size
            ),
            timeout=30,
        ).job
        job = _check(_wait(stub, created.id, timeout))
        wall = time.perf_counter() - submitted
    return JobFigures(
        items=items,
        batch_size=batch_size,
        upload_seconds=upload,
        queued_seconds=_seconds(job.create_time, job.start_time),
        run_seconds=_seconds(job.start_time, job.finish_time),
        wall_seconds=wall,
    )


def submit_overhead(target: str, model: str, input_name: str, item: np.ndarray, *, jobs: int) -> list[float]:
    """Seconds from create to start (server timestamps) of `jobs` one-item jobs, submitted one after the other
    on an otherwise idle suite."""
    overheads: list[float] = []
    inline = jobs_pb2.InlineInput(tensors=[tensors.to_tensor(item, name=input_name)])
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        for _ in range(jobs):
            created = stub.CreateJob(
                jobs_pb2.CreateJobRequest(model_ref=registry_pb2.ModelRef(name=model), inline_input=inline),
                timeout=30,
            ).job
            job = _check(_wait(stub, created.id, 60))
            overheads.append(_seconds(job.create_time, job.start_time))
    return overheads

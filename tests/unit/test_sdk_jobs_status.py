"""A job QUEUED again after a run says why, through the SDK's JobStatus and the CLI's lines."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from modelforge import JobState
from modelforge._convert import job_status
from modelforge.cli import _job_line, _when
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2

REF = registry_pb2.ModelRef(name="adder")
REASON = "waiting for a dependency, the attempt not counted: the inference service is unavailable"


def test_a_job_queued_again_carries_why_and_when_it_runs_next() -> None:
    when = datetime(2026, 11, 24, 12, 0, 5, tzinfo=UTC)
    message = jobs_pb2.Job(
        id="j",
        model_ref=REF,
        state=jobs_pb2.JOB_STATE_QUEUED,
        progress=jobs_pb2.JobProgress(items_done=10, items_total=40),
        queued_reason=REASON,
        next_run_time=timestamp_pb2.Timestamp(seconds=int(when.timestamp())),
    )
    status = job_status(message)
    assert (status.state, status.queued_reason, status.next_run_time) == (JobState.QUEUED, REASON, when)
    assert _job_line(status) == f"job j QUEUED: 10/40 items; {REASON}; next run {_when(when)}"


def test_a_job_that_never_waited_says_nothing_of_it() -> None:
    status = job_status(jobs_pb2.Job(id="j", model_ref=REF, state=jobs_pb2.JOB_STATE_RUNNING))
    assert (status.queued_reason, status.next_run_time) == ("", None)
    assert _job_line(status) == "job j RUNNING: 0/0 items"

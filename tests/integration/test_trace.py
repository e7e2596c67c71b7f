"""Traces across services: a prediction is one trace from the caller through inference into the registry, and a
job is one trace from CreateJob through the Dramatiq message and the worker to each inference batch.

The registry, inference and the jobs API are built by their production `build` functions after tracing is set up,
as their `main()` does; the jobs worker runs in this process as a dramatiq.Worker with the production middleware
and actors. All share this process's TracerProvider, and spans are kept in memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import grpc
import numpy as np
import psycopg
import pytest
import redis.asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelforge.jobs.v1 import jobs_pb2
from modelforge_server import logs, telemetry
from tests.fixtures.onnx_models import ModelFile, build_heavy, model_bytes
from tests.fixtures.polling import eventually
from tests.integration.inference.conftest import (  # noqa: F401
    RunningInference,
    inference,
    predict_request,
    registry,
    registry_settings,
    start_inference,
    upload,
)
from tests.integration.jobs.conftest import (  # noqa: F401
    InProcessWorker,
    RunningJobs,
    inline_request,
    jobs_api,
    jobs_settings,
    wait_terminal,
    worker,
)

PREDICT = "/modelforge.inference.v1.InferenceService/Predict"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup("modelforge-test", span_exporter=exporter)
    yield exporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (GrpcAioInstrumentorClient(), PsycopgInstrumentor(), RedisInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """The names of the span's parents, nearest first, as far as they were recorded."""
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(f"{span.name} {span.kind.name}")
    return names


async def test_a_prediction_is_one_trace_through_inference_into_the_registry(
    spans: InMemorySpanExporter,
    inference: RunningInference,  # noqa: F811
    add_one: ModelFile,
) -> None:
    await upload(inference, "traced", add_one)
    spans.clear()
    with telemetry.tracer("modelforge.test").start_as_current_span("caller") as caller:
        await inference.stub.Predict(predict_request("traced", add_one.sample(batch=1)))

    trace_id = caller.get_span_context().trace_id
    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}
    kinds = {(s.name, s.kind) for s in in_trace}
    assert (PREDICT, trace.SpanKind.CLIENT) in kinds
    assert (PREDICT, trace.SpanKind.SERVER) in kinds
    registry_served = [
        s for s in in_trace if s.kind == trace.SpanKind.SERVER and s.name.startswith("/modelforge.registry.v1.")
    ]
    assert registry_served, f"no registry call in the prediction's trace: {sorted(n for n, _ in kinds)}"
    for span in registry_served:
        chain = ancestors(span, by_id)
        assert chain[0] == f"{span.name} CLIENT", chain
        assert f"{PREDICT} SERVER" in chain and chain[-1] == "caller INTERNAL", chain
    assert all("grpc.health" not in s.name for s in spans.get_finished_spans())


@contextlib.contextmanager
def worker_log() -> Iterator[io.StringIO]:
    """The JSON lines the jobs runner logs at INFO inside the block."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("modelforge-jobs-worker"))
    logger = logging.getLogger("modelforge.jobs.runner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


CREATE_JOB = "/modelforge.jobs.v1.JobService/CreateJob"
RUN_JOB = "modelforge.jobs.run_job"
BATCH = "modelforge.jobs.batch"


async def test_a_job_is_one_trace_from_create_job_through_the_worker_to_inference_and_the_registry(
    spans: InMemorySpanExporter,
    jobs_api: RunningJobs,
    worker: InProcessWorker,
    inference: RunningInference,  # noqa: F811
    add_one: ModelFile,
) -> None:
    """CreateJob -> the Dramatiq message -> run_job on a real worker -> a span per batch -> Predict on a real
    inference server -> its registry lookups: one trace, each span the child of the one before."""
    version = await upload(inference, "traced-job", add_one)
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    spans.clear()
    with worker_log() as lines:
        with telemetry.tracer("modelforge.test").start_as_current_span("caller") as caller:
            job = (await jobs_api.stub.CreateJob(inline_request("traced-job", {"x": x}, batch_size=4))).job
        final = await wait_terminal(jobs_api.stub, job.id)
        assert final.state == jobs_pb2.JOB_STATE_COMPLETED, final.error
        await worker.join()  # the run_job span has ended once the worker is done with the message

    trace_id = caller.get_span_context().trace_id
    # The worker's log lines carry the job's trace id, the job id and the model it runs.
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    [running] = [e for e in entries if e["message"].startswith(f"job {job.id} running")]
    assert running["trace_id"] == format(trace_id, "032x")
    assert running["job_id"] == job.id and running["model"] == f"traced-job:{version.version}"
    finished = spans.get_finished_spans()
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}

    def named(name: str, kind: trace.SpanKind) -> list[ReadableSpan]:
        return [s for s in in_trace if s.name == name and s.kind == kind]

    [create_server] = named(CREATE_JOB, trace.SpanKind.SERVER)
    assert ancestors(create_server, by_id) == [f"{CREATE_JOB} CLIENT", "caller INTERNAL"]

    [run_job] = named(RUN_JOB, trace.SpanKind.CONSUMER)
    assert run_job.parent is not None and run_job.parent.span_id == create_server.context.span_id
    assert run_job.attributes is not None and run_job.attributes["modelforge.job_id"] == job.id

    batches = named(BATCH, trace.SpanKind.INTERNAL)
    assert sorted(s.attributes["modelforge.batch.size"] for s in batches if s.attributes) == [2, 4, 4]
    assert all(s.parent is not None and s.parent.span_id == run_job.context.span_id for s in batches)

    predicts = named(PREDICT, trace.SpanKind.SERVER)
    assert len(predicts) == 3, "one Predict per batch, all in the job's trace"
    every_predict = [s for s in finished if s.name == PREDICT and s.kind == trace.SpanKind.SERVER]
    assert len(every_predict) == 3, "a Predict of the job outside its trace"
    above_predict = [
        f"{PREDICT} CLIENT",
        f"{BATCH} INTERNAL",
        f"{RUN_JOB} CONSUMER",
        f"{CREATE_JOB} SERVER",
        f"{CREATE_JOB} CLIENT",
        "caller INTERNAL",
    ]
    for span in predicts:
        assert ancestors(span, by_id) == above_predict

    registry_served = [
        s for s in in_trace if s.kind == trace.SpanKind.SERVER and s.name.startswith("/modelforge.registry.v1.")
    ]
    # The jobs API resolves the ref at submit time; inference resolves it (and fetches the file) at the first batch.
    by_caller: dict[str, list[list[str]]] = {"jobs": [], "inference": []}
    for span in registry_served:
        chain = ancestors(span, by_id)
        assert chain[0] == f"{span.name} CLIENT" and chain[-1] == "caller INTERNAL", chain
        by_caller["inference" if f"{PREDICT} SERVER" in chain else "jobs"].append(chain)
    assert [chain[1] for chain in by_caller["jobs"]] == [f"{CREATE_JOB} SERVER"]
    assert by_caller["inference"], f"no registry lookup under a Predict: {sorted({s.name for s in in_trace})}"
    for chain in by_caller["inference"]:
        assert chain[chain.index(f"{PREDICT} SERVER") + 1 :] == above_predict, chain
    assert all("grpc.health" not in s.name for s in finished)


async def test_background_work_starts_no_trace(spans: InMemorySpanExporter, database_url: str, redis_url: str) -> None:
    """A SQL statement or a Redis command that no call or job started (a dependency probe, the worker polling its
    queues, a maintenance pass) is not traced; the same inside a call's span is."""

    async def ping() -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as connection:
            await connection.execute("SELECT 1")
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await client.ping()
        finally:
            await client.aclose()

    spans.clear()
    await ping()
    assert [s.name for s in spans.get_finished_spans()] == []
    with telemetry.tracer("modelforge.test").start_as_current_span("caller") as caller:
        await ping()
    traced = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    assert {s.name for s in traced} >= {"SELECT", "PING"}
    assert all(s.context.trace_id == caller.get_span_context().trace_id for s in traced)


async def test_a_call_past_its_deadline_ends_its_span_and_its_count_as_deadline_exceeded(
    spans: InMemorySpanExporter,
    inference: RunningInference,  # noqa: F811
) -> None:
    await upload(
        inference, "slow-traced", model_bytes(build_heavy(depth=1024))
    )  # seconds of work: cut short when cancelled
    await inference.stub.Predict(predict_request("slow-traced", {"x": np.ones((1, 512), np.float32)}))  # loaded
    spans.clear()
    with (
        telemetry.tracer("modelforge.test").start_as_current_span("caller"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await inference.stub.Predict(
            predict_request("slow-traced", {"x": np.ones((512, 512), np.float32)}), timeout=0.2
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def served() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if s.name == PREDICT and s.kind == trace.SpanKind.SERVER]

    await eventually(served, "the Predict's server span")
    [span] = served()
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    counted = inference.server.metrics.registry.get_sample_value(
        "modelforge_rpc_requests_total",
        {
            "grpc_service": "modelforge.inference.v1.InferenceService",
            "grpc_method": "Predict",
            "grpc_code": "DEADLINE_EXCEEDED",
        },
    )
    assert counted == 1

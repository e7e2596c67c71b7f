"""The inference service's own spans, where a prediction's time goes: cache lookup, queue wait, batch execution,
and on the first request the model load with its download, session creation and warmup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelforge_server import telemetry
from tests.fixtures.onnx_models import ModelFile
from tests.integration.inference.conftest import StartInference, predict_request, upload

PREDICT = "/modelforge.inference.v1.InferenceService/Predict"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on (set up before the servers are built, as main() does), spans kept in memory."""
    exporter = InMemorySpanExporter()
    telemetry.setup("modelforge-test", span_exporter=exporter)
    yield exporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (GrpcAioInstrumentorClient(), PsycopgInstrumentor(), RedisInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
    exporter.shutdown()  # the provider stays for the session; its exporter stops keeping spans


def chain(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """The span's name and its recorded ancestors' names, nearest first."""
    names = [span.name]
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_a_prediction_shows_where_its_time_goes(
    spans: InMemorySpanExporter, start_inference: StartInference, add_one: ModelFile
) -> None:
    async with start_inference() as inference:
        await upload(inference, "traced", add_one, labels={"modelforge.io/cache": "true"})
        spans.clear()
        with telemetry.tracer("modelforge.test").start_as_current_span("caller") as caller:
            await inference.stub.Predict(predict_request("traced", add_one.sample(batch=2)))

    trace_id = caller.get_span_context().trace_id
    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}
    named = {s.name: s for s in in_trace}
    for name in ("cache lookup", "queue wait", "batch execution", "model load"):
        assert chain(named[name], by_id)[1:] == [PREDICT, PREDICT, "caller"], chain(named[name], by_id)
    for name in ("model download", "session creation", "warmup"):
        assert chain(named[name], by_id)[1:3] == ["model load", PREDICT], chain(named[name], by_id)
    assert named["batch execution"].attributes["modelforge.batch_size"] == 2
    assert named["cache lookup"].attributes["modelforge.cache_hit"] is False
    assert dict(named["queue wait"].attributes) == {"modelforge.model": "traced", "modelforge.version": 1}
    queue, execution = named["queue wait"], named["batch execution"]
    assert queue.end_time <= execution.start_time + 1_000 and execution.start_time <= execution.end_time

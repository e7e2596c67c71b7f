"""Traces across services: a prediction is one trace from the caller through inference into the registry.

The registry and inference are built by their production `build` functions after tracing is set up, as their
`main()` does, and spans are kept in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelforge_server import telemetry
from tests.fixtures.onnx_models import ModelFile
from tests.integration.inference.conftest import (  # noqa: F401
    RunningInference,
    inference,
    predict_request,
    registry,
    registry_settings,
    start_inference,
    upload,
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

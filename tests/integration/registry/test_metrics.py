"""The registry's /metrics after real traffic, and its own spans around upload validation and blob writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelforge.registry.v1 import registry_pb2 as pb
from modelforge_server import telemetry
from tests.fixtures.metrics import Samples, scrape
from tests.fixtures.servers import RunningRegistry, upload_model
from tests.integration.registry.calls import failure

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RESULTS = (
    "ok",
    "too_large",
    "size_mismatch",
    "checksum_mismatch",
    "invalid_onnx",
    "external_data",
    "invalid",
    "not_found",
    "cancelled",
    "unavailable",
    "error",
)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
async def metrics_port(registry: RunningRegistry) -> AsyncIterator[int]:
    """The registry's metrics served on a free port, as `app.serve` serves them on MODELFORGE_METRICS_PORT."""
    endpoint = registry.server.metrics.serve("127.0.0.1", 0)
    try:
        yield endpoint.port
    finally:
        endpoint.close()


async def test_uploads_count_by_result_and_bytes_and_versions_by_state(registry, metrics_port, mlp, add_one) -> None:
    before = await asyncio.to_thread(scrape, metrics_port)
    assert value(before, "modelforge_registry_versions", state="READY") == 0
    await upload_model(registry.stub, "counted", mlp.data)
    code, reason, _ = await failure(upload_model(registry.stub, "corrupted", add_one.data, sha256="0" * 64))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")
    after = await asyncio.to_thread(scrape, metrics_port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    uploads = {result: moved("modelforge_registry_uploads_total", result=result) for result in RESULTS}
    assert uploads == {result: 1 if result in ("ok", "checksum_mismatch") else 0 for result in RESULTS}
    assert moved("modelforge_registry_upload_received_bytes_total") == mlp.size + add_one.size
    # Read from PostgreSQL: the refused upload created neither a model nor a file.
    assert value(after, "modelforge_registry_versions", state="READY") == 1
    assert value(after, "modelforge_registry_versions", state="ARCHIVED") == 0
    assert value(after, "modelforge_registry_models") == 1
    assert value(after, "modelforge_registry_blobs") == 1
    assert value(after, "modelforge_registry_blob_bytes") == mlp.size

    await upload_model(registry.stub, "counted", mlp.data)  # the same bytes again: a second version, one file
    await registry.stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="counted", version=1))
    later = await asyncio.to_thread(scrape, metrics_port)
    assert value(later, "modelforge_registry_versions", state="READY") == 1
    assert value(later, "modelforge_registry_versions", state="ARCHIVED") == 1
    assert value(later, "modelforge_registry_blobs") == 1
    labels = {"grpc_service": "modelforge.registry.v1.RegistryService", "grpc_method": "UploadModelVersion"}
    assert value(later, "modelforge_rpc_requests_total", **labels, grpc_code="OK") == 2
    assert value(later, "modelforge_rpc_requests_total", **labels, grpc_code="INVALID_ARGUMENT") == 1


async def test_versions_seen_through_another_replica_are_counted(registry, registry_replica, add_one) -> None:
    await upload_model(registry_replica.stub, "elsewhere", add_one.data)
    endpoint = registry.server.metrics.serve("127.0.0.1", 0)
    try:
        samples = await asyncio.to_thread(scrape, endpoint.port)
    finally:
        endpoint.close()
    assert value(samples, "modelforge_registry_versions", state="READY") == 1
    assert value(samples, "modelforge_registry_uploads_total", result="ok") == 0  # counted where it happened


async def open_watches(port: int) -> float:
    return value(await asyncio.to_thread(scrape, port), "modelforge_registry_watch_streams")


async def test_watch_streams_open_go_up_and_down(registry, metrics_port) -> None:
    assert await open_watches(metrics_port) == 0
    watches = [registry.stub.WatchModelEvents(pb.WatchModelEventsRequest()) for _ in range(2)]
    for watch in watches:
        assert (await asyncio.wait_for(watch.read(), 30)).event.type == pb.MODEL_EVENT_TYPE_WATCH_STARTED
    assert await open_watches(metrics_port) == 2
    watches[0].cancel()
    deadline = asyncio.get_running_loop().time() + 30
    while (open_now := await open_watches(metrics_port)) != 1:  # the server hears of the cancellation later
        assert asyncio.get_running_loop().time() < deadline, f"{open_now} watch streams still counted as open"
        await asyncio.sleep(0.05)
    watches[1].cancel()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this module, with spans kept in memory; instrumentations are removed afterwards."""
    exporter = InMemorySpanExporter()
    assert telemetry.setup("modelforge-registry", span_exporter=exporter).tracing
    yield exporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (GrpcAioInstrumentorClient(), PsycopgInstrumentor(), RedisInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


async def test_upload_validation_and_blob_write_are_spans_of_the_upload(spans, registry, mlp) -> None:
    spans.clear()
    # A client span without a parent is background work, which is not traced: the upload is a caller's.
    with telemetry.tracer("modelforge.test").start_as_current_span("caller"):
        await upload_model(registry.stub, "traced", mlp.data)
    finished = spans.get_finished_spans()
    method = "/modelforge.registry.v1.RegistryService/UploadModelVersion"
    (served,) = [s for s in finished if s.name == method and s.kind == trace.SpanKind.SERVER]
    for name in ("upload validation", "blob write"):
        (span,) = [s for s in finished if s.name == name]
        assert span.context.trace_id == served.context.trace_id
        assert span.attributes is not None
        assert (span.attributes["modelforge.model"], span.attributes["modelforge.size_bytes"]) == ("traced", mlp.size)
        parent = span.parent
        while parent is not None and parent.span_id != served.context.span_id:  # under the server span
            parent = next(s for s in finished if s.context.span_id == parent.span_id).parent
        assert parent is not None, f"{name} is not inside the UploadModelVersion span"

"""Metrics, health names, traces and logs of a server built by app.build_server, over real localhost channels.

The service under test is a small RegistryService servicer defined here (two RPCs, plain domain errors), so that
the plumbing is checked on its own; the services' own tests cover their RPCs.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_server import app, embedded, errors, logs, telemetry
from modelforge_server.metrics import Metrics
from modelforge_server.settings import ServerSettings
from tests.fixtures.metrics import scrape

REGISTRY = "modelforge.registry.v1.RegistryService"
HEALTH = "grpc.health.v1.Health"
SERVICE_LOG = logging.getLogger("modelforge.test.catalogue")


class Catalogue(registry_pb2_grpc.RegistryServiceServicer):
    """Knows one model, `present`; downloads stream three chunks."""

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetModelResponse:
        SERVICE_LOG.info("looking up a model", extra={"model": request.name})
        if request.name != "present":
            raise errors.NotFound(f"no model named {request.name!r}")
        return registry_pb2.GetModelResponse(model=registry_pb2.Model(name="present"))

    async def DownloadModelVersion(
        self, request: registry_pb2.DownloadModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.DownloadModelVersionResponse]:
        for _ in range(3):
            yield registry_pb2.DownloadModelVersionResponse(chunk=b"\0" * 16)


def catalogue_api() -> app.Api:
    return app.Api(
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
        Catalogue(),
        registry_pb2_grpc.add_RegistryServiceServicer_to_server,
    )


@pytest.fixture
async def server() -> AsyncIterator[tuple[app.Server, grpc.aio.Channel]]:
    built = app.build_server([catalogue_api()], domain="modelforge.test", settings=ServerSettings())
    port = built.add_port("127.0.0.1:0")
    await built.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield built, channel
    await built.stop(None)


def requests_total(samples: dict, service: str, method: str, code: str) -> float:
    labels = (("grpc_code", code), ("grpc_method", method), ("grpc_service", service))
    return samples.get(("modelforge_rpc_requests_total", labels), 0.0)


def rpc_stat(samples: dict, name: str, service: str, method: str) -> float:
    return samples.get((name, (("grpc_method", method), ("grpc_service", service))), 0.0)


async def test_metrics_count_rpcs_by_method_and_final_code(server: tuple[app.Server, grpc.aio.Channel]) -> None:
    built, channel = server
    endpoint = built.metrics.serve("127.0.0.1", 0)
    try:
        before = await asyncio.to_thread(scrape, endpoint.port)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            await registry.GetModel(registry_pb2.GetModelRequest(name="present"))
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await registry.GetModel(registry_pb2.GetModelRequest(name="absent"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for _ in range(2):
            chunks = [r async for r in registry.DownloadModelVersion(registry_pb2.DownloadModelVersionRequest())]
            assert len(chunks) == 3
        await health.Check(health_pb2.HealthCheckRequest(service=""))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry.ListModels(registry_pb2.ListModelsRequest())  # not implemented by Catalogue
        unimplemented = caught.value.code().name

        after = await asyncio.to_thread(scrape, endpoint.port)
    finally:
        endpoint.close()
    assert not [name for name, _ in after if name.endswith("_created")]  # none beside the counters and histograms

    def moved(service: str, method: str, code: str) -> float:
        return requests_total(after, service, method, code) - requests_total(before, service, method, code)

    assert moved(REGISTRY, "GetModel", "OK") == 5
    assert moved(REGISTRY, "GetModel", "NOT_FOUND") == 3
    assert moved(REGISTRY, "DownloadModelVersion", "OK") == 2
    assert moved(REGISTRY, "ListModels", unimplemented) == 1  # the code the client saw
    assert moved(HEALTH, "Check", "OK") == 1
    assert moved(HEALTH, "Check", "NOT_FOUND") == 1
    count = "modelforge_rpc_duration_seconds_count"
    assert rpc_stat(after, count, REGISTRY, "GetModel") - rpc_stat(before, count, REGISTRY, "GetModel") == 8
    assert rpc_stat(after, "modelforge_rpc_in_flight", REGISTRY, "GetModel") == 0
    assert after[("process_resident_memory_bytes", ())] > 0
    assert ("process_cpu_seconds_total", ()) in after


async def watch_until(
    health: health_pb2_grpc.HealthStub, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
) -> None:
    """Returns once Health.Watch reports `status` for `service` (the stream's first message is the current one)."""
    call = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
    try:
        async for update in call:
            if update.status == status:
                return
    finally:
        call.cancel()


async def test_readiness_follows_redis_while_liveness_stays_serving(tmp_path: Path) -> None:
    port = embedded.free_port()
    url, stop_redis = embedded.start_redis(tmp_path / "first", port=port)
    client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    built = app.build_server([catalogue_api()], domain="modelforge.test", settings=ServerSettings())
    built.watch_dependency("redis", client.ping, interval=0.1)
    built.watch_dependency("cache", client.ping, interval=0.1, required=False)
    grpc_port = built.add_port("127.0.0.1:0")
    await built.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            await watch_until(health, "", serving)

            stop_redis()
            await watch_until(health, "", not_serving)
            await watch_until(health, REGISTRY, not_serving)
            await watch_until(health, "dependency/redis", not_serving)
            await watch_until(health, "dependency/cache", not_serving)
            live = await health.Check(health_pb2.HealthCheckRequest(service=app.LIVENESS))
            assert live.status == serving
            samples = built.metrics.exposition().decode()
            assert 'modelforge_dependency_up{dependency="redis"} 0.0' in samples

            _, stop_redis = embedded.start_redis(tmp_path / "second", port=port)
            await watch_until(health, "", serving)
            await watch_until(health, "dependency/redis", serving)
            assert 'modelforge_dependency_up{dependency="redis"} 1.0' in built.metrics.exposition().decode()
    finally:
        await built.stop(None)
        await client.aclose()
        stop_redis()


async def test_an_optional_dependency_does_not_gate_readiness(tmp_path: Path) -> None:
    async def down() -> None:
        raise ConnectionError("refused")

    built = app.build_server([catalogue_api()], domain="modelforge.test", settings=ServerSettings())
    built.watch_dependency("cache", down, interval=0.1, required=False)
    port = built.add_port("127.0.0.1:0")
    await built.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await watch_until(health, "dependency/cache", health_pb2.HealthCheckResponse.NOT_SERVING)
            ready = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await built.stop(None)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this module, with spans kept in memory; instrumentations are removed afterwards."""
    exporter = InMemorySpanExporter()
    configured = telemetry.setup("modelforge-test", span_exporter=exporter)
    assert configured.tracing
    yield exporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (GrpcAioInstrumentorClient(), PsycopgInstrumentor(), RedisInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("modelforge-test"))
    SERVICE_LOG.addHandler(handler)
    SERVICE_LOG.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        SERVICE_LOG.removeHandler(handler)


async def test_rpc_spans_and_log_lines_share_one_trace(
    spans: InMemorySpanExporter, server: tuple[app.Server, grpc.aio.Channel], log_lines: io.StringIO
) -> None:
    _, channel = server
    spans.clear()
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    # A client span without a parent is background work, which is not traced: the call is a caller's.
    with logs.bind(job_id="job-1"), telemetry.tracer("modelforge.test").start_as_current_span("caller"):
        await registry_pb2_grpc.RegistryServiceStub(channel).GetModel(registry_pb2.GetModelRequest(name="present"))

    finished = {(s.name, s.kind): s for s in spans.get_finished_spans()}
    assert all("Health" not in name for name, _ in finished), "health checks are not traced"
    client = finished[(f"/{REGISTRY}/GetModel", trace.SpanKind.CLIENT)]
    served = finished[(f"/{REGISTRY}/GetModel", trace.SpanKind.SERVER)]
    assert served.context.trace_id == client.context.trace_id
    assert served.parent is not None and served.parent.span_id == client.context.span_id

    (line,) = [json.loads(text) for text in log_lines.getvalue().splitlines()]
    assert line["service"] == "modelforge-test"
    assert line["trace_id"] == format(served.context.trace_id, "032x")
    assert line["span_id"] == format(served.context.span_id, "016x")
    assert line["model"] == "present"
    assert line["message"] == "looking up a model"


async def test_a_queued_message_carries_the_trace_to_its_consumer(spans: InMemorySpanExporter) -> None:
    spans.clear()
    with telemetry.tracer("modelforge.test").start_as_current_span("CreateJob") as producer:
        carrier = telemetry.inject()

    def consume() -> None:
        assert not trace.get_current_span().get_span_context().is_valid
        with telemetry.attached(carrier, "run_job", attributes={"modelforge.job_id": "job-1"}):
            pass

    contextvars.Context().run(consume)  # an empty context, as on the worker's own thread
    (consumer,) = [s for s in spans.get_finished_spans() if s.name == "run_job"]
    assert consumer.kind == trace.SpanKind.CONSUMER
    assert consumer.context.trace_id == producer.get_span_context().trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.get_span_context().span_id


def test_tracing_is_off_and_the_metrics_port_is_the_default_without_settings() -> None:
    configured = telemetry.setup("modelforge-registry", ServerSettings(), metrics_port=9101, environ={})
    assert (configured.metrics_port, configured.provider) == (9101, None)
    disabled = telemetry.setup("modelforge-jobs", metrics_port=9103, environ={"MODELFORGE_METRICS_PORT": "0"})
    assert disabled.metrics_port == 0
    assert telemetry.setup("modelforge-jobs", None, environ={}).serve_metrics(Metrics(), "127.0.0.1") is None


_STOP_WITH_SPANS_BUFFERED = """
import logging, sys, time
from modelforge_server import logs, telemetry

tel = telemetry.setup("modelforge-registry", environ={"MODELFORGE_OTLP_ENDPOINT": sys.argv[1]})
with telemetry.tracer("test").start_as_current_span("ModelInfer"):
    pass
began = time.monotonic()
tel.shutdown()
print(round(time.monotonic() - began, 1), flush=True)
filters = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").filters
print(any(isinstance(f, logs.Throttle) for f in filters), flush=True)  # its failures logged once a minute
"""


def test_a_collector_that_never_answers_holds_a_stopping_process_for_at_most_the_flush_time() -> None:
    """Its last spans are given up after FLUSH_SECONDS, where the exporter's own defaults waited 30 s to flush and
    more at interpreter exit: past a container's termination grace period."""
    with socket.socket() as hung:  # takes connections, never answers: a collector that hangs
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        began = time.monotonic()
        stopped = subprocess.run(
            [sys.executable, "-c", _STOP_WITH_SPANS_BUFFERED, endpoint], capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stderr
    took_to_flush, throttled = stopped.stdout.split()
    assert float(took_to_flush) <= telemetry.FLUSH_SECONDS + 0.5  # the flush gave up in time
    assert throttled == "True"
    assert took < 20  # and nothing after it waited on the collector (the process's start included)
    assert "DEADLINE_EXCEEDED" in stopped.stderr  # the spans were given up, as the exporter says

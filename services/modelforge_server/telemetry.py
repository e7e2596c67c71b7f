"""Traces and the metrics port: set up once in a process's main(), never at import.

Tracing is off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``MODELFORGE_OTLP_ENDPOINT`` names an OTLP/gRPC collector
(``http://host:port``, ``https://`` for TLS; :func:`check_endpoint` refuses other forms at start).
Off means no TracerProvider, no instrumentation and no interceptor: spans started through :func:`tracer` are the
OpenTelemetry API's no-op spans. On, :func:`setup` installs the TracerProvider and the maintained
instrumentations: gRPC (server spans through :func:`server_interceptor`, client spans on every ``grpc.aio``
channel opened afterwards), psycopg and Redis. Health checks and reflection are never traced, nor is background
work that no call or job started: a client span without a parent (a dependency probe's ``SELECT 1`` or ``PING``,
the jobs worker polling its queues, a maintenance pass) is not sampled, so an idle suite sends no spans.

Context crosses process boundaries in gRPC metadata (the instrumentation does it) and in Dramatiq messages, where
the sender puts :func:`inject` into the message and the actor runs inside :func:`attached`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind

from modelforge_server import logs
from modelforge_server.metrics import Endpoint, Metrics
from modelforge_server.settings import SettingsError, from_env

__all__ = [
    "Telemetry",
    "TelemetrySettings",
    "attached",
    "check_endpoint",
    "end_current_span",
    "extract",
    "inject",
    "read_settings",
    "server_interceptor",
    "setup",
    "tracer",
    "tracing_enabled",
]

log = logging.getLogger("modelforge.telemetry")

# How long one export to the collector may take, and how long a process that stops waits for its last spans.
EXPORT_TIMEOUT_SECONDS = 2.0
FLUSH_SECONDS = 2.0
# The exporter's lines about failed exports (a collector down) pass at most this often (seconds).
EXPORT_FAILURES_LOGGED_EVERY = 60.0
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"

# The standard OpenTelemetry variable; the exporter reads it (and OTEL_EXPORTER_OTLP_HEADERS etc.) itself.
OTEL_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"


@dataclass(frozen=True)
class TelemetrySettings:
    """MODELFORGE_OTLP_ENDPOINT, MODELFORGE_TRACE_SAMPLE_RATIO and MODELFORGE_METRICS_PORT."""

    otlp_endpoint: str | None = None
    trace_sample_ratio: float = 1.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise SettingsError(
                f"MODELFORGE_TRACE_SAMPLE_RATIO={self.trace_sample_ratio!r} is invalid: it takes a number from 0 to 1"
            )
        if self.otlp_endpoint is not None:
            check_endpoint("MODELFORGE_OTLP_ENDPOINT", self.otlp_endpoint)


def read_settings(environ: Mapping[str, str] | None = None) -> TelemetrySettings:
    """TelemetrySettings from the environment, with OTEL_EXPORTER_OTLP_ENDPOINT checked as MODELFORGE_OTLP_ENDPOINT
    is: a process (and `modelforge up`, for every child) refuses either at start rather than export to nowhere."""
    env = os.environ if environ is None else environ
    own = from_env(TelemetrySettings, env)
    if otel := env.get(OTEL_ENDPOINT_ENV):
        check_endpoint(OTEL_ENDPOINT_ENV, otel)
    return own


def check_endpoint(key: str, endpoint: str) -> None:
    """Refuses an endpoint the OTLP/gRPC exporter cannot reach: it takes http://host:port or https://host:port, or
    the bare host:port, and dials host:port.

    The exporter accepts anything: it dials whatever string it is given as a gRPC target and logs a failed export
    every few seconds for the life of the process. A path is the OTLP/HTTP exporter's (:4318/v1/traces), which
    this one would drop, dialling an HTTP port with gRPC.

    Raises:
        SettingsError: naming `key` and what it takes.
    """
    parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = parts.port  # ValueError when it is not a number from 0 to 65535
    except ValueError:
        port = None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or any(c.isspace() for c in endpoint)  # urlsplit drops leading ones; the exporter does not
    ):
        raise SettingsError(
            f"{key}={endpoint!r} is invalid: it takes the address of an OTLP/gRPC collector, http://host:port or "
            "https://host:port (such as http://otel-collector:4317)"
        )


@dataclass(frozen=True)
class Telemetry:
    """What :func:`setup` configured for this process; pass it to ``app.serve`` to expose the metrics port."""

    service: str
    metrics_port: int
    """The HTTP port of /metrics; 0 when metrics are not served."""
    provider: TracerProvider | None
    """None while tracing is off."""

    @property
    def tracing(self) -> bool:
        return self.provider is not None

    def tracer(self, name: str) -> trace.Tracer:
        return tracer(name)

    def serve_metrics(self, metrics: Metrics, host: str) -> Endpoint | None:
        """Serves `metrics` on host:metrics_port; None (nothing served) when the port is 0.

        ``app.serve`` does this for gRPC servers; processes without one (jobs workers) call it themselves and
        ``close()`` the endpoint when they stop.
        """
        if not self.metrics_port:
            return None
        endpoint = metrics.serve(host, self.metrics_port)
        log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
        return endpoint

    def shutdown(self) -> None:
        """Flushes spans still buffered, for at most FLUSH_SECONDS: a collector that is down or hung must not hold
        the process's exit past its grace period (spans it did not take are lost)."""
        if self.provider is not None and not self.provider.force_flush(round(FLUSH_SECONDS * 1000)):
            log.warning("spans still buffered were not exported within %g s: the trace collector did not take them",
                        FLUSH_SECONDS)  # fmt: skip


def setup(
    service_name: str,
    settings: object | None = None,
    *,
    metrics_port: int = 0,
    environ: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
) -> Telemetry:
    """Configures tracing for this process and decides the metrics port. Call it once, first thing in main().

    ``metrics_port`` is the service's default (9101 registry, 9102 inference, 9103 jobs); MODELFORGE_METRICS_PORT
    overrides it and 0 disables. ``span_exporter`` is for tests: spans go to it synchronously, whatever the
    environment says. ``settings`` is the service's settings object; its ``metrics_port``/``otlp_endpoint``
    attributes, when it has them, win over the variables.
    """
    env = os.environ if environ is None else environ
    own = read_settings(env)
    port = _pick(getattr(settings, "metrics_port", None), own.metrics_port, metrics_port)
    endpoint = _pick(getattr(settings, "otlp_endpoint", None), own.otlp_endpoint, env.get(OTEL_ENDPOINT_ENV) or None)
    if endpoint is None and span_exporter is None:
        return Telemetry(service_name, port, None)
    provider = _provider(service_name, own.trace_sample_ratio)
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    if endpoint is not None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=endpoint, insecure=not endpoint.startswith("https://"), timeout=EXPORT_TIMEOUT_SECONDS
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
        # It logs every failed export of a collector that is down, an ERROR every few seconds per process.
        logging.getLogger(_EXPORTER_LOGGER).addFilter(logs.Throttle(EXPORT_FAILURES_LOGGED_EVERY))
        log.info("exporting traces to %s", endpoint)
    _instrument(provider)
    return Telemetry(service_name, port, provider)


def _pick(*candidates: Any) -> Any:
    return next((c for c in candidates if c is not None), None)


def _provider(service_name: str, ratio: float) -> TracerProvider:
    """The process's TracerProvider: created once; later calls (tests building several services) reuse it."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    resource = Resource.create(
        {
            "service.name": service_name,
            "service.namespace": "modelforge",
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    # Not shut down at interpreter exit, where the SDK would flush again with no bound: Telemetry.shutdown flushes.
    provider = TracerProvider(resource=resource, sampler=ParentBased(_CallsAndJobs(ratio)), shutdown_on_exit=False)
    trace.set_tracer_provider(provider)
    return provider


class _CallsAndJobs(Sampler):
    """The sampler of traces that start here: RPCs served and jobs run, at ``ratio``; a client span without a
    parent is background work (probes, queue polling, maintenance), never sampled. Spans with a parent follow it
    (the ParentBased around this)."""

    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if kind == SpanKind.CLIENT:
            return SamplingResult(Decision.DROP)
        return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"CallsAndJobs{{{self._ratio.get_description()}}}"


def end_current_span(code: grpc.StatusCode) -> None:
    """Marks the current server span as ended with `code`, for a call whose end the gRPC interceptor does not see
    (cancelled, or past its deadline); nothing while tracing is off."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))


def _untraced() -> Any:
    return filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))


def _instrument(provider: TracerProvider) -> None:
    """Client spans on grpc.aio channels, spans for SQL statements and Redis commands; once per process."""
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    # Any: their base class, BaseInstrumentor, lives in a module that opts out of type checking.
    instrumentors: tuple[tuple[Any, dict[str, Any]], ...] = (
        (GrpcAioInstrumentorClient(filter_=_untraced()), {}),
        (PsycopgInstrumentor(), {"enable_commenter": False}),
        (RedisInstrumentor(), {}),
    )
    for instrumentor, options in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider, **options)


def tracing_enabled() -> bool:
    """True once :func:`setup` installed a TracerProvider in this process."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def server_interceptor() -> grpc.aio.ServerInterceptor | None:
    """The gRPC server-span interceptor (health and reflection left out), or None while tracing is off."""
    if not tracing_enabled():
        return None
    return aio_server_interceptor(filter_=_untraced())


def tracer(name: str) -> trace.Tracer:
    """A tracer for a module's own spans (``tracer(__name__).start_as_current_span("batch")``); no-op while off."""
    return trace.get_tracer(name)


def inject(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """The current trace context as a dict of strings (W3C traceparent), to put into a queued message."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context that :func:`inject` stored; an empty one when the message carries none."""
    return propagate.extract(dict(carrier or {}))


@contextlib.contextmanager
def attached(
    carrier: Mapping[str, str] | None, name: str, *, attributes: Mapping[str, Any] | None = None
) -> Iterator[trace.Span]:
    """Runs the block inside a CONSUMER span whose parent is the context carried by a message.

    Use it in the coroutine itself (Dramatiq runs async actors on another thread, where the worker thread's
    context does not reach).
    """
    token = otel_context.attach(extract(carrier))
    try:
        with tracer("modelforge.messages").start_as_current_span(
            name, kind=trace.SpanKind.CONSUMER, attributes=dict(attributes or {})
        ) as span:
            yield span
    finally:
        otel_context.detach(token)

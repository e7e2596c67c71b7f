"""Prometheus metrics: one registry per server process, RPC metrics for every service, and the HTTP exposition.

Every service gets, from :func:`modelforge_server.app.build_server`:

- ``modelforge_rpc_requests_total{grpc_service, grpc_method, grpc_code}``: finished RPCs by final status code;
- ``modelforge_rpc_duration_seconds{grpc_service, grpc_method}``: a latency histogram (to the end of the stream
  for streaming RPCs);
- ``modelforge_rpc_in_flight{grpc_service, grpc_method}``: RPCs being handled now;
- ``modelforge_dependency_up{dependency}``: 1 while a watched dependency answers its health check, else 0;
- ``process_resident_memory_bytes``, ``process_cpu_seconds_total`` and the rest of the process collector.

A service declares its own metrics on the same :class:`Metrics` object (``metrics.counter(...)``), so they are
served on the same port. Names follow the Prometheus conventions: a ``modelforge_`` prefix, base units
(``_seconds``, ``_bytes``), and ``_total`` added by the client library to counters.

Several processes of one role (the jobs workers that the ``dramatiq`` command forks) use prometheus_client's
multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory shared by those processes before they
start; every process then writes its samples there, and one exposition process
(``--fork-function modelforge_server.metrics:serve_multiprocess``) sums them. Counters and histograms add up
across processes, and gauges are combined over live processes only (summed, unless the gauge says otherwise), so
nothing is counted twice or lost when a worker restarts. Processes that each serve gRPC (registry, inference, jobs
API replicas) each serve their own port instead; Prometheus scrapes every replica.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    start_http_server,
)

from modelforge_server.settings import from_env

__all__ = [
    "LATENCY_BUCKETS",
    "Endpoint",
    "ExpositionSettings",
    "Metrics",
    "multiprocess_enabled",
    "process_exiting",
    "serve_multiprocess",
]

log = logging.getLogger("modelforge.metrics")

# From half a millisecond (a cache hit) to a minute (a large upload or a slow batch).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    """True when prometheus_client writes samples to a shared directory (the variable must be set before start)."""
    return bool(os.environ.get(_MULTIPROC_ENV))


def process_exiting() -> None:
    """In multiprocess mode, takes this exiting process's live gauges out of the sums (prometheus_client cannot
    tell by itself that a process is gone); elsewhere does nothing. Its counters and histograms stay counted."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())


@dataclass(frozen=True)
class ExpositionSettings:
    """Where a process serves its metrics: MODELFORGE_HOST and MODELFORGE_METRICS_PORT (0 disables)."""

    host: str = "127.0.0.1"
    metrics_port: int = 0


class Metrics:
    """The metrics of one server process, in their own registry (so tests can build many servers in one process)."""

    def __init__(self, *, registry: CollectorRegistry | None = None, process_collector: bool = True) -> None:
        # No `_created` series beside each counter and histogram (prometheus_client's default, which doubles the
        # series and which Prometheus does not use): a setting of the library, process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if process_collector and not multiprocess_enabled():
            ProcessCollector(registry=self.registry)
        self.rpc_requests = self.counter(
            "modelforge_rpc_requests",
            "RPCs finished, by method and final status code.",
            ("grpc_service", "grpc_method", "grpc_code"),
        )
        self.rpc_duration = self.histogram(
            "modelforge_rpc_duration_seconds",
            "Time from the start of an RPC to its status, streams included.",
            ("grpc_service", "grpc_method"),
        )
        self.rpc_in_flight = self.gauge(
            "modelforge_rpc_in_flight", "RPCs being handled now.", ("grpc_service", "grpc_method")
        )
        # Across worker processes, the lowest: 1 while every process reaches the dependency, 0 once one does not
        # (a sum would read 2 for two processes that both reach it).
        self.dependency_up = self.gauge(
            "modelforge_dependency_up",
            "1 while a dependency passes its health check, 0 while it fails.",
            ("dependency",),
            multiprocess_mode="livemin",
        )

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """Declares a counter; exposed as ``<name>_total``."""
        return Counter(name, documentation, labelnames, registry=self.registry)

    def gauge(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, multiprocess_mode: str = "livesum"
    ) -> Gauge:
        """Declares a gauge; across worker processes it is summed over the live ones unless told otherwise."""
        return Gauge(name, documentation, labelnames, registry=self.registry, multiprocess_mode=multiprocess_mode)  # type: ignore[arg-type]

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        """Declares a histogram; name it with its unit (``_seconds``, ``_bytes``) or as a plain count."""
        return Histogram(name, documentation, labelnames, registry=self.registry, buckets=tuple(buckets))

    def collector_registry(self) -> CollectorRegistry:
        """What to expose: this registry, or the sum over all processes in multiprocess mode."""
        if not multiprocess_enabled():
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry

    def exposition(self) -> bytes:
        """The Prometheus text format of everything declared here."""
        return generate_latest(self.collector_registry())

    def serve(self, host: str, port: int) -> Endpoint:
        """Serves ``/metrics`` over HTTP on a daemon thread; port 0 picks a free port (see Endpoint.port)."""
        server, thread = start_http_server(port, addr=host, registry=self.collector_registry())
        return Endpoint(server, thread)


class Endpoint:
    """A running metrics HTTP endpoint."""

    def __init__(self, server: Any, thread: Any) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_multiprocess() -> int:
    """Entry point of the exposition process for forked workers: sums PROMETHEUS_MULTIPROC_DIR over processes.

    Run it with ``dramatiq ... --fork-function modelforge_server.metrics:serve_multiprocess``; it listens on
    MODELFORGE_HOST:MODELFORGE_METRICS_PORT until the dramatiq master stops it. With that port unset or 0 it
    serves nothing and says so: the workers serve none of their own in this mode, so no metrics are served at all.
    """
    if not multiprocess_enabled():
        raise RuntimeError(f"{_MULTIPROC_ENV} is not set; the workers have nowhere to write their metrics")
    settings = from_env(ExpositionSettings)
    if settings.metrics_port == 0:
        log.warning(
            "no metrics are served: MODELFORGE_METRICS_PORT is unset or 0, and in multiprocess mode (%s) only "
            "this fork function serves the workers' metrics; set MODELFORGE_METRICS_PORT to serve them "
            "(MODELFORGE_WORKER_METRICS_PORT does not apply here)",
            _MULTIPROC_ENV,
        )
        return 0
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    while True:  # the dramatiq master stops this process with SIGTERM, which exits through its handler
        signal.pause()

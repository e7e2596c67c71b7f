"""The inference service's Prometheus metrics, per model and version, on the process's Metrics registry.

Two kinds, chosen by what they cost on the prediction path:

- read when Prometheus scrapes, from the counters the engine keeps anyway for GetModelStatistics, so they add
  nothing to a prediction: requests, failed requests, executions, items, cache hits and misses, queue depth,
  loaded models and their estimated memory;
- recorded as things happen: the batch size, queue time and compute time histograms (one observation per request
  or execution, on the event loop: a bisect and two additions, no lock), and the rare events through
  prometheus_client's own counters: rejected requests by reason, loads with their duration, unloads by reason,
  and the bytes PredictStream has handed to the transport (one addition per chunk of up to a MiB).

Every series carries the labels ``model`` (the registry's name) and ``version`` (the version number as text).
Names follow the Prometheus conventions: ``modelforge_inference_`` prefix, base units, ``_total`` on counters.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from modelforge_inference.domain import LoadedModel, ModelStatistics
from modelforge_server.metrics import LATENCY_BUCKETS, Metrics

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "DURATION_BUCKETS",
    "InferenceMetrics",
    "LoopHistogram",
    "Rejection",
    "UnloadReason",
    "VersionInstruments",
]

PREFIX = "modelforge_inference_"
LABELS = ("model", "version")
# Queue and compute times of small models are well under the server-wide buckets' first half millisecond.
DURATION_BUCKETS = (0.00005, 0.0001, 0.00025, *LATENCY_BUCKETS)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Rejection(enum.Enum):
    """Why a request was refused or dropped without an answer, as the ``reason`` label says it."""

    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    INVALID = "invalid"
    CANCELLED = "cancelled"


class UnloadReason(enum.Enum):
    """Why a loaded version was released, as the ``reason`` label says it."""

    REQUESTED = "requested"  # UnloadModel or RepositoryModelUnload
    EVICTED = "evicted"  # least recently used, beyond MODELFORGE_MAX_LOADED_MODELS or the memory budget
    RECONFIGURED = "reconfigured"  # its labels changed how it is served: reloaded with the new settings
    RETIRED = "retired"  # deleted or archived in the registry


class LoopHistogram:
    """A histogram written from the event loop thread only, so it needs no lock; read when Prometheus scrapes.

    A scrape on another thread copies the bucket counts in one step (the GIL makes the list copy atomic), so
    the buckets and the count always agree; the sum may miss an observation made during the copy.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (upper bound, count) pairs ending with +Inf, and the sum."""
        counts, total = list(self.counts), self.total
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), float(running)))
        return cumulative, total


@dataclass(frozen=True, slots=True)
class VersionInstruments:
    """The histograms of one model version, held by the engine's counters of that version."""

    batch_size: LoopHistogram = field(default_factory=lambda: LoopHistogram(BATCH_SIZE_BUCKETS))
    queue_seconds: LoopHistogram = field(default_factory=lambda: LoopHistogram(DURATION_BUCKETS))
    compute_seconds: LoopHistogram = field(default_factory=lambda: LoopHistogram(DURATION_BUCKETS))


class InferenceMetrics:
    """Declares the inference metrics on ``metrics`` (the registry /metrics serves) and records into them.

    Args:
        metrics: The process's metrics; the server built with the same object serves these on its port.
        statistics: The engine's counters of every model version seen (read at scrape time, on the HTTP thread).
        instruments: The histograms of every model version seen, by (name, version) (read at scrape time).
        loaded: The engine's versions held now (read at scrape time).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        statistics: Callable[[], Sequence[ModelStatistics]],
        instruments: Callable[[], Sequence[tuple[tuple[str, int], VersionInstruments]]],
        loaded: Callable[[], Sequence[LoadedModel]],
    ) -> None:
        self._rejected = metrics.counter(
            PREFIX + "rejected_requests",
            "Requests refused or dropped without outputs: queue_full, deadline, invalid or cancelled.",
            (*LABELS, "reason"),
        )
        self._loads = metrics.counter(
            PREFIX + "model_loads", "Model version loads (session creation and warmup), by result.", (*LABELS, "result")
        )
        self._load_seconds = metrics.histogram(
            PREFIX + "model_load_duration_seconds",
            "Time from the start of a load (file download included) to READY.",
            LABELS,
        )
        self._unloads = metrics.counter(
            PREFIX + "model_unloads", "Model versions released, by reason.", (*LABELS, "reason")
        )
        self._streamed = metrics.counter(
            PREFIX + "streamed_bytes",
            "Bytes of PredictStream chunk messages the transport has taken (it takes them as flow control allows).",
            LABELS,
        )
        metrics.registry.register(_EngineCollector(statistics, instruments, loaded))

    def rejected(self, model: str, version: int, reason: Rejection) -> None:
        self._rejected.labels(model, str(version), reason.value).inc()

    def loaded(self, model: str, version: int, seconds: float) -> None:
        self._loads.labels(model, str(version), "ok").inc()
        self._load_seconds.labels(model, str(version)).observe(seconds)

    def load_failed(self, model: str, version: int) -> None:
        self._loads.labels(model, str(version), "failed").inc()

    def unloaded(self, model: str, version: int, reason: UnloadReason) -> None:
        self._unloads.labels(model, str(version), reason.value).inc()

    def forget(self, model: str, version: int) -> None:
        """Drops the series of a version deleted from the registry (those read from the engine's counters go with
        them), so that a long-running service does not export every version it ever served."""
        labels = (model, str(version))
        for reason in Rejection:
            self._rejected.remove(*labels, reason.value)
        for result in ("ok", "failed"):
            self._loads.remove(*labels, result)
        for why in UnloadReason:
            self._unloads.remove(*labels, why.value)
        self._load_seconds.remove(*labels)
        self._streamed.remove(*labels)

    def streamed(self, model: str, version: int) -> Callable[[float], None]:
        """What one stream calls with the size of each chunk message the transport took."""
        return self._streamed.labels(model, str(version)).inc


class _EngineCollector(Collector):
    """The series derived from the engine's own counters and table, computed when Prometheus scrapes."""

    def __init__(
        self,
        statistics: Callable[[], Sequence[ModelStatistics]],
        instruments: Callable[[], Sequence[tuple[tuple[str, int], VersionInstruments]]],
        loaded: Callable[[], Sequence[LoadedModel]],
    ) -> None:
        self._statistics = statistics
        self._instruments = instruments
        self._loaded = loaded

    def describe(self) -> Iterable[Metric]:
        return list(self._families([], [], []))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._statistics(), self._instruments(), self._loaded()))

    @staticmethod
    def _families(
        statistics: Sequence[ModelStatistics],
        instruments: Sequence[tuple[tuple[str, int], VersionInstruments]],
        loaded: Sequence[LoadedModel],
    ) -> Iterator[Metric]:
        histograms = (
            ("batch_size", "Items (rows) per model execution; one observation per execution.", "batch_size"),
            (
                "queue_duration_seconds",
                "Time a request waited in the version's queue before its batch started.",
                "queue_seconds",
            ),
            (
                "compute_duration_seconds",
                "Time one model execution (a batch) took on a compute thread.",
                "compute_seconds",
            ),
        )
        for name, documentation, attribute in histograms:
            histogram = HistogramMetricFamily(PREFIX + name, documentation, labels=LABELS)
            for (model_name, version), version_instruments in instruments:
                buckets, total = getattr(version_instruments, attribute).buckets()
                histogram.add_metric([model_name, str(version)], buckets, total)
            yield histogram
        counters = (
            ("requests", "Prediction requests that resolved to the version, answered or not.", "requests"),
            ("failed_requests", "Requests that resolved to the version and got an error.", "failures"),
            ("executions", "Model executions (session runs); a batch counts once.", "executions"),
            (
                "items",
                "Items the model computed: rows, or one per request for a model without a batch dimension.",
                "inferences",
            ),
            ("cache_hits", "Predictions answered from the prediction cache.", "cache_hits"),
            ("cache_misses", "Prediction cache lookups that found nothing.", "cache_misses"),
        )
        for name, documentation, attribute in counters:
            family = CounterMetricFamily(PREFIX + name, documentation, labels=LABELS)
            for stats in statistics:
                value = getattr(stats, attribute)
                if attribute == "requests":  # ModelStatistics.requests counts the ones answered without error
                    value += stats.failures + stats.cancelled
                family.add_metric([stats.name, str(stats.version)], value)
            yield family
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting in the version's queue.", labels=LABELS)
        memory = GaugeMetricFamily(
            PREFIX + "model_memory_bytes", "Estimated memory held by a loaded version's session.", labels=LABELS
        )
        states = GaugeMetricFamily(PREFIX + "loaded_models", "Model versions held, by state.", labels=("state",))
        by_state = dict.fromkeys(("loading", "ready", "unloading", "failed"), 0)
        queued: dict[tuple[str, str], int] = {}
        held: dict[tuple[str, str], int] = {}
        for model in loaded:
            by_state[model.state.value] = by_state.get(model.state.value, 0) + 1
            labels = (model.name, str(model.version))  # a version may be held twice: reloading while draining
            queued[labels] = queued.get(labels, 0) + model.queued
            held[labels] = held.get(labels, 0) + model.memory_bytes
        for labels, value in queued.items():
            depth.add_metric(labels, value)
        for labels, value in held.items():
            memory.add_metric(labels, value)
        for state, count in by_state.items():
            states.add_metric([state], count)
        yield depth
        yield memory
        yield states

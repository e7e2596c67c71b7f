"""The registry's own Prometheus series, declared on the process's modelforge_server Metrics.

Counted by this replica (add them up across replicas with ``sum``):

- ``modelforge_registry_uploads_total{result}``: uploads that got past their header, by how they ended (see
  :class:`UploadResult`);
- ``modelforge_registry_upload_received_bytes_total``: bytes received by uploads, whatever their result;
- ``modelforge_registry_watch_streams``: WatchModelEvents streams open on this replica now.

Read from PostgreSQL when Prometheus scrapes, so they cover what every replica did (aggregate with ``max``, never
``sum``), and absent from a scrape while PostgreSQL does not answer:

- ``modelforge_registry_versions{state}``: versions by state (READY, ARCHIVED);
- ``modelforge_registry_models``: models;
- ``modelforge_registry_blobs`` and ``modelforge_registry_blob_bytes``: the files in the blob store, each content
  counted once however many versions share it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelforge_registry.domain import Inventory, VersionState
from modelforge_registry.errors import ExternalDataRefused, InvalidOnnx, ModelTooLarge
from modelforge_server.errors import ChecksumMismatch, InvalidArgument, NotFound, SizeMismatch, Unavailable
from modelforge_server.metrics import Metrics

__all__ = ["RegistryMetrics", "UploadResult", "upload_result"]

log = logging.getLogger("modelforge.registry.metrics")

PREFIX = "modelforge_registry_"
# How long a scrape waits for the inventory query before it leaves those series out.
INVENTORY_TIMEOUT_SECONDS = 2.0


class UploadResult(enum.StrEnum):
    """How an upload ended: the ``result`` label of ``modelforge_registry_uploads_total``."""

    OK = "ok"
    TOO_LARGE = "too_large"
    SIZE_MISMATCH = "size_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    INVALID_ONNX = "invalid_onnx"
    EXTERNAL_DATA = "external_data"
    INVALID = "invalid"
    """Any other bad request: a malformed header, labels or name, chunks out of order."""
    NOT_FOUND = "not_found"
    """The model does not exist and the header did not ask to create it."""
    CANCELLED = "cancelled"
    """The client went away (or its deadline passed) before the upload finished."""
    UNAVAILABLE = "unavailable"
    ERROR = "error"


_RESULTS: tuple[tuple[type[BaseException], UploadResult], ...] = (
    (ModelTooLarge, UploadResult.TOO_LARGE),
    (SizeMismatch, UploadResult.SIZE_MISMATCH),
    (ChecksumMismatch, UploadResult.CHECKSUM_MISMATCH),
    (InvalidOnnx, UploadResult.INVALID_ONNX),
    (ExternalDataRefused, UploadResult.EXTERNAL_DATA),
    (InvalidArgument, UploadResult.INVALID),
    (NotFound, UploadResult.NOT_FOUND),
    (asyncio.CancelledError, UploadResult.CANCELLED),
    (Unavailable, UploadResult.UNAVAILABLE),
)


def upload_result(exc: BaseException | None) -> UploadResult:
    """The result label for an upload that ended with `exc` (None: it succeeded)."""
    if exc is None:
        return UploadResult.OK
    for kind, result in _RESULTS:
        if isinstance(exc, kind):
            return result
    return UploadResult.ERROR


class RegistryMetrics:
    """What the registry counts beside the RPC metrics; `inventory` is the store's query behind the gauges."""

    def __init__(self, metrics: Metrics, inventory: Callable[[], Awaitable[Inventory]]) -> None:
        self.metrics = metrics
        self._uploads = metrics.counter(
            PREFIX + "uploads", "Uploads that got past their header, by result.", ("result",)
        )
        for result in UploadResult:  # every result reads 0 from the start, so rate() sees the first one
            self._uploads.labels(result.value)
        self._received = metrics.counter(
            PREFIX + "upload_received_bytes", "Bytes received by uploads, whatever their result."
        )
        self._watches = metrics.gauge(PREFIX + "watch_streams", "WatchModelEvents streams open on this replica.")
        metrics.registry.register(_InventoryCollector(inventory))

    def upload_ended(self, exc: BaseException | None) -> UploadResult:
        result = upload_result(exc)
        self._uploads.labels(result.value).inc()
        return result

    def received(self, size: int) -> None:
        self._received.inc(size)

    def watch_opened(self) -> None:
        self._watches.inc()

    def watch_closed(self) -> None:
        self._watches.dec()


class _InventoryCollector(Collector):
    """Queries the inventory on the event loop that built it, from the thread that serves /metrics."""

    def __init__(self, inventory: Callable[[], Awaitable[Inventory]]) -> None:
        self._inventory = inventory
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def describe(self) -> Iterable[Metric]:
        return list(_families(None))

    def collect(self) -> Iterable[Metric]:
        return list(_families(self._read()))

    def _read(self) -> Inventory | None:
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or _runs_in(loop):
            return None  # no loop to ask, or this is the loop's own thread, which must not wait for itself
        future = asyncio.run_coroutine_threadsafe(self._query(), loop)
        try:
            return future.result(INVENTORY_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("the inventory query took over %.1f s; this scrape leaves it out", INVENTORY_TIMEOUT_SECONDS)
        except Exception as exc:  # PostgreSQL is unreachable: health and modelforge_dependency_up say so
            log.debug("no inventory for this scrape: %s", exc)
        return None

    async def _query(self) -> Inventory:
        return await self._inventory()


def _runs_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # a thread without a loop, such as the one serving /metrics
        return False


def _families(inventory: Inventory | None) -> Iterator[Metric]:
    versions = GaugeMetricFamily(
        PREFIX + "versions",
        "Model versions by state, in the database (every replica reports the same).",
        labels=["state"],
    )
    models = GaugeMetricFamily(PREFIX + "models", "Models in the database (every replica reports the same).")
    blobs = GaugeMetricFamily(PREFIX + "blobs", "Files in the blob store; identical content is stored once.")
    blob_bytes = GaugeMetricFamily(PREFIX + "blob_bytes", "Bytes of the files in the blob store.")
    if inventory is not None:
        for state in VersionState:
            versions.add_metric([state.value], inventory.versions.get(state, 0))
        models.add_metric([], inventory.models)
        blobs.add_metric([], inventory.blobs)
        blob_bytes.add_metric([], inventory.blob_bytes)
    yield from (versions, models, blobs, blob_bytes)

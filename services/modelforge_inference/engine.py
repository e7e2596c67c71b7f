"""InferenceEngine: resolves refs, holds ONNX Runtime sessions in an LRU, batches, caches and runs predictions.

The engine is the transport-free core of the inference service; the InferenceService servicer and the Open
Inference Protocol servicer both translate to it. A prediction goes: resolve the ref (the resolver's cache), check
the inputs against the signature, look in the prediction cache, take the version's session (created once, even for
concurrent first requests), queue in the version's batcher, run on the engine's compute threads, split the batch,
store the cache entry, answer.

Loaded versions live in an LRU bounded by a count and an estimated memory budget. Unloading or evicting a version
takes it out of the table at once (the next request loads it afresh) and releases its session once the requests in
flight on it have finished.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from onnxruntime import RunOptions
from opentelemetry.trace import Status, StatusCode

from modelforge_inference import allocator, serving
from modelforge_inference.batcher import Abort, Batcher, BatchResult, Feeds, Into, Outcome, RanApart, split
from modelforge_inference.domain import (
    CacheMode,
    LoadedModel,
    ModelRef,
    ModelState,
    ModelStatistics,
    ModelSummary,
    Prediction,
    RepositoryEntry,
    ResolvedModel,
    ServingConfig,
    Timings,
)
from modelforge_inference.errors import (
    AnswerTooLarge,
    ElementTooLarge,
    InvalidPriority,
    InvalidTimeout,
    LoadTimeout,
    ModelLoadFailed,
    ModelNotLoaded,
    ModelOverMemoryBudget,
    ModelRunFailed,
    ModelRunOutOfMemory,
    ModelUnloading,
    QueueFull,
)
from modelforge_inference.metrics import InferenceMetrics, Rejection, UnloadReason, VersionInstruments
from modelforge_inference.registry_client import RegistryNotFound, RegistryUnavailable
from modelforge_inference.sessions import (
    INPUT_ERRORS,
    ModelSession,
    out_of_memory,
    place,
    prime_runtime,
    quiet_default_logger,
    resident_bytes,
    run_options,
    stack,
    terminate,
    unserved_inputs,
    usable_cpus,
)
from modelforge_inference.settings import InferenceSettings
from modelforge_inference.signature import (
    STRINGS_OFF_LOOP,
    answer_bytes,
    batch_rows,
    check_inputs,
    check_outputs,
    counted_rows,
    least_output_bytes,
    output_views,
    request_bytes,
    string_elements,
)
from modelforge_server import logs, telemetry
from modelforge_server.errors import DeadlineExceeded, InvalidArgument, NotFound, ServiceError, Unavailable
from modelforge_server.metrics import Metrics
from modelforge_server.runtime_errors import describe_error

__all__ = ["InferenceEngine"]

log = logging.getLogger("modelforge.inference.engine")

T = TypeVar("T")

# Inputs larger than this are hashed for the cache key on a worker thread rather than on the event loop.
_HASH_OFF_LOOP_BYTES = 256 * 1024
# Unbatched versions whose runs average less than this (CPU time) run on the event loop: handing a run to a compute
# thread and back costs more, several hundred us of CPU per request on a 2-core machine (docs/PERFORMANCE.md, fix
# 21). The benchmark's MLP runs in 30 us alone, 55-100 us on a busy server's loop and 70-180 us on its compute
# threads, whose caches the run finds cold: a lower bound left it on the threads once there. They go back to the
# threads above batcher.INLINE_STAY_FACTOR times this.
_INLINE_RUN_SECONDS = 150e-6
# How many versions deleted from the registry keep their statistics (GetModelStatistics by version number).
RETIRED_STATISTICS = 1024
# Memory that unloaded versions freed goes back to the system at most this often (seconds; see allocator).
_RELEASE_INTERVAL = 1.0
# A caller that leaves this close to its deadline left because of it (the loop's clock may tick in milliseconds).
_DEADLINE_SLACK = 0.01


class Resolver(Protocol):
    async def resolve(self, ref: ModelRef, *, timeout: float | None = None) -> ResolvedModel: ...

    def add_listener(self, callback: Callable[[Any], None]) -> Callable[[], None]: ...


class Catalog(Protocol):
    def list_models(self) -> AsyncIterator[ModelSummary]: ...


class ModelFiles(Protocol):
    def pinned(self, model: ResolvedModel) -> AbstractAsyncContextManager[Path]: ...


class Cache(Protocol):
    @property
    def degraded(self) -> bool: ...

    def key(self, model: ResolvedModel, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()) -> Any: ...

    async def get(self, key: Any) -> dict[str, np.ndarray] | None: ...

    def put_later(
        self,
        key: Any,
        outputs: Mapping[str, np.ndarray],
        ttl_seconds: float | None,
        max_entry_bytes: int,
        *,
        replacing: bool = False,
    ) -> None: ...

    def counts(self, model: str, version: int) -> Any: ...

    def forget_counts(self, model: str, version: int) -> None: ...


@dataclass(eq=False)
class _Slot:
    """One model version in the engine's table, from LOADING to its release."""

    model: ResolvedModel
    config: ServingConfig
    state: ModelState = ModelState.LOADING
    reason: str = ""
    loading: asyncio.Future[None] | None = None
    drained: asyncio.Future[None] | None = None
    session: ModelSession | None = None
    batcher: Batcher | None = None
    memory: int = 0
    load_seconds: float = 0.0
    last_use: float = field(default_factory=time.time)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    unload_reason: UnloadReason | None = None
    # When ONNX Runtime refused to build the version (monotonic clock): requests fail at once until the retry delay
    # has passed. None for a failure that says nothing about the version, such as a download that failed.
    refused_at: float | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    def refusing(self, config: ServingConfig, retry_seconds: float) -> bool:
        """Whether a request for this FAILED version under `config` fails at once instead of loading it again."""
        return (
            self.refused_at is not None
            and (self.config is config or self.config == config)  # new labels deserve a new try
            and time.monotonic() - self.refused_at < retry_seconds
        )

    def snapshot(self) -> LoadedModel:
        return LoadedModel(
            name=self.model.name,
            version=self.model.version,
            sha256=self.model.sha256,
            state=self.state,
            reason=self.reason,
            memory_bytes=self.memory,
            last_use=datetime.fromtimestamp(self.last_use, UTC),
            in_flight=self.in_flight,
            load_seconds=self.load_seconds,
            queued=self.batcher.queued if self.batcher is not None else 0,
            execution_providers=self.session.providers if self.session is not None else (),
        )


@dataclass
class _Counters:
    instruments: VersionInstruments = field(default_factory=VersionInstruments)
    requests: int = 0
    failures: int = 0
    cancelled: int = 0
    inferences: int = 0
    executions: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    total_seconds: float = 0.0
    failure_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    batch_seconds: dict[int, float] = field(default_factory=dict)
    last_inference: float | None = None

    def executed(self, rows: int, requests: int, compute: float) -> None:
        self.executions += 1
        self.inferences += rows
        self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
        self.batch_seconds[rows] = self.batch_seconds.get(rows, 0.0) + compute
        self.instruments.batch_size.observe(rows)
        self.instruments.compute_seconds.observe(compute)


class InferenceEngine:
    """The transport-free core that both the InferenceService and the V2 (OIP) servicers call.

    Args:
        settings: Limits, thread counts and the server-wide serving defaults.
        resolver: Resolves ModelRefs (the registry, cached).
        files: Gives the local path of a version's file, downloading it when missing.
        cache: The Redis prediction cache, or None to run without one.
        catalog: Lists the registry's models, for the repository index; None: the index lists loaded versions only.
        metrics: The process's metrics, on which the engine declares its own; None: a private set.
    """

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        resolver: Resolver,
        files: ModelFiles,
        cache: Cache | None = None,
        catalog: Catalog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._metrics = InferenceMetrics(
            metrics if metrics is not None else Metrics(process_collector=False),
            statistics=self._all_statistics,
            instruments=self._all_instruments,
            loaded=self.loaded,
        )
        self._tracer = telemetry.tracer(__name__)
        # Decided once: with tracing off, the prediction path does not even create no-op spans.
        self._tracing = telemetry.tracing_enabled()
        self._resolver = resolver
        self._files = files
        self._cache = cache
        self._defaults = serving.defaults(settings)
        self._threads = settings.compute_threads or usable_cpus()
        self._compute: ThreadPoolExecutor | None = None
        self._loader: ThreadPoolExecutor | None = None
        self._slots: OrderedDict[tuple[str, int], _Slot] = OrderedDict()  # least recently used first
        self._unloading: set[_Slot] = set()
        self._counters: dict[tuple[str, int], _Counters] = {}
        # Final statistics of versions deleted from the registry, oldest first: still answered by version number.
        self._retired: collections.OrderedDict[tuple[str, int], ModelStatistics] = collections.OrderedDict()
        self._configs: dict[tuple[str, int, frozenset[tuple[str, str]]], ServingConfig] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._release_pending = False  # a release of freed memory is to start (see _release_memory_soon)
        self._released_at = float("-inf")
        self._remove_listener: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the compute pool and listens to registry events. Call once before anything else."""
        quiet_default_logger()
        self._compute = ThreadPoolExecutor(self._threads, thread_name_prefix="modelforge-compute")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="modelforge-load")
        await asyncio.get_running_loop().run_in_executor(self._loader, prime_runtime)
        self._remove_listener = self._resolver.add_listener(self._on_registry_event)

    async def aclose(self) -> None:
        """Fails what is still queued, releases every session and stops the thread pools."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        slots = [*self._slots.values(), *self._unloading]
        self._slots.clear()
        for slot in slots:
            slot.state = ModelState.UNLOADING
            if slot.batcher is not None:
                await slot.batcher.aclose()
            slot.session = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._unloading.clear()
        for executor in (self._compute, self._loader):
            if executor is not None:
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        self._compute = self._loader = None

    # -- predictions -----------------------------------------------------------------------------------------

    async def predict(
        self,
        ref: ModelRef,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        cache_mode: CacheMode = CacheMode.USE,
        time_remaining: float | None = None,
        into: Mapping[str, memoryview] | None = None,
        answer_limit: int | None = None,
        element_limit: int | None = None,
        summarized: Collection[str] = (),
    ) -> Prediction:
        """Runs the version `ref` resolves to on `inputs` and returns the requested outputs (all when None).

        priority: 1 is the most urgent; 0 means the least urgent level. timeout: seconds the request may wait in
        the queue (can only lower the model's default). time_remaining: seconds left of the caller's deadline
        (grpc `context.time_remaining()`), applied to resolution, loading and queueing. into: memory the caller
        wants named outputs in (a client's shared memory); when the prediction runs uncached and every such output's
        shape follows from the signature and fits, ONNX Runtime writes them there and they come back as arrays over
        that memory, named in the prediction's ``placed``. Otherwise it is not touched, and the caller copies the
        outputs itself. answer_limit: the most bytes the answer message may take (the caller sends the outputs not
        named in ``into`` in one message); None when the outputs are streamed. element_limit: for a streamed
        answer, the most bytes one element of a string output may take (a message carries each element whole).
        summarized: outputs the caller answers with a small summary of them (V2 classification's top classes),
        which answer_limit leaves out.
        Raises InvalidArgument kinds for bad inputs, NotFound for unknown refs, ResourceExhausted when the queue
        is full or the outputs exceed answer_limit, DeadlineExceeded when the deadline passes in the queue.
        """
        began = time.perf_counter()  # for the timings; deadlines are in loop time, where the loop's timers are
        started = asyncio.get_running_loop().time()
        if priority < 0:
            raise InvalidPriority(priority)
        if timeout is not None and timeout < 0:
            raise InvalidTimeout(timeout)
        deadline = None if time_remaining is None else started + time_remaining
        model = await self._resolve(ref, deadline)
        counters = self._counters_of(model)
        try:
            config = self._config(model)
            if unfed := model.signature.non_tensor_inputs:
                # Before the inputs are checked: a request could only be told that no such input exists.
                raise self._unservable(model, config, unserved_inputs([repr(name) for name in unfed]))
            feeds = check_inputs(model.signature, inputs, max_request_bytes=self._settings.max_request_bytes)
            placed: frozenset[str] = frozenset()
            names = check_outputs(model.signature, outputs)
            # The outputs the answer message carries must fit it: checked before the run where the signature tells
            # their size, and after it by their real size.
            answered = [name for name in names if (not into or name not in into) and name not in summarized]
            if answer_limit is not None:
                least = least_output_bytes(model.signature, feeds, answered)
                _check_answer(model, least, answer_limit, declared=True)
            if self._cache is not None and config.cache.enabled and cache_mode is not CacheMode.BYPASS:
                result, selected, hit = await self._predict_cached(
                    model, config, feeds, names, tuple(outputs or ()), priority, timeout, deadline, cache_mode
                )
            else:
                views = output_views(model.signature, feeds, into) if into else None
                result = await self._run(model, config, feeds, priority, timeout, deadline, into=views)
                selected, hit = {name: result.outputs[name] for name in names}, False
                if views:
                    placed = frozenset(name for name, view in views.items() if result.outputs[name] is view)
            if answer_limit is not None:
                size = answer_bytes(model.name, {name: selected[name] for name in answered if name in selected})
                _check_answer(model, size, answer_limit)
            encoded = await _check_elements(model, selected, element_limit) if element_limit is not None else {}
        except Exception as exc:
            self._failed(model, counters, began, _rejection(exc))
            raise
        except asyncio.CancelledError:  # the caller went away; a queued request never ran
            if deadline is not None and asyncio.get_running_loop().time() >= deadline - _DEADLINE_SLACK:
                # Its deadline passed: gRPC's cancellation of the call raced the queue's own deadline, and won.
                # Counted as the queue's refusal would have been, so that one condition counts one way.
                self._failed(model, counters, began, Rejection.DEADLINE)
            else:
                counters.cancelled += 1
                self._metrics.rejected(model.name, model.version, Rejection.CANCELLED)
            raise
        total = time.perf_counter() - began
        counters.requests += 1
        counters.total_seconds += total
        counters.last_inference = time.time()
        timings = Timings(total=total)
        if result is not None:
            timings.queue, timings.compute = result.queue_seconds, result.compute_seconds
            counters.queue_seconds += result.queue_seconds
            counters.compute_seconds += result.compute_seconds
            counters.instruments.queue_seconds.observe(result.queue_seconds)
        return Prediction(
            outputs=selected,
            model=model.name,
            version=model.version,
            sha256=model.sha256,
            timings=timings,
            cache_hit=hit,
            signature=model.signature,
            placed=placed,
            encoded=encoded,
        )

    async def refused(
        self, ref: ModelRef, exc: ServiceError, began: float, time_remaining: float | None = None
    ) -> None:
        """Counts a request refused as a servicer decoded it, before `predict` (inputs whose bytes do not match
        their shape, a parameter of the wrong type), as a failure of the version `ref` resolves to, `began` on the
        perf_counter clock. A ref that does not resolve counts nowhere: the caller answers with `exc` all the same."""
        deadline = None if time_remaining is None else asyncio.get_running_loop().time() + time_remaining
        try:
            model = await self._resolve(ref, deadline)
        except ServiceError:
            return
        self._failed(model, self._counters_of(model), began, _rejection(exc))

    def _failed(self, model: ResolvedModel, counters: _Counters, began: float, reason: Rejection | None) -> None:
        """Counts a request that got no outputs, `began` on the perf_counter clock; `reason`, where it has one, is
        why it was rejected (see _rejection)."""
        counters.failures += 1
        counters.failure_seconds += time.perf_counter() - began
        if reason is not None:
            self._metrics.rejected(model.name, model.version, reason)

    async def _predict_cached(
        self,
        model: ResolvedModel,
        config: ServingConfig,
        feeds: Feeds,
        names: tuple[str, ...],
        requested: tuple[str, ...],
        priority: int,
        timeout: float | None,
        deadline: float | None,
        mode: CacheMode,
    ) -> tuple[BatchResult | None, dict[str, np.ndarray], bool]:
        assert self._cache is not None
        cache = self._cache
        if request_bytes(feeds) > _HASH_OFF_LOOP_BYTES:
            key = await asyncio.to_thread(cache.key, model, feeds, requested)
        else:
            key = cache.key(model, feeds, requested)
        if mode is CacheMode.USE:
            if self._tracing:
                with self._tracer.start_as_current_span("cache lookup", attributes=_attributes(model)) as span:
                    hit = await cache.get(key)
                    span.set_attribute("modelforge.cache_hit", hit is not None)
            else:
                hit = await cache.get(key)
            if hit is not None:
                return None, {name: hit[name] for name in names if name in hit}, True

        # Identical misses run once: the batcher shares a run among requests with the same key (each queued with
        # its own priority and deadline), and the request whose run it was stores the entry.
        result = await self._run(model, config, feeds, priority, timeout, deadline, share=key.digest)
        selected = {name: result.outputs[name] for name in names}
        if not result.shared:
            cache.put_later(  # not awaited
                key,
                selected,
                config.cache.ttl_seconds,
                config.cache.max_entry_bytes,
                replacing=mode is CacheMode.REFRESH,
            )
        return result, selected, False

    async def _run(
        self,
        model: ResolvedModel,
        config: ServingConfig,
        feeds: Feeds,
        priority: int,
        timeout: float | None,
        deadline: float | None,
        share: bytes | None = None,
        into: Into = None,
    ) -> BatchResult:
        slot = await self._acquire(model, config, deadline)
        try:
            assert slot.batcher is not None
            now = asyncio.get_running_loop().time()
            limits = [deadline]
            if config.batching.default_queue_timeout is not None:
                limits.append(now + config.batching.default_queue_timeout)
            if timeout is not None:
                limits.append(now + timeout)
            expires = min((limit for limit in limits if limit is not None), default=None)
            if self._tracing:
                return await self._traced_submit(slot.batcher, model, feeds, priority, expires, share, into)
            return await slot.batcher.submit(feeds, priority=priority, expires_at=expires, share=share, into=into)
        finally:
            self._release(slot)

    async def _traced_submit(
        self,
        batcher: Batcher,
        model: ResolvedModel,
        feeds: Feeds,
        priority: int,
        expires: float | None,
        share: bytes | None,
        into: Into,
    ) -> BatchResult:
        """Submits with a "queue wait" and a "batch execution" span, drawn afterwards from the batcher's timings
        (a batch runs for many requests at once, each of which gets the spans in its own trace)."""
        attributes = _attributes(model)
        queued_at = time.time_ns()
        try:
            result = await batcher.submit(feeds, priority=priority, expires_at=expires, share=share, into=into)
        except BaseException as exc:
            span = self._tracer.start_span("queue wait", start_time=queued_at, attributes=attributes)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            raise
        started = queued_at + round(result.queue_seconds * 1e9)
        self._tracer.start_span("queue wait", start_time=queued_at, attributes=attributes).end(end_time=started)
        execution = self._tracer.start_span(
            "batch execution",
            start_time=started,
            attributes={**attributes, "modelforge.batch_size": result.batch_rows},
        )
        execution.end(end_time=started + round(result.compute_seconds * 1e9))
        return result

    def _execute(self, slot: _Slot, batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        """Runs one batch on a compute thread: stack, run once, split (each request's outputs copied into its
        arrays, if it gave any); a merged batch that fails runs item by item, so that one bad request fails alone.
        Setting ``abort`` stops the runs (their outcomes then go to no one)."""
        session = slot.session
        if session is None:
            return [ModelUnloading(slot.model.name, slot.model.version)] * len(batch)
        options = None
        if abort is not None:
            options = run_options()
            abort.on_abort(functools.partial(terminate, options))
        if len(batch) == 1:
            return [self._run_one(session, slot.model, batch[0], into[0], options)]
        rows = [counted_rows(batch_rows(feeds)) for feeds in batch]  # a merged batch's requests all have rows
        try:
            merged = session.run({name: stack([feeds[name] for feeds in batch]) for name in batch[0]}, None, options)
        except INPUT_ERRORS:
            return self._run_apart(session, slot.model, batch, into, options)
        parts = split(merged, rows)
        if parts is None:  # outputs do not follow the batch dimension after all (an unnamed count of detections)
            if slot.batcher is not None:
                slot.batcher.stop_merging()
                log.warning(
                    "%s:%s: the outputs of a merged run do not hold one row per input row; its requests run alone "
                    "from now on (name the outputs' first dimension otherwise than the inputs' to say so up front)",
                    slot.model.name,
                    slot.model.version,
                )
            return self._run_apart(session, slot.model, batch, into, options)
        return [place(part, arrays) if arrays else part for part, arrays in zip(parts, into, strict=True)]

    @classmethod
    def _run_apart(
        cls,
        session: ModelSession,
        model: ResolvedModel,
        batch: Sequence[Feeds],
        into: Sequence[Into],
        options: RunOptions | None,
    ) -> RanApart:
        """Runs a merged batch's requests one by one, each failing alone."""
        return RanApart(cls._run_one(session, model, *request, options) for request in zip(batch, into, strict=True))

    @staticmethod
    def _run_one(
        session: ModelSession, model: ResolvedModel, feeds: Feeds, into: Into, options: RunOptions | None
    ) -> Outcome:
        try:
            return session.run(feeds, into, options)
        except INPUT_ERRORS as exc:
            if out_of_memory(exc):
                return ModelRunOutOfMemory(model.name, model.version, describe_error(exc))
            return ModelRunFailed(model.name, model.version, describe_error(exc), unproven=not session.proven)
        except Exception as exc:  # a fault of ours or of ONNX Runtime: INTERNAL, logged by the status mapping
            return exc

    # -- the table of loaded versions ------------------------------------------------------------------------

    async def _acquire(
        self, model: ResolvedModel, config: ServingConfig, deadline: float | None, *, retry: bool = False
    ) -> _Slot:
        """The READY slot of model, loading it first if needed, counted in flight until _release.

        A version ONNX Runtime refused to build fails at once with its reason for `load_retry_seconds`, so that
        traffic to a broken model does not occupy the loader; `retry` (LoadModel) tries again regardless.

        A slot holds the file `model` was resolved to. One of the same number holding another file is retired once
        the registry confirms the request's file (the model was deleted and created again); a request that holds
        the older resolution, or one the registry cannot confirm, fails MODEL_UNLOADING and leaves the slot alone.
        Before a load the registry is asked whether the version still exists with that file (:meth:`_confirm`),
        and a load that is unloaded while this request waits for it (an UnloadModel, the version deleted) fails
        the request MODEL_UNLOADING rather than being made again.
        """
        key = model.key
        confirmed = False
        while True:
            slot = self._slots.get(key)
            if slot is not None and slot.model.sha256 != model.sha256:
                if not confirmed and not await self._confirm(model, deadline):
                    raise ModelUnloading(model.name, model.version)  # unconfirmed: the loaded file stays
                confirmed = True
                if self._slots.get(key) is slot:
                    self._begin_unload(slot, UnloadReason.RETIRED)  # another file under this number
                continue  # the table may have changed meanwhile
            if (
                slot is not None
                and slot.state is ModelState.FAILED
                and not retry
                and slot.refusing(config, self._settings.load_retry_seconds)
            ):
                raise ModelLoadFailed(model.name, model.version, slot.reason)
            # _config hands out one object per version and labels: the identity check spares a deep compare.
            if (
                slot is not None
                and slot.state is ModelState.READY
                and slot.config is not config
                and slot.config != config
            ):
                self._begin_unload(slot, UnloadReason.RECONFIGURED)  # its labels changed: serve it anew
                slot = None
            if slot is None or slot.state is ModelState.FAILED:
                if not confirmed:
                    await self._confirm(model, deadline)  # unreachable: versions resolved before keep being served
                    confirmed = True
                    continue  # the table may have changed meanwhile
                budget = self._settings.memory_budget_bytes
                if model.size_bytes > budget:  # loaded, it would evict every other version and still not fit
                    raise ModelOverMemoryBudget(model.name, model.version, model.size_bytes, budget)
                slot = _Slot(model, config)
                self._slots[key] = slot
                slot.loading = self._spawn(self._load(slot))
            self._slots.move_to_end(key)
            if slot.state is ModelState.READY:
                slot.in_flight += 1
                slot.idle.clear()
                slot.last_use = time.time()
                return slot
            assert slot.loading is not None
            # A request waiting for the load is in flight: an eviction right after the load waits for it too.
            slot.in_flight += 1
            slot.idle.clear()
            try:
                await self._until(
                    asyncio.shield(slot.loading), deadline, lambda: LoadTimeout(model.name, model.version)
                )
            except BaseException:
                self._release(slot)
                raise
            if slot.drained is not None and slot.unload_reason is not UnloadReason.EVICTED:
                self._release(slot)  # unloaded while it loaded: the unload (or the registry's event) stands
                raise ModelUnloading(model.name, model.version)
            slot.last_use = time.time()
            return slot  # READY, or evicted since and serving the requests it holds, as any evicted version does

    async def _confirm(self, model: ResolvedModel, deadline: float | None) -> bool:
        """Whether the registry still has `model`'s version with the same file: True when it says so, False when
        it cannot be reached (the caller decides whether the request's resolution stands); raises ModelUnloading
        when it has another file under the number, and NotFound when the version is gone.

        Asked before a load: a request resolved before an event retired its version (the version or its model
        deleted, or created again with another file under the number) would otherwise load it from the local file
        cache, to serve what the registry no longer has. The resolution is cached until such an event, so this
        asks the registry only after one (or for a version first named by alias)."""
        try:
            current = await self._resolve(ModelRef(model.name, version=model.version), deadline)
        except RegistryUnavailable:
            return False
        if current.sha256 != model.sha256:
            raise ModelUnloading(model.name, model.version)  # a retry resolves the ref to what the registry has
        return True

    def _unservable(self, model: ResolvedModel, config: ServingConfig, reason: str) -> ModelLoadFailed:
        """The refusal of a version that no load could serve, found from its signature before any load; it is
        listed FAILED with the reason (ListLoadedModels, RepositoryIndex), as a version whose load failed is."""
        if model.key not in self._slots:
            slot = self._slots[model.key] = _Slot(model, config, state=ModelState.FAILED, reason=reason)
            slot.refused_at = time.monotonic()
        return ModelLoadFailed(model.name, model.version, reason)

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        slot.last_use = time.time()
        if slot.in_flight == 0:
            slot.idle.set()

    async def _load(self, slot: _Slot) -> None:
        # Its log lines, the loader thread's included, carry the version in their `model` field.
        with (
            self._tracer.start_as_current_span("model load", attributes=_attributes(slot.model)),
            logs.bind(model=_named(slot.model)),
        ):
            await self._load_slot(slot)

    async def _load_slot(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        model = slot.model
        try:
            assert self._loader is not None
            async with self._files.pinned(model) as path:  # the file stays while the session reads it
                # The loader thread runs in this task's context, so its spans join the load's trace.
                run = contextvars.copy_context().run
                session, memory = await loop.run_in_executor(self._loader, run, self._open, path, slot)
        except BaseException as exc:
            slot.state = ModelState.FAILED
            slot.reason = str(exc) if isinstance(exc, ServiceError) else describe_error(exc)
            log.warning("loading %s:%s failed: %s", model.name, model.version, slot.reason)
            self._metrics.load_failed(model.name, model.version)
            if isinstance(exc, ServiceError | asyncio.CancelledError):
                raise
            slot.refused_at = time.monotonic()
            raise ModelLoadFailed(model.name, model.version, slot.reason) from exc
        slot.session, slot.memory = session, memory
        slot.load_seconds = time.perf_counter() - started
        self._metrics.loaded(model.name, model.version, slot.load_seconds)
        if slot.state is not ModelState.LOADING:  # unloaded while loading
            return
        assert self._compute is not None
        counters = self._counters_of(model)
        slot.batcher = Batcher(
            model=model.name,
            version=model.version,
            config=slot.config.batching,
            mergeable=model.signature.batchable,
            execute=functools.partial(self._execute, slot),
            executor=self._compute,
            concurrency=self._threads,
            on_execution=counters.executed,
            inline_below=_INLINE_RUN_SECONDS if session.cpu_only else 0.0,
        )
        slot.batcher.start()
        slot.state = ModelState.READY
        log.info("loaded %s:%s in %.3f s (about %d MiB)", model.name, model.version, slot.load_seconds, memory >> 20)
        if memory > self._settings.memory_budget_bytes:
            log.warning(
                "%s:%s took about %d MiB to load, more than MODELFORGE_MEMORY_BUDGET_BYTES (%d MiB): it is served "
                "alone, every other version evicted; raise the budget to keep others loaded beside it",
                model.name,
                model.version,
                memory >> 20,
                self._settings.memory_budget_bytes >> 20,
            )
        self._enforce_budget(keep=slot)

    def _open(self, path: Path, slot: _Slot) -> tuple[ModelSession, int]:
        """On the loader thread: create the session, warm it up, estimate what it took."""
        before = resident_bytes()
        attributes = _attributes(slot.model)
        with self._tracer.start_as_current_span("session creation", attributes=attributes):
            session = ModelSession(path, slot.config.session, name=_named(slot.model))
        if self._settings.warmup:
            with self._tracer.start_as_current_span("warmup", attributes=attributes):
                session.warmup(slot.model.signature)
        return session, max(resident_bytes() - before, slot.model.size_bytes)

    def _enforce_budget(self, keep: _Slot) -> None:
        """Evicts least recently used READY versions while the table holds too many or too much, idle ones first: a
        version with requests in flight stays loaded until they end, and the next request would load it again."""
        while True:
            held = [slot for slot in self._slots.values() if slot.state in (ModelState.READY, ModelState.LOADING)]
            memory = sum(slot.memory for slot in held)
            if len(held) <= self._settings.max_loaded_models and memory <= self._settings.memory_budget_bytes:
                return
            candidates = [s for s in held if s is not keep and s.state is ModelState.READY]
            if not candidates:
                return
            victim = next((s for s in candidates if s.in_flight == 0), candidates[0])
            log.info(
                "evicting %s:%s (least recently used) to stay within %d models and %d MiB",
                victim.model.name,
                victim.model.version,
                self._settings.max_loaded_models,
                self._settings.memory_budget_bytes >> 20,
                extra={"model": _named(victim.model)},  # not the version whose load evicts it
            )
            self._begin_unload(victim, UnloadReason.EVICTED)

    def _begin_unload(self, slot: _Slot, reason: UnloadReason) -> asyncio.Future[None]:
        """Takes slot out of the table now and releases it once its requests in flight have finished."""
        if slot.drained is not None:
            return slot.drained
        slot.unload_reason = reason
        if self._slots.get(slot.model.key) is slot:
            del self._slots[slot.model.key]
        if slot.state is ModelState.FAILED:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            slot.drained = future
            return future
        slot.state = ModelState.UNLOADING
        self._unloading.add(slot)
        slot.drained = self._spawn(self._drain(slot))
        return slot.drained

    async def _drain(self, slot: _Slot) -> None:
        with logs.bind(model=_named(slot.model)):
            await self._drain_slot(slot)

    async def _drain_slot(self, slot: _Slot) -> None:
        try:
            if slot.loading is not None and not slot.loading.done():
                await asyncio.wait([slot.loading])
            await slot.idle.wait()
            if slot.batcher is not None:
                await slot.batcher.aclose()
            slot.batcher = None
            slot.session = None  # the last reference: ONNX Runtime frees the session's memory
            self._release_memory_soon()  # and the heap gives it back (see allocator)
            why = f" ({slot.unload_reason.value})" if slot.unload_reason is not None else ""
            log.info("unloaded %s:%s%s", slot.model.name, slot.model.version, why)
            if slot.unload_reason is not None and slot.load_seconds:
                self._metrics.unloaded(slot.model.name, slot.model.version, slot.unload_reason)
        finally:
            self._unloading.discard(slot)

    def _release_memory_soon(self) -> None:
        """Has the heap give freed memory back to the system, at most once per _RELEASE_INTERVAL: each release
        costs the next allocations their page faults, which versions evicted on every few requests would pay
        over and over. One release still to start covers every unload before it."""
        if self._release_pending:
            return
        self._release_pending = True
        self._spawn(self._release_memory(max(0.0, self._released_at + _RELEASE_INTERVAL - time.monotonic())))

    async def _release_memory(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._release_pending = False
        self._released_at = time.monotonic()
        await asyncio.to_thread(allocator.release_freed_memory)

    def _on_registry_event(self, event: Any) -> None:
        """A deleted or archived version, or a deleted model, is unloaded; labels that changed apply on the next
        request. When the event stream (re)starts, events may have been missed: what is held is checked again."""
        kind = getattr(getattr(event, "type", None), "name", "")
        if kind == "WATCH_STARTED":
            if self._slots:
                self._spawn(self._recheck())
            return
        if kind == "MODEL_DELETED":
            doomed = [slot for slot in self._slots.values() if slot.model.name == event.model]
            deleted = [key for key in self._counters if key[0] == event.model]
        elif kind in ("VERSION_DELETED", "VERSION_ARCHIVED"):
            doomed = [slot for key, slot in self._slots.items() if key == (event.model, event.version)]
            deleted = [(event.model, event.version)] if kind == "VERSION_DELETED" else []
        else:
            return
        unloads = [self._begin_unload(slot, UnloadReason.RETIRED) for slot in doomed]
        if deleted:
            self._spawn(self._forget(deleted, unloads))

    async def _forget(self, keys: Sequence[tuple[str, int]], unloads: Sequence[asyncio.Future[None]]) -> None:
        """Once deleted versions are unloaded, keeps their final statistics among the retired ones (asked for by
        number, a deleted version still answers) and drops their counters, cache counts and metric series: a
        long-running service exports only the versions that still exist, and a version created later under the
        same number starts from zero."""
        await asyncio.gather(*unloads, return_exceptions=True)
        for key in keys:
            if key in self._slots:  # the model was created again and its new version with this number is loaded
                continue
            if key in self._counters:
                self._retired[key] = self._statistics_of(*key)
                while len(self._retired) > RETIRED_STATISTICS:
                    self._retired.popitem(last=False)
                del self._counters[key]
            if self._cache is not None:
                self._cache.forget_counts(*key)
            self._metrics.forget(*key)

    async def _recheck(self) -> None:
        """Resolves every version held again and unloads those the registry deleted or archived meanwhile."""
        held = list(self._slots.items())
        results = await asyncio.gather(
            *(self._resolver.resolve(ModelRef(name, version=version)) for (name, version), _ in held),
            return_exceptions=True,
        )
        for (key, slot), result in zip(held, results, strict=True):
            if isinstance(result, NotFound):
                why = "no longer in the registry"
            elif isinstance(result, BaseException):
                log.warning("could not check %s:%s against the registry: %s", key[0], key[1], result)
                continue
            elif result.archived:
                why = "archived in the registry"
            elif result.sha256 != slot.model.sha256:
                why = "replaced in the registry by another file under its number"
            else:
                continue
            if self._slots.get(key) is slot:
                log.info("unloading %s:%s: %s while the registry's events were not followed", *key, why)
                self._begin_unload(slot, UnloadReason.RETIRED)

    # -- management ------------------------------------------------------------------------------------------

    async def load(self, ref: ModelRef, *, time_remaining: float | None = None) -> LoadedModel:
        """Loads the version `ref` resolves to (with a warmup run) and returns it READY."""
        deadline = None if time_remaining is None else asyncio.get_running_loop().time() + time_remaining
        model = await self._resolve(ref, deadline)
        slot = await self._acquire(model, self._config(model), deadline, retry=True)
        self._release(slot)
        return slot.snapshot()

    async def unload(self, ref: ModelRef, *, wait: bool = True) -> list[LoadedModel]:
        """Unloads the version `ref` names (every loaded version of the model when ref has no selector), after
        the requests in flight on it finish; one already being unloaded is waited for in the same way. Raises
        ModelNotLoaded when nothing matches. A version number held here is unloaded without asking the registry,
        which may have deleted it meanwhile.

        With ``wait`` False it returns once the versions take no new requests (the next request loads them
        again), and the requests in flight finish in the background, as Triton's RepositoryModelUnload does.
        """
        held = [*self._slots.values(), *self._unloading]  # a version already draining is waited for too
        if ref.is_latest:
            slots = [slot for slot in held if slot.model.name == ref.name]
        else:
            key = (ref.name, ref.version)
            if not any(slot.model.key == key for slot in held):
                key = (await self._resolve(ref, None)).key
                held = [*self._slots.values(), *self._unloading]  # as they are after the wait
            slots = [slot for slot in held if slot.model.key == key]
        if not slots:
            raise ModelNotLoaded(str(ref))
        drains = [self._begin_unload(slot, UnloadReason.REQUESTED) for slot in slots]
        snapshots = [slot.snapshot() for slot in slots]
        if wait:
            # Shielded: a caller that leaves stops waiting for the drains, not the drains (the sessions would stay).
            await asyncio.shield(asyncio.gather(*drains))
        return snapshots

    def stream_meter(self, prediction: Prediction) -> Callable[[float], None]:
        """What a PredictStream of `prediction` calls with the size of each chunk message the transport took."""
        return self._metrics.streamed(prediction.model, prediction.version)

    def loaded(self) -> list[LoadedModel]:
        """Snapshots of every version held, ordered by name and version."""
        slots = [*self._slots.values(), *self._unloading]
        return sorted((slot.snapshot() for slot in slots), key=lambda m: (m.name, m.version, m.state.value))

    async def repository_index(self) -> list[RepositoryEntry]:
        """The registry's models with what the engine holds of them, in name then version order.

        A model with versions held has one entry per version (in its state; a version loaded again while its
        previous load drains is listed once, in the state of the new load); one with none has a single entry
        without a state, naming its newest READY version. Versions held of a model the registry no longer lists
        (being unloaded) are included.
        """
        held: dict[str, list[LoadedModel]] = {}
        for model in self.loaded():
            if model.state is ModelState.UNLOADING and (model.name, model.version) in self._slots:
                continue  # its reload stands for it
            held.setdefault(model.name, []).append(model)
        entries: list[RepositoryEntry] = []
        if self._catalog is not None:
            async for summary in self._catalog.list_models():
                if summary.name not in held:
                    version = summary.latest_version or None
                    why = "unloaded" if version is not None else "no READY version"
                    entries.append(RepositoryEntry(summary.name, version, None, why))
        for versions in held.values():
            entries.extend(RepositoryEntry(m.name, m.version, m.state, m.reason) for m in versions)
        return sorted(entries, key=lambda e: (e.name, e.version or 0))

    async def statistics(self, ref: ModelRef | None = None) -> list[ModelStatistics]:
        """Counters per version: all versions, every version of ref.name (no selector), or the one ref names (a
        version number counted here is answered without asking the registry, which may have deleted it).

        Raises:
            RegistryNotFound: ref.name alone names a model that neither this server has run nor the registry knows.
        """
        if ref is None:
            keys = sorted(self._counters)
        elif ref.is_latest:
            keys = sorted(key for key in self._counters if key[0] == ref.name)
            if not keys:
                await self._check_model_exists(ref)
        elif ref.version is not None and (ref.name, ref.version) in self._counters:
            keys = [(ref.name, ref.version)]
        elif ref.version is not None and (ref.name, ref.version) in self._retired:
            await self._drop_retired_if_created_again(ref)
            keys = [(ref.name, ref.version)]
        else:
            model = await self._resolve(ref, None)
            keys = [model.key]
        return [self._statistics_of(*key) for key in keys]

    async def _drop_retired_if_created_again(self, ref: ModelRef) -> None:
        """Drops the retired statistics of the deleted version `ref` names by number when the registry has a
        version of that number again (the model was created anew): that one's statistics start from zero. Still
        deleted, or the registry unable to tell, the retired statistics stay and answer."""
        try:
            await self._resolve(ref, None)
        except (RegistryNotFound, Unavailable, DeadlineExceeded):
            return
        self._retired.pop((ref.name, ref.version or 0), None)

    async def _check_model_exists(self, ref: ModelRef) -> None:
        """Raises RegistryNotFound when the registry knows no model ref.name; a model without a READY version
        exists, and an unreachable registry cannot tell, so neither raises."""
        try:
            await self._resolve(ref, None)
        except RegistryNotFound as exc:
            if exc.reason == "MODEL_NOT_FOUND":
                raise
        except (Unavailable, DeadlineExceeded):
            pass

    async def describe(self, ref: ModelRef) -> tuple[ResolvedModel, ServingConfig]:
        """The version `ref` resolves to and how it is served (batching, cache, session), without loading it."""
        model = await self._resolve(ref, None)
        return model, self._config(model)

    def merges(self, model: ResolvedModel) -> bool:
        """False once the loaded version merges requests no more (a merged run showed that its outputs do not
        follow the batch dimension, or batching is off); True for a version not loaded."""
        slot = self._slots.get(model.key)
        if slot is None or slot.batcher is None or slot.model.sha256 != model.sha256:
            return True
        return slot.batcher.merging

    def is_ready(self, ref: ModelRef) -> bool:
        """True when the version ref names by number is loaded and READY (no registry call; False for refs
        without a version number: resolve them with describe first)."""
        if ref.version is None:
            return False
        slot = self._slots.get((ref.name, ref.version))
        return slot is not None and slot.state is ModelState.READY

    @property
    def cache_degraded(self) -> bool | None:
        """None without a prediction cache; True while Redis does not answer."""
        return None if self._cache is None else self._cache.degraded

    # -- helpers ---------------------------------------------------------------------------------------------

    async def _resolve(self, ref: ModelRef, deadline: float | None) -> ResolvedModel:
        timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        return await self._resolver.resolve(ref, timeout=timeout)

    def _config(self, model: ResolvedModel) -> ServingConfig:
        key = (model.name, model.version, frozenset(model.labels.items()))
        config = self._configs.get(key)
        if config is None:
            config = serving.serving_config(self._defaults, model)
            if len(self._configs) > 4096:
                self._configs.clear()
            self._configs[key] = config
        return config

    def _counters_of(self, model: ResolvedModel) -> _Counters:
        counters = self._counters.get(model.key)
        if counters is None:
            counters = self._counters[model.key] = _Counters()
            self._retired.pop(model.key, None)  # a version deleted earlier had this number: this one starts anew
        return counters

    def _all_statistics(self) -> list[ModelStatistics]:
        """Every version's statistics; called by the metrics endpoint's thread (the copies below are atomic)."""
        return [self._statistics_of(*key) for key in list(self._counters)]

    def _all_instruments(self) -> list[tuple[tuple[str, int], VersionInstruments]]:
        return [(key, counters.instruments) for key, counters in list(self._counters.items())]

    def _statistics_of(self, name: str, version: int) -> ModelStatistics:
        hits = misses = 0
        if self._cache is not None:
            counts = self._cache.counts(name, version)
            hits, misses = counts.hits, counts.misses
        counters = self._counters.get((name, version))
        if counters is None:  # deleted, or never used in this process
            retired = self._retired.get((name, version))
            if retired is not None:
                return retired
            return ModelStatistics(name=name, version=version, cache_hits=hits, cache_misses=misses)
        return ModelStatistics(
            name=name,
            version=version,
            requests=counters.requests,
            failures=counters.failures,
            cancelled=counters.cancelled,
            inferences=counters.inferences,
            executions=counters.executions,
            queue_seconds=counters.queue_seconds,
            compute_seconds=counters.compute_seconds,
            total_seconds=counters.total_seconds,
            failure_seconds=counters.failure_seconds,
            cache_hits=hits,
            cache_misses=misses,
            batch_sizes=dict(counters.batch_sizes),
            batch_seconds=dict(counters.batch_seconds),
            last_inference=None
            if counters.last_inference is None
            else datetime.fromtimestamp(counters.last_inference, UTC),
        )

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: failures reach the callers waiting on the task, not the loop's log

    @staticmethod
    async def _until(awaitable: Awaitable[T], deadline: float | None, error: Callable[[], ServiceError]) -> T:
        if deadline is None:
            return await awaitable
        try:
            async with asyncio.timeout_at(deadline):
                return await awaitable
        except TimeoutError:
            raise error() from None


def _named(model: ResolvedModel) -> str:
    """A version as log lines name it in their `model` field."""
    return f"{model.name}:{model.version}"


def _attributes(model: ResolvedModel) -> dict[str, Any]:
    return {"modelforge.model": model.name, "modelforge.version": model.version}


def _check_answer(model: ResolvedModel, size: int, limit: int, *, declared: bool = False) -> None:
    """Raises AnswerTooLarge when outputs of `size` bytes (`declared`: the least the signature gives them, before
    the run) do not fit one answer of at most `limit` bytes."""
    if size > limit:
        raise AnswerTooLarge(model.name, model.version, size, limit, declared=declared)


async def _check_elements(
    model: ResolvedModel, outputs: Mapping[str, np.ndarray], limit: int
) -> dict[str, list[bytes]]:
    """The elements of each string output as the answer carries them (encoded on a thread for a large output);
    raises ElementTooLarge when one holds more than `limit` bytes."""
    encoded: dict[str, list[bytes]] = {}
    for name, array in outputs.items():
        if array.dtype.kind not in "OSU":
            continue
        large = array.size > STRINGS_OFF_LOOP
        elements = await asyncio.to_thread(string_elements, array) if large else string_elements(array)
        largest = max(map(len, elements), default=0)
        if largest > limit:
            raise ElementTooLarge(model.name, model.version, name, largest, limit)
        encoded[name] = elements
    return encoded


def _rejection(exc: Exception) -> Rejection | None:
    """The metrics' reason for a request that got no outputs because of itself or its queue; None otherwise."""
    if isinstance(exc, QueueFull):
        return Rejection.QUEUE_FULL
    if isinstance(exc, DeadlineExceeded):
        return Rejection.DEADLINE
    if isinstance(exc, InvalidArgument):
        return Rejection.INVALID
    return None

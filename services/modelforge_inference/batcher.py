"""Dynamic batching of one model version: priority queues, queue deadlines, merging compatible requests.

A Batcher owns a background task that takes requests off its queues, strictly by priority level and in arrival
order within a level, and hands batches to a blocking `execute` function on the engine's thread pool. It forms a
batch only when one of its compute slots is free, so requests that arrive while the model is busy wait together
and leave together. A batch merges requests whose inputs agree on every dimension but the first; it leaves when it
holds max_batch_size rows, a preferred number of rows, or when its oldest request has waited max_queue_delay_us.
A request leaves the queue without running when its deadline passes (QueueTimeout) or its caller goes away.

Identical requests (the same `share` key: the prediction cache's digest of model file, inputs and requested
outputs) run once. Each waits in the queue as a request of its own, with its own priority, deadline and
cancellation; when the first of them is taken for a run, the others leave the queue and get that run's outputs,
and an identical request arriving while that run is under way waits for it rather than queueing. A run answers
its sharers even when the caller that it was queued for has gone.

Without merging, a version whose runs take only microseconds (an average under `inline_below`) runs on the
event loop: the hop to a compute thread and back costs several times more than such a run. Every run is timed in
the calling thread's CPU time, so a version that turns slow (an average over `INLINE_STAY_FACTOR` times
`inline_below`) goes back to the threads; one whose runs hold the loop that long by the wall clock while they wait
for other threads leaves it for good (`INLINE_WALL_RUNS`); and a request with more than `INLINE_MAX_BYTES` of
inputs always runs on a thread, however fast the version's recent runs were. A run on the loop that outlasts
`INLINE_RUN_LIMIT` (its length may follow its input's values) is stopped by a watching thread and run again on a
compute thread, and the version never runs on the loop again.

Versions share the engine's compute threads, so a batch handed to them may wait for a thread behind other
versions' batches. A request whose deadline passes there, or whose caller goes away, is dropped when a thread
takes the batch up, as in the queue: it never runs, and gets QueueTimeout. A batch already running on a thread is
stopped when the last caller waiting for it goes away: its `Abort` is set, which ends the run early where the
execute function can (ONNX Runtime's terminate flag), and what it produced is thrown away.

Durations (time queued, compute, the batching delay) are measured with time.perf_counter: an event loop's own
clock may tick in whole milliseconds (uvloop's does). Deadlines stay in loop time, where the loop's timers are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from modelforge_inference.domain import BatchingConfig
from modelforge_inference.errors import ModelUnloading, QueueFull, QueueTimeout
from modelforge_inference.signature import batch_key, batch_rows, counted_rows, request_bytes

log = logging.getLogger("modelforge.inference.batcher")

# Weight of the newest run in the moving average of run times.
_RUN_WEIGHT = 0.2
# A version running on the event loop goes back to the compute threads only when its runs average this many times
# inline_below. On a busy machine the same small model's runs vary about twofold from one moment to the next (the
# loop's other work evicts its weights from the CPU caches): with one threshold, a version near it switched back
# and forth, and spent a good part of its time paying the hop that running on the loop saves.
INLINE_STAY_FACTOR = 2.5
# A version whose last this many runs on the loop each held it longer than INLINE_STAY_FACTOR times inline_below
# never runs there again. Its runs are timed in the calling thread's CPU time, which leaves out what they wait for
# on other threads (ONNX Runtime's own intra-op threads): such a run can hold the loop several times longer than it
# counts. The shortest of several runs, not their average, is what is compared, since a run the system interrupted
# for another process takes as long on the wall clock as a run that waited.
INLINE_WALL_RUNS = 8
# Inputs beyond this run on a compute thread even when the version's runs average microseconds: the average was
# taken on small requests, and a large one would hold the event loop.
INLINE_MAX_BYTES = 64 << 10

Feeds = Mapping[str, np.ndarray]
# Arrays a request's caller wants outputs written into, by output name (see ModelSession.run); None: no such wish.
Into = Mapping[str, np.ndarray] | None
Outcome = dict[str, np.ndarray] | BaseException


# The longest a run on the event loop may take before it is stopped and run again on a compute thread. A version
# runs there only while its runs average microseconds, but a run's length may follow its input's values (a loop's
# trip count, a shape read from an input): nothing else on the loop runs meanwhile, health checks included.
INLINE_RUN_LIMIT = 0.1
# How often the watching thread looks at the runs under way: a few times per INLINE_RUN_LIMIT.
_WATCH_SECONDS = INLINE_RUN_LIMIT / 4


class _InlineWatch:
    """Stops a run on an event loop that outlasts INLINE_RUN_LIMIT. Nothing on the loop can while it runs, so a
    thread of its own looks, a few times per limit, at the run each loop thread has under way."""

    def __init__(self) -> None:
        self._runs: dict[int, tuple[float, Abort]] = {}  # by loop thread: when its run must end, and its Abort
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def begin(self, abort: Abort) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="modelforge-inline-watch", daemon=True)
                    self._thread.start()
        self._runs[threading.get_ident()] = (time.monotonic() + INLINE_RUN_LIMIT, abort)

    def end(self) -> None:
        self._runs.pop(threading.get_ident(), None)

    def _watch(self) -> None:
        while True:
            time.sleep(_WATCH_SECONDS)
            now = time.monotonic()
            for until, abort in list(self._runs.values()):
                if now >= until:
                    abort.set()


_inline_watch = _InlineWatch()


class Abort:
    """Set on the event loop when every caller of a batch running on a compute thread has gone away. The run
    registers what would stop it early with `on_abort`; the hooks run once, at once if already set."""

    __slots__ = ("_hooks", "_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._hooks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_abort(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if not self._set:
                self._hooks.append(hook)
                return
        hook()


class RanApart(list[Outcome]):
    """The outcomes of a merged batch whose requests its execute function ran one by one after all (the merged run
    failed on an input, or its outputs did not split into the requests' rows): statistics count a run each."""


# Runs a batch on a worker thread: one feeds mapping and one Into per request in, one outputs mapping (or error)
# per request out. The Abort is set when nobody waits for the run any more (None: the run is on the event loop,
# where nothing can stop it).
Execute = Callable[[Sequence[Feeds], Sequence[Into], Abort | None], list[Outcome]]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one request gets back from the batcher."""

    outputs: dict[str, np.ndarray]
    queue_seconds: float
    compute_seconds: float
    batch_rows: int  # rows of the run the request was part of
    # The outputs of an identical request's run: this request did not run them, and the request whose run it was
    # (or, when its caller left, the first identical request answered) is the one that reports them as its own.
    shared: bool = False


@dataclass(eq=False, slots=True)
class _Pending:
    feeds: Feeds
    rows: int | None  # None: the inputs disagree on dimension 0 (or are scalars): the request always runs alone
    key: Hashable
    level: int
    enqueued: float  # time.perf_counter()
    future: asyncio.Future[BatchResult]
    expires_at: float | None = None  # event-loop time (time.monotonic on asyncio's and uvloop's loops)
    timer: asyncio.TimerHandle | None = None
    queued: bool = True
    share: Hashable | None = None  # identical requests have equal keys; None: never shared
    sharers: list[_Pending] | None = None  # identical requests answered by this one's run
    into: Into = None
    run: _Run | None = None  # the run on a compute thread that answers this request, once there is one


@dataclass(eq=False, slots=True)
class _Run:
    """A batch handed to a compute thread: its requests (each with its sharers) and what stops it."""

    requests: list[_Pending]
    loop: asyncio.AbstractEventLoop
    abort: Abort = field(default_factory=Abort)


@dataclass(slots=True)
class _Collected:
    """A batch the queue makes now: its requests, how many of its first requests make the largest preferred batch
    size (0: none), and whether it is closed, that is whether no request arriving later could join it (it is full,
    or a request that cannot join it waits on the head's level, ahead of any arrival)."""

    batch: list[_Pending]
    preferred: int
    closed: bool


@dataclass(slots=True)
class _Queues:
    levels: list[collections.deque[_Pending]] = field(default_factory=list)
    size: int = 0


class Batcher:
    """The queue and scheduler of one model version. Start it once; aclose it when the version is unloaded.

    Args:
        model, version: Named in errors.
        config: Batching settings; max_batch_size 0 runs every request alone (priorities and deadlines still apply).
        mergeable: False when the model cannot be batched (some input or output has a fixed leading dimension).
        execute: Runs a batch; called on `executor`.
        concurrency: Batches of this version that may run at the same time.
        on_execution: Called on the loop after every successful run with (rows, requests, compute seconds).
        inline_below: Without merging, run on the event loop once the version's recent runs (a moving average of
            the calling thread's CPU time) took less than this many seconds, and until they take INLINE_STAY_FACTOR
            times as long, or hold the loop that long by the wall clock (see INLINE_WALL_RUNS); 0 never does.
    """

    def __init__(
        self,
        *,
        model: str,
        version: int,
        config: BatchingConfig,
        mergeable: bool,
        execute: Execute,
        executor: Executor,
        concurrency: int = 1,
        on_execution: Callable[[int, int, float], None] | None = None,
        inline_below: float = 0.0,
    ) -> None:
        self.model = model
        self.version = version
        self.config = config
        self._merging = mergeable and config.max_batch_size > 0
        # A model without a batch dimension (V2 ModelConfig: max_batch_size 0) takes one inference per request,
        # whatever its first dimension holds, as Triton counts it; a request of it is never merged either.
        self._rows: Callable[[Feeds], int | None] = batch_rows if mergeable else _one_inference
        self._execute_fn = execute
        self._executor = executor
        self._on_execution = on_execution
        self._queues = _Queues([collections.deque() for _ in range(max(1, config.priority_levels))])
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._delay = config.max_queue_delay_us / 1_000_000
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._inline_below = 0.0 if self._merging else inline_below
        self._run_seconds: float | None = None  # moving average of execute's own CPU time; None until a run
        self._inline = False  # whether runs went to the loop when last decided (see _runs_inline)
        self._loop_walls: collections.deque[float] = collections.deque(maxlen=INLINE_WALL_RUNS)
        self._waiting: dict[Hashable, list[_Pending]] = {}  # share key -> the queued requests with that key
        self._sharing: dict[Hashable, _Pending] = {}  # share key -> the request whose run is under way

    @property
    def merging(self) -> bool:
        """Whether requests are merged into batches: batching is on for a model that allows it, and no merged run
        has shown otherwise (see stop_merging)."""
        return self._merging

    def stop_merging(self) -> None:
        """Runs every later request alone: a merged run showed that the outputs do not follow the batch dimension.
        Callable from a compute thread (one attribute, read by the loop before each batch)."""
        self._merging = False

    @property
    def queued(self) -> int:
        """Requests waiting to run."""
        return self._queues.size

    @property
    def running(self) -> int:
        """Batches running now."""
        return len(self._running)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._serve(), name=f"batcher {self.model}:{self.version}")

    async def aclose(self) -> None:
        """Stops taking work; requests still queued fail with ModelUnloading; running batches finish."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for level in self._queues.levels:
            while level:
                pending = level.popleft()
                self._queues.size -= 1
                self._dequeued(pending)
                if not pending.future.done():
                    pending.future.set_exception(ModelUnloading(self.model, self.version))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def level_of(self, priority: int) -> int:
        """Priority 1 is the most urgent level; 0 and anything past the last level mean the last level."""
        levels = len(self._queues.levels)
        return priority - 1 if 1 <= priority <= levels else levels - 1

    async def submit(
        self,
        feeds: Feeds,
        *,
        priority: int = 0,
        expires_at: float | None = None,
        share: Hashable | None = None,
        into: Into = None,
    ) -> BatchResult:
        """Queues a request and waits for its outputs.

        expires_at (event-loop time) is when the request must have started running; past it, the request leaves
        the queue with QueueTimeout. Raises QueueFull at once when the queue holds max_queue_size requests.
        share: a key that requests with identical feeds (and wanting the same outputs) share; they run once.
        into: arrays to write outputs into, handed to execute with the feeds (never given together with share:
            the arrays are the caller's alone).
        """
        if self._closed:
            raise ModelUnloading(self.model, self.version)
        loop = asyncio.get_running_loop()
        if expires_at is not None and expires_at <= loop.time():
            raise self._timed_out(0.0)
        if share is not None and (running := self._sharing.get(share)) is not None:
            # Nothing is queued: it waits for a run already under way, within its own deadline.
            return await self._share_run(running, self.level_of(priority), expires_at)
        if self._queues.size >= self.config.max_queue_size:
            raise QueueFull(self.model, self.version, self._queues.size)
        # Nobody waits ahead of it and the run takes microseconds: run it now, in the caller's task, instead of
        # handing it to the scheduler task and back. A run stopped for outlasting INLINE_RUN_LIMIT is queued.
        if (
            self._queues.size == 0
            and self._runs_inline()
            and request_bytes(feeds) <= INLINE_MAX_BYTES
            and (result := self._run_now(feeds, into)) is not None
        ):
            return result
        pending = _Pending(
            feeds=feeds,
            rows=self._rows(feeds),
            key=batch_key(feeds) if self._merging else None,
            level=self.level_of(priority),
            enqueued=time.perf_counter(),
            future=loop.create_future(),
            expires_at=expires_at,
            share=share,
            into=into,
        )
        pending.future.add_done_callback(functools.partial(self._abandon, pending))
        future = pending.future
        self._enqueue(pending)
        del pending
        try:
            return await future
        finally:
            # On failure the exception's traceback holds this frame, and the future holds the exception: a frame
            # left holding the future (or the request) would make a cycle, keeping the inputs until the collector.
            del future

    async def _share_run(self, running: _Pending, level: int, expires_at: float | None) -> BatchResult:
        sharer = _Pending(
            feeds=running.feeds,
            rows=running.rows,
            key=running.key,
            level=level,
            enqueued=time.perf_counter(),
            future=asyncio.get_running_loop().create_future(),
            expires_at=expires_at,
            queued=False,
            share=running.share,
            run=running.run,
        )
        self._add_sharer(running, sharer)
        sharer.future.add_done_callback(functools.partial(self._abandon, sharer))
        future = sharer.future
        del sharer, running
        try:
            return await future
        finally:
            del future  # as in submit

    # -- queue bookkeeping -----------------------------------------------------------------------------------

    def _enqueue(self, pending: _Pending) -> None:
        """Queues a request on its level in arrival order (a request put back may have arrived before others)."""
        level = self._queues.levels[pending.level]
        if level and level[-1].enqueued > pending.enqueued:
            level.insert(next(i for i, queued in enumerate(level) if queued.enqueued > pending.enqueued), pending)
        else:
            level.append(pending)
        pending.queued = True
        pending.run = None
        self._queues.size += 1
        if pending.share is not None:
            self._waiting.setdefault(pending.share, []).append(pending)
        if pending.expires_at is not None:
            pending.timer = asyncio.get_running_loop().call_at(pending.expires_at, self._expire, pending)
        self._arrived.set()

    def _remove(self, pending: _Pending) -> None:
        if pending.queued:
            self._queues.levels[pending.level].remove(pending)
            self._queues.size -= 1
            self._dequeued(pending)
            self._arrived.set()  # it may have been the head whose delay the scheduler waits out

    def _dequeued(self, pending: _Pending) -> None:
        pending.queued = False
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if pending.share is not None and (waiting := self._waiting.get(pending.share)) is not None:
            waiting.remove(pending)
            if not waiting:
                del self._waiting[pending.share]

    @staticmethod
    def _add_sharer(pending: _Pending, sharer: _Pending) -> None:
        if pending.sharers is None:
            pending.sharers = []
        pending.sharers.append(sharer)

    def _expire(self, pending: _Pending) -> None:
        if pending.queued and not pending.future.done():
            self._remove(pending)
            waited = time.perf_counter() - pending.enqueued
            pending.future.set_exception(self._timed_out(waited))

    def _abandon(self, pending: _Pending, future: asyncio.Future[BatchResult]) -> None:
        """The caller went away: a queued request never runs; a run on a thread that nobody waits for stops."""
        if not future.cancelled():
            return
        if pending.queued:
            self._remove(pending)
        elif (run := pending.run) is not None and not any(_waiting(request) for request in run.requests):
            self._unshare(run.requests)  # an identical request arriving now queues anew, not for a stopped run
            run.abort.set()

    def _head(self) -> _Pending:
        return next(level[0] for level in self._queues.levels if level)

    def _collect(self, head: _Pending) -> _Collected:
        """The head and the requests after it, by priority then age, up to the first one that cannot join it (other
        trailing dimensions, no batch dimension, or more rows than max_batch_size leaves): no request runs before
        one queued ahead of it."""
        limit = self.config.max_batch_size
        batch, rows = [head], counted_rows(head.rows)
        preferred = 1 if rows in self._preferred else 0
        if head.rows is None or rows >= limit:
            return _Collected(batch, preferred, closed=True)
        shares = {head.share}  # an identical request is answered by the run, not run again
        for level in self._queues.levels:
            for pending in level:
                if pending is head or (pending.share is not None and pending.share in shares):
                    continue
                if pending.rows is None or pending.key != head.key or rows + pending.rows > limit:
                    # Requests arriving from now on queue behind it on its level, or on a less urgent one.
                    return _Collected(batch, preferred, closed=pending.level == head.level)
                shares.add(pending.share)
                batch.append(pending)
                rows += pending.rows
                if rows in self._preferred:
                    preferred = len(batch)
                if rows == limit:
                    return _Collected(batch, preferred, closed=True)
        return _Collected(batch, preferred, closed=False)

    # -- scheduling ------------------------------------------------------------------------------------------

    def _runs_inline(self) -> bool:
        """Whether runs happen on the event loop: no merging, and recent runs averaged under inline_below, or under
        INLINE_STAY_FACTOR times that for a version already running there."""
        average = self._run_seconds
        if average is None:
            return False
        self._inline = average < self._inline_below * (INLINE_STAY_FACTOR if self._inline else 1.0)
        return self._inline

    async def _serve(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            self._dispatch(batch)
            # Waiting for the next batch, the scheduler holds nothing of this one: its requests' futures hold
            # their outputs, which their callers may have long dropped.
            del batch

    def _dispatch(self, batch: list[_Pending]) -> None:
        if (
            self._runs_inline()
            and all(request_bytes(p.feeds) <= INLINE_MAX_BYTES for p in batch)
            and self._run_inline(batch)
        ):
            return
        task = asyncio.create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        while True:
            while self._queues.size == 0:
                self._arrived.clear()
                await self._arrived.wait()
            head = self._head()
            if not self._merging or head.rows is None:
                self._take([head])
                return [head]
            collected = self._collect(head)
            batch = collected.batch
            remaining = head.enqueued + self._delay - time.perf_counter()
            if collected.closed or remaining <= 0:  # it cannot grow, or its head has waited long enough
                self._take(batch)
                return batch
            if collected.preferred:  # the largest preferred batch the queue makes now leaves now, the rest after
                batch = batch[: collected.preferred]
                self._take(batch)
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    def _take(self, batch: list[_Pending]) -> None:
        for pending in batch:
            level = self._queues.levels[pending.level]
            if level and level[0] is pending:
                level.popleft()
            else:
                level.remove(pending)
            self._queues.size -= 1
            self._dequeued(pending)
        for pending in batch:
            if pending.share is not None:
                for identical in self._waiting.pop(pending.share, ()):
                    self._remove(identical)
                    self._add_sharer(pending, identical)
                self._sharing[pending.share] = pending

    def _unshare(self, batch: list[_Pending]) -> None:
        """Ends the sharing of a batch's runs: identical requests arriving from now on queue anew."""
        for pending in batch:
            if pending.share is not None and self._sharing.get(pending.share) is pending:
                del self._sharing[pending.share]

    def _live(self, batch: list[_Pending]) -> list[_Pending]:
        """The requests of a batch that someone still waits for (its caller or a request sharing its run); the
        others are dropped, and stop being shared at once, so that no request waits for a run that will not be."""
        live = []
        for pending in batch:
            if _waiting(pending):
                live.append(pending)
            else:
                self._unshare([pending])
        return live

    def _timed(self, feeds: Sequence[Feeds], into: Sequence[Into], abort: Abort | None = None) -> list[Outcome]:
        """execute, timed for the moving average in the thread's CPU time, on the loop as on a compute thread. Wall
        time would count, on a thread, its waits for the GIL (on a busy loop they make a 10 us run look slow), and
        on either, the moments the system gave the core to another process: on a busy machine a run on the loop
        then looked slower than the same run on a thread, and the version kept changing sides. A run stopped early
        says nothing of the model's speed and is left out."""
        started = time.thread_time()
        try:
            return self._execute_fn(feeds, into, abort)
        finally:
            took = time.thread_time() - started
            average = self._run_seconds
            if abort is None or not abort.is_set():
                self._run_seconds = took if average is None else average + _RUN_WEIGHT * (took - average)

    def _on_loop(self, feeds: list[Feeds], into: list[Into]) -> tuple[list[Outcome], float, float] | None:
        """Runs a batch on the event loop: one outcome per request, when it started and how long it took. None
        when the run outlasted INLINE_RUN_LIMIT and was stopped: this batch is to run on a compute thread, and so
        is every later run of the version."""
        started = time.perf_counter()
        abort = Abort()
        _inline_watch.begin(abort)
        try:
            outcomes = self._timed(feeds, into, abort)
        except Exception as exc:
            outcomes = [exc] * len(feeds)
        finally:
            _inline_watch.end()
        took = time.perf_counter() - started
        walls = self._loop_walls
        walls.append(took)
        if len(walls) == walls.maxlen and min(walls) > self._inline_below * INLINE_STAY_FACTOR:
            self._inline_below = 0.0
            log.info(
                "%s:%s: its runs on the event loop held it for %.0f us or more, beyond what they cost this thread "
                "(they wait for other threads); they run on the compute threads from now on",
                self.model,
                self.version,
                min(walls) * 1e6,
            )
        if abort.is_set():
            self._inline_below = 0.0  # its runs' length follows their input: never on the loop again
            if any(isinstance(outcome, BaseException) for outcome in outcomes):
                log.warning(
                    "%s:%s: a run on the event loop took over %.0f ms and was stopped; it runs again, and the "
                    "version's runs from now on, on the compute threads",
                    self.model,
                    self.version,
                    INLINE_RUN_LIMIT * 1000,
                )
                return None
        return outcomes, started, took

    def _run_now(self, feeds: Feeds, into: Into) -> BatchResult | None:
        """One request run on the loop, never queued: its outcome goes straight back to the caller. None when the
        run was stopped (see `_on_loop`)."""
        ran = self._on_loop([feeds], [into])
        if ran is None:
            return None
        (outcome,), _, compute = ran
        if isinstance(outcome, BaseException):
            raise outcome
        rows = counted_rows(self._rows(feeds))
        if self._on_execution is not None:
            self._on_execution(rows, 1, compute)
        return BatchResult(outcome, 0.0, compute, rows)

    def _run_inline(self, batch: list[_Pending]) -> bool:
        """Runs a batch on the loop and settles it; False, with nothing settled or released, when the run was
        stopped (see `_on_loop`) and the batch is to run on a compute thread."""
        settled = True
        try:
            live = self._live(batch)
            if live:
                ran = self._on_loop([p.feeds for p in live], [p.into for p in live])
                if ran is None:
                    settled = False
                    return False
                self._settle(live, *ran)
            return True
        finally:
            if settled:
                self._unshare(batch)
                self._slots.release()

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            live = self._live(batch)
            if not live:
                return
            run = _Run(live, loop)
            for pending in live:
                for request in _with_sharers(pending):
                    request.run = run
            handed = time.perf_counter()
            try:
                ran, outcomes, started, late = await loop.run_in_executor(self._executor, self._on_thread, run)
            except Exception as exc:  # the executor refused the batch: nothing ran, and every request shares the error
                self._settle(live, [exc] * len(live), handed, 0.0, executed=False)
                return
            if run.abort.is_set():  # stopped: every caller has gone, and its outcome (a failure) is nobody's
                return
            self._time_out(late, started)  # first, so that a run is reported by a request still waiting for it
            if ran:
                self._settle(ran, outcomes, started, time.perf_counter() - started)
            self._requeue_joiners(run, ran)
        finally:
            self._unshare(batch)  # after answering, with no await between: no sharer can arrive unanswered
            self._slots.release()
            # A request and its run refer to each other; left so, the outputs in its future would wait for the
            # cycle collector, and ONNX Runtime would allocate afresh for every large answer meanwhile.
            for pending in batch:
                for request in _with_sharers(pending):
                    request.run = None

    def _timed_out(self, waited: float) -> QueueTimeout:
        """The error of a request whose deadline passed after `waited` seconds in the queue; it names the batch
        delay when the model merges requests, since a request may have waited that long for company."""
        delay = self.config.max_queue_delay_us if self._merging else 0
        return QueueTimeout(self.model, self.version, waited, delay)

    def _time_out(self, late: Sequence[_Pending], started: float) -> None:
        for request in late:
            if not request.future.done():
                waited = max(0.0, started - request.enqueued)
                request.future.set_exception(self._timed_out(waited))

    def _on_late(self, run: _Run, late: list[_Pending], started: float) -> None:
        """On the loop, as soon as a compute thread found requests of `run` late: they get QueueTimeout now, and
        the run stops if they were all that some request of it still had waiting."""
        self._time_out(late, started)
        if not run.abort.is_set() and not any(_waiting(request) for request in run.requests):
            self._unshare(run.requests)
            run.abort.set()

    def _requeue_joiners(self, run: _Run, ran: list[_Pending]) -> None:
        """Queues again the identical requests that joined a request of `run` after the compute thread had left it
        out (its caller gone or its deadline passed): no run answers them."""
        for pending in run.requests:
            if pending in ran:
                continue
            for sharer in pending.sharers or ():
                if sharer.future.done():
                    continue
                if self._closed:
                    sharer.future.set_exception(ModelUnloading(self.model, self.version))
                else:
                    self._enqueue(sharer)
            pending.sharers = None

    def _on_thread(self, run: _Run) -> tuple[list[_Pending], list[Outcome], float, list[_Pending]]:
        """Runs a batch on a compute thread. Returns the requests that ran with their outcomes, when the run
        started, and the requests (sharers included) whose deadline had passed by then.

        The batch may have waited for a thread behind other versions' batches. A request whose deadline passed
        meanwhile, or whose caller left, is left out of the run, unless an identical request still waits for it;
        the late ones get QueueTimeout. (A future's state read off the loop: a caller going away as it is read is
        the same race as one going away during the run.)"""
        started = time.perf_counter()
        now = time.monotonic()  # the event loop's clock
        late = [
            request
            for pending in run.requests
            for request in _with_sharers(pending)
            if request.expires_at is not None and now >= request.expires_at and not request.future.done()
        ]
        ran = [pending for pending in run.requests if _awaited(pending, now)]
        if late and ran:
            run.loop.call_soon_threadsafe(self._on_late, run, late, started)
        outcomes = self._timed([p.feeds for p in ran], [p.into for p in ran], run.abort) if ran else []
        return ran, outcomes, started, late

    def _settle(
        self, live: list[_Pending], outcomes: list[Outcome], started: float, compute: float, *, executed: bool = True
    ) -> None:
        rows = sum(counted_rows(pending.rows) for pending in live)
        if executed and self._on_execution is not None:  # statistics count successful runs only, as Triton's do
            succeeded = [p for p, outcome in zip(live, outcomes, strict=True) if not isinstance(outcome, BaseException)]
            if isinstance(outcomes, RanApart):
                for pending in succeeded:
                    self._on_execution(counted_rows(pending.rows), 1, compute / len(live))
            elif succeeded:
                self._on_execution(sum(counted_rows(p.rows) for p in succeeded), len(succeeded), compute)
        for pending, outcome in zip(live, outcomes, strict=True):
            # The request whose run it was reports the outputs as its own (and so stores them in the prediction
            # cache); when its caller has gone, the first identical request answered does.
            owned = _answer(pending, outcome, started, compute, rows)
            for sharer in pending.sharers or ():
                owned = _answer(sharer, outcome, started, compute, rows, shared=owned) or owned


def _one_inference(feeds: Feeds) -> None:
    """The rows of a request to a model without a batch dimension: None, which counts as one inference."""
    return None


def _with_sharers(pending: _Pending) -> tuple[_Pending, ...]:
    """The request and the identical requests its run answers."""
    return (pending, *(pending.sharers or ()))


def _waiting(pending: _Pending) -> bool:
    """Whether a caller still waits for this request's run: its own or an identical request's."""
    return any(not request.future.done() for request in _with_sharers(pending))


def _awaited(pending: _Pending, now: float) -> bool:
    """Whether anyone still waits for this request's run: its own caller or an identical request, not gone and
    within its deadline (``now`` in event-loop time)."""
    return any(
        not request.future.done() and (request.expires_at is None or now < request.expires_at)
        for request in _with_sharers(pending)
    )


def _answer(
    pending: _Pending, outcome: Outcome, started: float, compute: float, rows: int, *, shared: bool = False
) -> bool:
    """Answers one request with its batch's outcome; False when its caller went away and nobody was answered."""
    if pending.future.done():
        return False
    if isinstance(outcome, BaseException):
        pending.future.set_exception(outcome)
    else:
        waited = max(0.0, started - pending.enqueued)  # a sharer may arrive after the run began
        pending.future.set_result(BatchResult(outcome, waited, compute, rows, shared))
    return True


def split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]] | None:
    """Splits the outputs of a merged run back per request (views, no copies); None if they do not line up."""
    total = sum(rows)
    if any(array.ndim == 0 or array.shape[0] != total for array in outputs.values()):
        return None
    parts: list[dict[str, np.ndarray]] = []
    start = 0
    for count in rows:
        parts.append({name: array[start : start + count] for name, array in outputs.items()})
        start += count
    return parts

"""Batcher policy without servers: merging, priorities, queue bounds, deadlines, cancellation, shutdown.

The execute function runs on a real thread pool; a gate (threading.Event) holds the first batch so that the
tests decide what is queued behind it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from modelforge_inference import batcher as batcher_module
from modelforge_inference.batcher import (
    INLINE_MAX_BYTES,
    INLINE_STAY_FACTOR,
    INLINE_WALL_RUNS,
    Abort,
    Batcher,
    BatchResult,
    Execute,
    Feeds,
    Into,
    Outcome,
    RanApart,
    split,
)
from modelforge_inference.domain import BatchingConfig
from modelforge_inference.errors import ModelUnloading, QueueFull, QueueTimeout


class Recorder:
    """Doubles its input; records every batch and the arrays each request wants outputs in; the first batch waits
    for `gate`."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.into: list[list[Into]] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        self.started.set()
        self.gate.wait(10)
        self.batches.append([float(f["x"][0, 0]) for f in batch])
        self.into.append(list(into))
        merged = np.concatenate([f["x"] for f in batch])
        return list(split({"y": merged * 2}, [f["x"].shape[0] for f in batch]) or [])


@pytest.fixture
async def pool() -> AsyncIterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(1)
    yield executor
    executor.shutdown(wait=True)


def make(
    pool: ThreadPoolExecutor,
    recorder: Execute,
    *,
    on_execution: Callable[[int, int, float], None] | None = None,
    **config: object,
) -> Batcher:
    batcher = Batcher(
        model="m",
        version=1,
        config=BatchingConfig(**config),  # type: ignore[arg-type]
        mergeable=True,
        execute=recorder,
        executor=pool,
        concurrency=1,
        on_execution=on_execution,
    )
    batcher.start()
    return batcher


async def busy(pool: ThreadPoolExecutor, **options: Any) -> tuple[Recorder, Batcher, asyncio.Future[BatchResult]]:
    """A started batcher whose first request, feeds(0), holds its only compute slot until the recorder's gate
    opens: what a test submits next waits in the queue."""
    recorder = Recorder()
    batcher = make(pool, recorder, **options)
    first = asyncio.ensure_future(batcher.submit(feeds(0)))
    await wait_started(recorder)
    return recorder, batcher, first


def feeds(value: float, rows: int = 1, width: int = 2) -> Feeds:
    return {"x": np.full((rows, width), value, dtype=np.float32)}


def unbatched(executor: ThreadPoolExecutor, execute: Execute, **options: Any) -> Batcher:
    """A started batcher that never merges (max_batch_size 0), running tiny runs on the loop unless told otherwise."""
    batcher = Batcher(
        model="m",
        version=1,
        config=BatchingConfig(max_batch_size=0),
        mergeable=True,
        execute=execute,
        executor=executor,
        **{"inline_below": 0.01, **options},
    )
    batcher.start()
    return batcher


async def wait_started(recorder: Recorder) -> None:
    await asyncio.to_thread(recorder.started.wait, 10)


async def test_compatible_requests_merge_and_outputs_split_back(pool):
    recorder, batcher, first = await busy(pool, max_batch_size=8, max_queue_delay_us=100_000)
    rest = [asyncio.ensure_future(batcher.submit(feeds(v, rows=2))) for v in (1, 2, 3, 4)]
    odd = asyncio.ensure_future(batcher.submit(feeds(9, width=3)))  # other trailing dims: never merged
    await asyncio.sleep(0)

    recorder.gate.set()
    results = await asyncio.gather(first, *rest, odd)

    assert recorder.batches[0] == [0.0]
    assert sorted(map(sorted, recorder.batches[1:])) == [[1.0, 2.0, 3.0, 4.0], [9.0]]
    for value, result in zip((0, 1, 2, 3, 4, 9), results, strict=True):
        assert np.all(result.outputs["y"] == 2 * value)
    assert results[1].batch_rows == 8 and results[1].outputs["y"].shape == (2, 2)
    await batcher.aclose()


async def test_each_request_hands_its_own_output_arrays_to_execute_in_a_merged_batch(pool):
    recorder, batcher, first = await busy(pool, max_batch_size=8, max_queue_delay_us=100_000)
    arrays = {value: {"y": np.empty((1, 2), np.float32)} for value in (1.0, 3.0)}
    rest = [asyncio.ensure_future(batcher.submit(feeds(v), into=arrays.get(v))) for v in (1.0, 2.0, 3.0)]
    await asyncio.sleep(0)

    recorder.gate.set()
    await asyncio.gather(first, *rest)

    assert recorder.into[0] == [None]
    assert recorder.batches[1] == [1.0, 2.0, 3.0]
    assert recorder.into[1] == [arrays[1.0], None, arrays[3.0]]
    await batcher.aclose()


async def test_a_request_run_on_the_loop_hands_its_output_arrays_to_execute(pool):
    handed: list[Sequence[Into]] = []

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        handed.append(into)
        return [{"y": item["x"]} for item in batch]

    batcher = unbatched(pool, execute)
    arrays = {"y": np.empty((1, 2), np.float32)}
    try:
        await batcher.submit(feeds(1.0))  # unmeasured: a compute thread
        await batcher.submit(feeds(2.0), into=arrays)  # measured tiny: the loop, in the caller's task
        assert [list(into) for into in handed] == [[None], [arrays]]
    finally:
        await batcher.aclose()


async def test_priority_levels_are_strict_and_fifo_within(pool):
    recorder, batcher, first = await busy(pool, priority_levels=3)
    order = [(1, 3), (2, 1), (3, 0), (4, 2), (5, 1), (6, 3)]  # (value, priority); 0 means the last level
    tasks = [asyncio.ensure_future(batcher.submit(feeds(v), priority=p)) for v, p in order]
    await asyncio.sleep(0)

    recorder.gate.set()
    await asyncio.gather(first, *tasks)

    assert [b[0] for b in recorder.batches] == [0, 2, 5, 4, 1, 3, 6]
    await batcher.aclose()


async def test_full_queue_refuses_at_once(pool):
    recorder, batcher, first = await busy(pool, max_queue_size=2)
    queued = [asyncio.ensure_future(batcher.submit(feeds(v))) for v in (1, 2)]
    await asyncio.sleep(0)

    with pytest.raises(QueueFull):
        await batcher.submit(feeds(3))

    recorder.gate.set()
    await asyncio.gather(first, *queued)


async def test_expired_request_leaves_the_queue_and_never_runs(pool):
    recorder, batcher, first = await busy(pool)
    loop = asyncio.get_running_loop()

    with pytest.raises(QueueTimeout):
        await batcher.submit(feeds(1), expires_at=loop.time() + 0.01)
    assert batcher.queued == 0

    recorder.gate.set()
    await first
    await batcher.aclose()
    assert recorder.batches == [[0.0]]


async def test_cancelled_request_never_runs(pool):
    recorder, batcher, first = await busy(pool)
    doomed = asyncio.ensure_future(batcher.submit(feeds(1)))
    await asyncio.sleep(0)
    assert batcher.queued == 1

    doomed.cancel()
    await asyncio.sleep(0)

    assert batcher.queued == 0
    recorder.gate.set()
    await first
    await batcher.aclose()
    assert recorder.batches == [[0.0]]


async def test_preferred_size_leaves_without_waiting_for_the_delay(pool):
    recorder = Recorder()
    recorder.gate.set()
    batcher = make(pool, recorder, max_batch_size=8, max_queue_delay_us=60_000_000, preferred_batch_sizes=(2,))

    async with asyncio.timeout(10):  # far less than the 60 s delay
        await asyncio.gather(batcher.submit(feeds(1)), batcher.submit(feeds(2)))

    assert recorder.batches == [[1.0, 2.0]]
    await batcher.aclose()


async def test_the_largest_preferred_batch_the_queue_makes_leaves_at_once_then_the_next(pool):
    # Preferred sizes 1 and 4: the busy request (one row) leaves at once; five queued rows make a batch of four.
    recorder, batcher, first = await busy(
        pool, max_batch_size=8, max_queue_delay_us=60_000_000, preferred_batch_sizes=(1, 4)
    )
    queued = [asyncio.ensure_future(batcher.submit(feeds(v))) for v in (1, 2, 3, 4, 5)]
    await asyncio.sleep(0)

    recorder.gate.set()
    async with asyncio.timeout(10):  # far less than the 60 s delay
        await asyncio.gather(first, *queued)

    assert recorder.batches == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0]]
    await batcher.aclose()


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # (value, priority, width): a request that cannot join the batch closes it, whatever comes after it
        ([(1, 1, 2), (2, 2, 2), (3, 1, 3)], [[1.0], [3.0], [2.0]]),  # no level-2 request before a level-1 one
        ([(1, 1, 2), (2, 1, 3), (3, 1, 2)], [[1.0], [2.0], [3.0]]),  # first in, first out within a level
        ([(1, 1, 2), (2, 1, 2), (3, 1, 2)], [[1.0, 2.0, 3.0]]),
    ],
)
async def test_a_batch_ends_at_the_first_queued_request_that_cannot_join_it(pool, order, expected):
    recorder, batcher, first = await busy(pool, max_batch_size=8, priority_levels=2)
    tasks = [asyncio.ensure_future(batcher.submit(feeds(v, width=w), priority=p)) for v, p, w in order]
    await asyncio.sleep(0)

    recorder.gate.set()
    await asyncio.gather(first, *tasks)

    assert recorder.batches == [[0.0], *expected]
    await batcher.aclose()


async def busy_in_full(pool: ThreadPoolExecutor, **options: Any) -> tuple[Recorder, Batcher, asyncio.Future[Any]]:
    """As busy(), with a 60 s delay: the busy request is a full batch (8 rows), which leaves at once."""
    recorder = Recorder()
    batcher = make(pool, recorder, max_batch_size=8, max_queue_delay_us=60_000_000, **options)
    first = asyncio.ensure_future(batcher.submit(feeds(0, rows=8)))
    await wait_started(recorder)
    return recorder, batcher, first


@pytest.mark.parametrize("blocker", [{"rows": 6}, {"width": 3}])
async def test_a_batch_that_cannot_grow_leaves_without_waiting_for_the_delay(pool, blocker):
    # Behind the head on its level waits a request that cannot join it: whatever arrives next queues behind that
    # one, so waiting for the delay would only add the delay.
    recorder, batcher, first = await busy_in_full(pool)
    head = asyncio.ensure_future(batcher.submit(feeds(1, rows=3)))
    blocked = asyncio.ensure_future(batcher.submit(feeds(2, **blocker)))
    await asyncio.sleep(0)

    recorder.gate.set()
    async with asyncio.timeout(10):  # far less than the 60 s delay
        await asyncio.gather(first, head)

    assert recorder.batches[:2] == [[0.0], [1.0]]
    assert not blocked.done()  # alone, it waits for company up to the delay
    await batcher.aclose()


async def test_a_batch_blocked_on_a_less_urgent_level_still_waits_for_urgent_company(pool):
    recorder, batcher, first = await busy_in_full(pool, priority_levels=2)
    head = asyncio.ensure_future(batcher.submit(feeds(1), priority=1))
    asyncio.ensure_future(batcher.submit(feeds(2, width=3), priority=2))  # cannot join, but is less urgent
    await asyncio.sleep(0)
    recorder.gate.set()
    await first
    await asyncio.sleep(0.05)
    assert not head.done()  # an urgent arrival could still join it
    company = asyncio.ensure_future(batcher.submit(feeds(3), priority=1))
    await asyncio.sleep(0)
    assert batcher.queued == 3
    await batcher.aclose()
    for waiting in (head, company):
        with pytest.raises(ModelUnloading):
            await waiting


async def test_a_request_that_would_overflow_the_batch_closes_it(pool):
    recorder, batcher, first = await busy(pool, max_batch_size=8)
    tasks = [asyncio.ensure_future(batcher.submit(feeds(v, rows=r))) for v, r in ((1, 4), (2, 8), (3, 4))]
    await asyncio.sleep(0)

    recorder.gate.set()
    await asyncio.gather(first, *tasks)

    assert recorder.batches == [[0.0], [1.0], [2.0], [3.0]]  # 3 does not ride ahead of 2 in 1's batch
    await batcher.aclose()


async def test_without_batching_every_request_runs_alone(pool):
    recorder = Recorder()
    recorder.gate.set()
    batcher = make(pool, recorder, max_batch_size=0)

    await asyncio.gather(*(batcher.submit(feeds(v)) for v in range(4)))

    assert recorder.batches == [[0.0], [1.0], [2.0], [3.0]]
    await batcher.aclose()


async def test_close_fails_what_is_queued(pool):
    recorder, batcher, first = await busy(pool)
    queued = asyncio.ensure_future(batcher.submit(feeds(1)))
    await asyncio.sleep(0)

    closing = asyncio.ensure_future(batcher.aclose())
    await asyncio.sleep(0)
    recorder.gate.set()
    await closing

    assert np.all((await first).outputs["y"] == 0)
    with pytest.raises(ModelUnloading):
        await queued
    with pytest.raises(ModelUnloading):
        await batcher.submit(feeds(2))


# -- identical requests (the `share` key) ---------------------------------------------------------------------


async def test_identical_requests_run_once_at_the_most_urgent_of_their_places(pool):
    recorder, batcher, first = await busy(pool, priority_levels=3)
    late = asyncio.ensure_future(batcher.submit(feeds(5), priority=3, share="k"))
    other = asyncio.ensure_future(batcher.submit(feeds(7), priority=2))
    urgent = asyncio.ensure_future(batcher.submit(feeds(5), priority=1, share="k"))
    await asyncio.sleep(0)
    assert batcher.queued == 3  # each waits as a request of its own

    recorder.gate.set()
    results = await asyncio.gather(first, late, other, urgent)

    assert recorder.batches == [[0.0], [5.0], [7.0]]  # the level-1 copy ran, before level 2, and answered both
    assert [np.all(r.outputs["y"] == 2 * v) for r, v in zip(results, (0, 5, 7, 5), strict=True)] == [True] * 4
    assert [r.shared for r in results] == [False, True, False, False]
    assert batcher.queued == 0
    await batcher.aclose()


async def test_identical_requests_keep_their_own_deadline_and_cancellation(pool):
    recorder, batcher, first = await busy(pool)
    loop = asyncio.get_running_loop()
    hasty = asyncio.ensure_future(batcher.submit(feeds(5), expires_at=loop.time() + 0.01, share="k"))
    patient = asyncio.ensure_future(batcher.submit(feeds(5), share="k"))
    leaving = asyncio.ensure_future(batcher.submit(feeds(5), share="k"))
    await asyncio.sleep(0)

    with pytest.raises(QueueTimeout):  # the first of them left at its own deadline; the others stay queued
        await hasty
    leaving.cancel()
    await asyncio.sleep(0)
    assert batcher.queued == 1 and not patient.done()

    recorder.gate.set()
    assert np.all((await patient).outputs["y"] == 10)
    await first
    assert recorder.batches == [[0.0], [5.0]]
    await batcher.aclose()


async def test_an_identical_request_arriving_during_the_run_waits_for_it_even_if_its_first_caller_left(pool):
    recorder = Recorder()
    batcher = make(pool, recorder)
    running = asyncio.ensure_future(batcher.submit(feeds(5), share="k"))
    await wait_started(recorder)
    joining = asyncio.ensure_future(batcher.submit(feeds(5), share="k"))
    await asyncio.sleep(0)
    assert batcher.queued == 0

    running.cancel()
    await asyncio.sleep(0)
    recorder.gate.set()
    result = await joining

    # The run was the cancelled request's; with its caller gone, the request that joined it reports the outputs as
    # its own (so that the engine stores them in the prediction cache) rather than as shared.
    assert np.all(result.outputs["y"] == 10) and not result.shared
    assert recorder.batches == [[5.0]]
    again = await batcher.submit(feeds(5), share="k")  # the run is over: an identical request runs anew
    assert not again.shared
    assert recorder.batches == [[5.0], [5.0]]
    await batcher.aclose()


async def test_a_run_stops_when_the_last_caller_waiting_for_it_leaves(pool):
    aborts: list[Abort] = []
    started = threading.Event()

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        assert abort is not None  # a run on a compute thread can always be stopped
        aborts.append(abort)
        if len(aborts) > 1:
            return [{"y": item["x"] * 2} for item in batch]
        stopped = threading.Event()  # the first run lasts until it is stopped, as ONNX Runtime's does
        abort.on_abort(stopped.set)
        started.set()
        stopped.wait(10)
        return [RuntimeError("terminated") for _ in batch]

    executions: list[int] = []
    batcher = make(pool, execute, max_batch_size=2, on_execution=lambda rows, _, __: executions.append(rows))
    first = asyncio.ensure_future(batcher.submit(feeds(5), share="k"))
    second = asyncio.ensure_future(batcher.submit(feeds(6)))  # merged with the first: two rows
    await asyncio.to_thread(started.wait, 10)
    joining = asyncio.ensure_future(batcher.submit(feeds(5), share="k"))  # waits for the run under way
    await asyncio.sleep(0)
    assert batcher.queued == 0

    for leaving in (first, second):
        leaving.cancel()
        await asyncio.sleep(0)
        assert not aborts[0].is_set()  # someone still waits for the run
    joining.cancel()
    await asyncio.sleep(0)
    assert aborts[0].is_set()

    # An identical request now queues anew rather than waiting for the stopped run, and gets outputs.
    again = await batcher.submit(feeds(5), share="k")
    np.testing.assert_array_equal(again.outputs["y"], feeds(5)["x"] * 2)
    assert not again.shared and len(aborts) == 2
    assert executions == [1]  # the stopped run counts as no execution
    for leaving in (first, second, joining):
        assert leaving.cancelled()
    await batcher.aclose()


async def behind_a_busy_version(
    pool: ThreadPoolExecutor, **options: Any
) -> tuple[Recorder, Batcher, asyncio.Future[BatchResult], Recorder, Batcher]:
    """Two versions on one compute thread, as the engine's versions share its threads: A's first run holds the
    thread (see busy); B, its gate open and its own slot free, hands each batch to the pool at once, where it
    waits behind A's run. Returns A's recorder, batcher and first request, then B's recorder and batcher."""
    recorder_a, batcher_a, first = await busy(pool)
    recorder_b = Recorder()
    recorder_b.gate.set()
    return recorder_a, batcher_a, first, recorder_b, make(pool, recorder_b, **options)


async def test_a_request_that_expires_while_its_batch_waits_for_a_shared_thread_never_runs(pool):
    # B's batch waits in the pool behind A's run, where no queue timer watches it.
    recorder_a, batcher_a, first, recorder_b, batcher_b = await behind_a_busy_version(pool, max_batch_size=0)
    loop = asyncio.get_running_loop()
    hasty = asyncio.ensure_future(batcher_b.submit(feeds(1), expires_at=loop.time() + 0.05))
    await asyncio.sleep(0.01)
    assert batcher_b.queued == 0 and batcher_b.running == 1  # handed to the pool, not yet on a thread
    await asyncio.sleep(0.1)  # its deadline passes while A holds the only thread

    recorder_a.gate.set()
    with pytest.raises(QueueTimeout):
        await hasty
    await first
    assert recorder_b.batches == []
    assert (await batcher_b.submit(feeds(3))).outputs["y"][0, 0] == 6  # B runs again once the thread is free
    await batcher_a.aclose()
    await batcher_b.aclose()


async def test_a_request_cancelled_while_its_batch_waits_for_a_shared_thread_never_runs(pool):
    recorder_a, batcher_a, first, recorder_b, batcher_b = await behind_a_busy_version(pool, max_batch_size=0)
    leaving = asyncio.ensure_future(batcher_b.submit(feeds(2)))
    await asyncio.sleep(0.01)
    assert batcher_b.queued == 0 and batcher_b.running == 1  # handed to the pool, not yet on a thread
    leaving.cancel()
    await asyncio.sleep(0.01)

    recorder_a.gate.set()
    await first
    assert (await batcher_b.submit(feeds(3))).outputs["y"][0, 0] == 6
    assert recorder_b.batches == [[3.0]]
    await batcher_a.aclose()
    await batcher_b.aclose()


async def test_a_late_request_in_a_shared_threads_queue_runs_only_for_an_identical_one_still_waiting(pool):
    recorder_a, batcher_a, first, recorder_b, batcher_b = await behind_a_busy_version(pool)
    loop = asyncio.get_running_loop()
    late = asyncio.ensure_future(batcher_b.submit(feeds(4), expires_at=loop.time() + 0.05, share="k"))
    await asyncio.sleep(0.01)
    patient = asyncio.ensure_future(batcher_b.submit(feeds(4), share="k"))  # joins the run handed to the pool
    await asyncio.sleep(0.1)

    recorder_a.gate.set()
    with pytest.raises(QueueTimeout):
        await late
    result = await patient
    assert np.all(result.outputs["y"] == 8)
    assert not result.shared  # the late request's caller got no outputs: the one that did reports them
    assert recorder_b.batches == [[4.0]]
    await first
    await batcher_a.aclose()
    await batcher_b.aclose()


async def test_a_large_request_runs_on_a_thread_even_when_the_versions_runs_are_tiny(pool):
    threads: list[int] = []

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        threads.append(threading.get_ident())
        return [{"y": item["x"]} for item in batch]

    batcher = unbatched(pool, execute)
    try:
        loop_thread = threading.get_ident()
        await batcher.submit(feeds(1.0))  # unmeasured: a compute thread
        await batcher.submit(feeds(2.0))  # measured tiny: the loop
        assert threads[1] == loop_thread
        large = feeds(3.0, width=INLINE_MAX_BYTES // 4 + 1)  # float32: one byte over the bound
        await batcher.submit(large)
        assert threads[2] != loop_thread
        await batcher.submit(feeds(4.0))  # small again: back on the loop
        assert threads[3] == loop_thread
    finally:
        await batcher.aclose()


def _burn(seconds: float) -> None:
    """Keeps this thread's CPU busy for `seconds` of its CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


@pytest.fixture
def patient_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """No run on the loop is stopped for its length: on a loaded machine a run of a few milliseconds of CPU may
    take longer than INLINE_RUN_LIMIT by the wall clock."""
    monkeypatch.setattr(batcher_module, "INLINE_RUN_LIMIT", 60.0)


async def test_a_version_on_the_loop_stays_there_until_its_runs_take_well_over_the_threshold(
    pool, patient_loop, monkeypatch
):
    # A small model's runs on a busy machine vary about twofold: with a single threshold a version near it went
    # back and forth between the loop and the threads.
    monkeypatch.setattr(batcher_module, "INLINE_WALL_RUNS", 1_000_000)  # CPU time alone decides here
    threshold = 0.002
    threads: list[int] = []
    cost = [0.0]

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        threads.append(threading.get_ident())
        _burn(cost[0])
        return [{"y": item["x"]} for item in batch]

    batcher = unbatched(pool, execute, inline_below=threshold)
    try:
        loop_thread = threading.get_ident()
        await batcher.submit(feeds(1.0))  # unmeasured: a compute thread
        assert threads[-1] != loop_thread
        await batcher.submit(feeds(1.0))  # measured tiny: the loop
        assert threads[-1] == loop_thread
        cost[0] = threshold * (1 + INLINE_STAY_FACTOR) / 2  # over the threshold, under the factor
        for _ in range(12):  # the average reaches the runs' own time
            await batcher.submit(feeds(1.0))
            assert threads[-1] == loop_thread
        cost[0] = threshold * INLINE_STAY_FACTOR * 2
        for _ in range(6):
            await batcher.submit(feeds(1.0))
        assert threads[-1] != loop_thread  # slow enough: back to the threads
        cost[0] = threshold * (1 + INLINE_STAY_FACTOR) / 2
        for _ in range(12):  # the same runs that stayed on the loop do not bring it back there
            await batcher.submit(feeds(1.0))
            assert threads[-1] != loop_thread
        cost[0] = 0.0
        for _ in range(20):
            await batcher.submit(feeds(1.0))
        assert threads[-1] == loop_thread  # fast again: the loop
    finally:
        await batcher.aclose()


async def test_a_run_on_the_loop_is_timed_by_the_cpu_it_takes_not_the_time_it_is_kept_waiting(pool, patient_loop):
    # A run on the loop of a busy machine waits while the system runs other processes; counted as the run's own
    # time, it sent a fast version to the threads.
    threads: list[int] = []

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        threads.append(threading.get_ident())
        if len(threads) % 4:
            time.sleep(0.03)  # 30 ms waited, next to no CPU: as if the core went to another process
        return [{"y": item["x"]} for item in batch]

    batcher = unbatched(pool, execute, inline_below=0.01)
    try:
        loop_thread = threading.get_ident()
        for _ in range(16):
            await batcher.submit(feeds(1.0))
        assert threads[0] != loop_thread  # unmeasured: a compute thread
        assert threads[1:] == [loop_thread] * 15
    finally:
        await batcher.aclose()


async def test_a_version_whose_runs_keep_the_loop_waiting_on_other_threads_leaves_it_for_good(pool, patient_loop):
    # A run's CPU time counts the calling thread only: a session with intra-op threads of its own does part of the
    # work elsewhere while the loop waits for it.
    threads: list[int] = []
    waits = [True]

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        threads.append(threading.get_ident())
        if waits[0]:
            time.sleep(0.03)  # over INLINE_STAY_FACTOR x 10 ms by the wall clock, next to no CPU here
        return [{"y": item["x"]} for item in batch]

    batcher = unbatched(pool, execute, inline_below=0.01)
    try:
        loop_thread = threading.get_ident()
        for _ in range(1 + INLINE_WALL_RUNS):  # one unmeasured run on a thread, then the loop
            await batcher.submit(feeds(1.0))
        assert threads == [threads[0]] + [loop_thread] * INLINE_WALL_RUNS
        assert threads[0] != loop_thread
        await batcher.submit(feeds(1.0))
        assert threads[-1] != loop_thread  # each of its last runs there held the loop too long
        waits[0] = False
        for _ in range(10):  # fast and cheap now, yet never back on the loop
            await batcher.submit(feeds(1.0))
            assert threads[-1] != loop_thread
    finally:
        await batcher.aclose()


async def test_a_finished_request_leaves_nothing_for_the_cycle_collector_to_free(pool):
    # ONNX Runtime does not hand back memory it allocated for outputs that stay alive: outputs held in a reference
    # cycle until the collector happens to run made a server's memory grow with every large answer.
    made: list[weakref.ref[np.ndarray]] = []

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        merged = np.concatenate([f["x"] for f in batch]) * 2
        made.append(weakref.ref(merged))
        return list(split({"y": merged}, [f["x"].shape[0] for f in batch]) or [])

    batcher = make(pool, execute, max_batch_size=8, max_queue_delay_us=2_000)
    gc.disable()
    try:
        requests = [batcher.submit(feeds(v)) for v in range(3)]
        requests += [batcher.submit(feeds(7), share="same") for _ in range(2)]  # one run, answering both
        results = await asyncio.gather(*requests)
        assert [float(r.outputs["y"][0, 0]) for r in results] == [0.0, 2.0, 4.0, 14.0, 14.0]
        del results, requests
        for _ in range(3):  # the futures' done callbacks run on the next turns of the loop
            await asyncio.sleep(0)
        alive = [ref for ref in made if ref() is not None]
        assert made and not alive, f"{len(alive)} of {len(made)} runs' outputs still held"
    finally:
        gc.enable()
        await batcher.aclose()


async def test_identical_requests_take_one_row_of_a_merged_batch(pool):
    executions: list[tuple[int, int]] = []
    recorder, batcher, first = await busy(
        pool,
        max_batch_size=8,
        max_queue_delay_us=100_000,
        on_execution=lambda rows, requests, _: executions.append((rows, requests)),
    )
    queued = [
        asyncio.ensure_future(batcher.submit(feeds(value), share=share))
        for value, share in ((5, "k"), (6, None), (5, "k"), (5, "k"))
    ]
    await asyncio.sleep(0)

    recorder.gate.set()
    results = await asyncio.gather(first, *queued)

    assert recorder.batches == [[0.0], [5.0, 6.0]]
    assert executions == [(1, 1), (2, 2)]
    assert [r.shared for r in results] == [False, False, False, True, True]
    assert all(r.batch_rows == 2 for r in results[1:])
    await batcher.aclose()


def test_split_refuses_outputs_that_do_not_follow_the_batch():
    assert split({"y": np.zeros((3, 2))}, [1, 1]) is None
    parts = split({"y": np.arange(6).reshape(3, 2)}, [1, 2])
    assert parts is not None and parts[1]["y"].tolist() == [[2, 3], [4, 5]]


# A batchable model with batching off counts a request's rows; a model without a batch dimension (mergeable False)
# counts one inference per request, whatever its first dimension holds, as Triton does for max_batch_size 0.
@pytest.mark.parametrize(("max_batch_size", "mergeable", "counted"), [(0, True, 3), (8, False, 1)])
async def test_a_request_run_alone_counts_its_rows_or_one_inference(
    pool, max_batch_size: int, mergeable: bool, counted: int
):
    recorder = Recorder()
    recorder.gate.set()
    executions: list[tuple[int, int]] = []
    batcher = Batcher(
        model="m",
        version=1,
        config=BatchingConfig(max_batch_size=max_batch_size),
        mergeable=mergeable,
        execute=recorder,
        executor=pool,
        on_execution=lambda rows, requests, _: executions.append((rows, requests)),
    )
    batcher.start()

    result = await batcher.submit(feeds(1, rows=3))

    assert result.batch_rows == counted
    assert executions == [(counted, 1)]
    await batcher.aclose()


async def test_a_run_that_fails_is_no_execution_in_the_statistics(pool):
    """As Triton's execution and inference counts: successful runs only, on a thread or on the loop."""

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        return [ValueError("bad") if float(item["x"][0, 0]) < 0 else {"y": item["x"]} for item in batch]

    executions: list[tuple[int, int]] = []
    batcher = unbatched(pool, execute, on_execution=lambda rows, requests, _: executions.append((rows, requests)))
    try:
        for value in (-1.0, -2.0):  # the first on a compute thread, the second on the loop
            with pytest.raises(ValueError):
                await batcher.submit(feeds(value, rows=3))
        await batcher.submit(feeds(1.0, rows=2))
        assert executions == [(2, 1)]
    finally:
        await batcher.aclose()


async def test_a_merged_run_that_ran_apart_counts_the_runs_that_succeeded(pool):
    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        outcomes = [ValueError("bad") if float(item["x"][0, 0]) < 0 else {"y": item["x"]} for item in batch]
        return RanApart(outcomes) if len(batch) > 1 else outcomes

    executions: list[tuple[int, int]] = []
    batcher = make(
        pool, execute, max_batch_size=5, on_execution=lambda rows, requests, _: executions.append((rows, requests))
    )
    try:
        bad, good = batcher.submit(feeds(-1.0, rows=2)), batcher.submit(feeds(1.0, rows=3))  # a full batch
        outcomes = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(outcomes[0], ValueError) and not isinstance(outcomes[1], BaseException)
        assert executions == [(3, 1)]
    finally:
        await batcher.aclose()


async def test_tiny_unbatched_runs_move_onto_the_loop_and_slow_ones_back_to_threads(pool):
    threads: list[int] = []
    delay = {"spin": 0.0}

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        threads.append(threading.get_ident())
        end = time.thread_time() + delay["spin"]
        while time.thread_time() < end:  # busy work, counted in the thread's CPU time
            pass
        return [{"y": item["x"]} for item in batch]

    batcher = unbatched(pool, execute)
    try:
        loop_thread = threading.get_ident()
        await batcher.submit(feeds(1.0))  # unmeasured: a compute thread
        await batcher.submit(feeds(2.0))  # measured tiny: the loop
        assert threads[0] != loop_thread
        assert threads[1] == loop_thread
        delay["spin"] = 0.05  # turns slow: the average passes the bound, later runs leave the loop
        for value in range(5):
            await batcher.submit(feeds(float(value)))
        assert threads[-1] != loop_thread
    finally:
        await batcher.aclose()


async def test_a_tiny_run_with_nobody_queued_runs_in_the_callers_task(pool):
    tasks: list[asyncio.Task[object] | None] = []

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        tasks.append(asyncio.current_task() if threading.current_thread() is threading.main_thread() else None)
        return [{"y": item["x"] * 2} for item in batch]

    executions: list[tuple[int, int]] = []
    batcher = unbatched(pool, execute, on_execution=lambda rows, requests, seconds: executions.append((rows, requests)))
    try:
        await batcher.submit(feeds(1.0))  # unmeasured: a compute thread
        result = await batcher.submit(feeds(3.0, rows=2))
        assert tasks == [None, asyncio.current_task()]
        np.testing.assert_array_equal(result.outputs["y"], feeds(3.0, rows=2)["x"] * 2)
        assert (result.queue_seconds, result.batch_rows) == (0.0, 2)
        assert executions == [(1, 1), (2, 1)]
        assert batcher.queued == 0
    finally:
        await batcher.aclose()


async def test_a_tiny_run_that_fails_raises_in_the_callers_task(pool):
    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        return [ValueError(f"bad {float(item['x'][0, 0])}") for item in batch]

    batcher = unbatched(pool, execute)
    try:
        for value in (1.0, 2.0):  # the first on a thread, the second on the loop
            with pytest.raises(ValueError, match=f"bad {value}"):
                await batcher.submit(feeds(value))
    finally:
        await batcher.aclose()


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _whole_milliseconds(values: Sequence[float]) -> bool:
    return all(abs(v * 1000 - round(v * 1000)) < 1e-9 for v in values)


@pytest.mark.parametrize("inline", [False, True], ids=["threads", "loop"])
def test_timings_are_precise_on_uvloop_whose_clock_ticks_in_milliseconds(inline):
    uvloop = pytest.importorskip("uvloop")

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        _spin(0.0015)
        return [{"y": item["x"]} for item in batch]

    async def main() -> list[float]:
        assert _whole_milliseconds([asyncio.get_running_loop().time()])  # what makes the loop's clock unfit
        with ThreadPoolExecutor(1) as executor:
            batcher = unbatched(executor, execute, inline_below=1.0 if inline else 0.0)
            try:
                await batcher.submit(feeds(0.0))  # the first run is measured: later ones may run on the loop
                return [(await batcher.submit(feeds(float(i)))).compute_seconds for i in range(5)]
            finally:
                await batcher.aclose()

    computes = asyncio.Runner(loop_factory=uvloop.new_event_loop).run(main())
    assert all(c >= 0.0015 for c in computes), computes
    assert not _whole_milliseconds(computes), computes


def test_a_lone_request_waits_the_whole_sub_millisecond_batching_delay_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[float]:
        with ThreadPoolExecutor(1) as executor:
            batcher = make(executor, Recorder(), max_batch_size=8, max_queue_delay_us=600)
            batcher._execute_fn.gate.set()  # type: ignore[attr-defined]
            try:
                return [(await batcher.submit(feeds(float(i)))).queue_seconds for i in range(5)]
            finally:
                await batcher.aclose()

    waits = asyncio.Runner(loop_factory=uvloop.new_event_loop).run(main())
    assert all(w >= 0.0006 for w in waits), waits
    assert not _whole_milliseconds(waits), waits


async def merging_behind_a_busy_version(
    pool: ThreadPoolExecutor, execute: Execute
) -> tuple[Recorder, asyncio.Future[BatchResult], Batcher]:
    """A version whose batches wait for the pool's only thread, which another version's first run holds until its
    recorder's gate opens; and that batcher, merging up to 8 rows, taking a batch once it has 2."""
    other, _, first = await busy(pool)
    return other, first, make(pool, execute, max_batch_size=8, max_queue_delay_us=100_000, preferred_batch_sizes=(2,))


@pytest.mark.parametrize("left_by", ["cancel", "deadline"])
async def test_an_identical_request_joining_a_request_left_out_of_its_run_is_queued_again(pool, left_by):
    recorder = Recorder()
    other, first, batcher = await merging_behind_a_busy_version(pool, recorder)
    loop = asyncio.get_running_loop()
    expires_at = loop.time() + 0.05 if left_by == "deadline" else None
    left = asyncio.ensure_future(batcher.submit(feeds(4), share="k", expires_at=expires_at))
    kept = asyncio.ensure_future(batcher.submit(feeds(5)))
    await asyncio.sleep(0.1)  # the two are merged and handed over; they wait for the thread (and a deadline passes)
    assert (batcher.queued, batcher.running) == (0, 1)
    if left_by == "cancel":
        left.cancel()

    other.gate.set()
    await first
    await wait_started(recorder)  # the run under way holds `kept` alone: `left` was left out
    joiner = asyncio.ensure_future(batcher.submit(feeds(4), share="k"))  # identical to `left`: joins its run
    await asyncio.sleep(0.01)
    recorder.gate.set()

    assert float((await kept).outputs["y"][0, 0]) == 10.0
    with pytest.raises(asyncio.CancelledError if left_by == "cancel" else QueueTimeout):
        await left
    async with asyncio.timeout(5):  # no run answered it: it was queued again, and ran on its own
        assert float((await joiner).outputs["y"][0, 0]) == 8.0
    assert recorder.batches == [[5.0], [4.0]]


async def test_an_identical_request_joining_a_run_keeps_its_own_deadline(pool):
    recorder = Recorder()
    recorder.gate.set()
    other, _, first = await busy(pool)
    batcher = make(pool, recorder, max_batch_size=0)  # a request is taken, and shared, as soon as it arrives
    loop = asyncio.get_running_loop()
    owner = asyncio.ensure_future(batcher.submit(feeds(4), share="k", expires_at=loop.time() + 0.05))
    await asyncio.sleep(0.01)  # taken from the queue: the run waits for the thread
    joiner = asyncio.ensure_future(batcher.submit(feeds(4), share="k", expires_at=loop.time() + 0.05))
    with pytest.raises(QueueTimeout):  # past its deadline already: refused at once, not joined
        await batcher.submit(feeds(4), share="k", expires_at=loop.time() - 1)
    await asyncio.sleep(0.2)  # both deadlines pass before any thread takes the run up

    other.gate.set()
    await first
    for request in (owner, joiner):
        with pytest.raises(QueueTimeout):
            await request
    assert recorder.batches == []  # the model never ran for requests all past their deadline


async def test_a_run_stops_when_its_last_caller_leaves_and_only_late_requests_remain(pool):
    aborts: list[Abort] = []
    started = threading.Event()

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        assert abort is not None
        aborts.append(abort)
        stopped = threading.Event()
        abort.on_abort(stopped.set)
        started.set()
        stopped.wait(10)  # a long run that ends early when stopped
        return [{"y": f["x"] * 2} for f in batch]

    other, first, batcher = await merging_behind_a_busy_version(pool, execute)
    loop = asyncio.get_running_loop()
    late = asyncio.ensure_future(batcher.submit(feeds(4), expires_at=loop.time() + 0.05))
    last = asyncio.ensure_future(batcher.submit(feeds(5)))
    await asyncio.sleep(0.1)  # `late`'s deadline passes while the merged batch waits for the thread
    other.gate.set()
    await first
    await asyncio.to_thread(started.wait, 10)  # the run, for `last` alone, is under way
    with pytest.raises(QueueTimeout):
        await late  # answered as soon as the thread left it out, not after the run
    assert not aborts[0].is_set()

    last.cancel()
    async with asyncio.timeout(5):
        while not aborts[0].is_set():
            await asyncio.sleep(0.005)


async def test_a_batch_the_executor_refuses_fails_its_callers_and_counts_no_execution():
    executions: list[int] = []
    executor = ThreadPoolExecutor(1)
    executor.shutdown()
    batcher = make(executor, Recorder(), max_batch_size=2, on_execution=lambda rows, _, __: executions.append(rows))
    try:
        with pytest.raises(RuntimeError, match="shutdown"):
            await asyncio.wait_for(batcher.submit(feeds(1.0)), 5)
        assert executions == []
        assert batcher.queued == 0
    finally:
        await batcher.aclose()


async def test_a_run_on_the_loop_that_outlasts_its_limit_is_stopped_and_runs_again_on_a_thread():
    # A version whose runs took microseconds runs on the event loop; a run that turns long there (a loop whose trip
    # count is an input) held the loop, health checks and every other model included, until it ended by itself.
    loop_thread = threading.get_ident()
    calls: list[tuple[bool, bool]] = []  # per run: on the loop thread, stopped

    def execute(batch: Sequence[Feeds], into: Sequence[Into], abort: Abort | None) -> list[Outcome]:
        on_loop = threading.get_ident() == loop_thread
        if batch[0]["x"][0, 0] == 1.0 and on_loop:  # the long run: it stops only when told to (ONNX Runtime's
            stopped = threading.Event()  # terminate flag)
            assert abort is not None
            abort.on_abort(stopped.set)
            calls.append((on_loop, stopped.wait(30)))
            return [RuntimeError("Exiting due to terminate flag being set to true.")]
        calls.append((on_loop, False))
        return [{"y": item["x"] * 2} for item in batch]

    with ThreadPoolExecutor(1) as executor:
        batcher = unbatched(executor, execute, inline_below=1.0)
        try:
            await batcher.submit(feeds(0.0))  # measured: runs go to the loop from now on
            await batcher.submit(feeds(0.0))
            assert calls[-1] == (True, False)
            started = time.monotonic()
            result = await asyncio.wait_for(batcher.submit(feeds(1.0)), 30)
            assert time.monotonic() - started < 10  # stopped after INLINE_RUN_LIMIT, not after the 30 s wait
            assert np.all(result.outputs["y"] == 2.0)  # and answered from the run on a thread
            assert calls[-2:] == [(True, True), (False, False)]
            await batcher.submit(feeds(0.0))
            assert calls[-1] == (False, False)  # the version's runs stay on the threads
        finally:
            await batcher.aclose()


@pytest.mark.parametrize("ending", ["deadline", "cancel", "close"])
async def test_a_failed_request_leaves_its_inputs_to_no_cycle(pool, ending: str):
    # A request that fails in the queue (its deadline, its caller leaving, the version unloaded) raises through
    # frames that its exception's traceback keeps: none of them may hold the request, or its inputs stay until the
    # cycle collector runs, which under overload, where timeouts are many, is a lot of memory.
    recorder, batcher, first = await busy(pool)
    gc.disable()
    try:
        inputs = feeds(1, rows=1024, width=1024)
        held = weakref.ref(inputs["x"])
        expires = asyncio.get_running_loop().time() + 0.01 if ending == "deadline" else None
        request = asyncio.ensure_future(batcher.submit(inputs, expires_at=expires))
        del inputs
        await asyncio.sleep(0)
        if ending == "cancel":
            request.cancel()
        elif ending == "close":
            closing = asyncio.ensure_future(batcher.aclose())
            await asyncio.sleep(0)
            recorder.gate.set()
            await closing
        with pytest.raises((QueueTimeout, asyncio.CancelledError, ModelUnloading)):
            await request
        del request
        for _ in range(3):  # done callbacks run on the next turns of the loop
            await asyncio.sleep(0)
        assert held() is None
    finally:
        gc.enable()
        recorder.gate.set()
        await first
        await batcher.aclose()

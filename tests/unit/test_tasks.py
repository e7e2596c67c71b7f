"""Stopping background tasks that absorb cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from modelforge_server import tasks


async def test_a_task_that_absorbs_one_cancellation_is_cancelled_again() -> None:
    async def absorbs_once() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # what a library that swallows a cancellation does
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    task = asyncio.create_task(absorbs_once())
    await asyncio.sleep(0)
    assert await tasks.stop(task, timeout=5.0)
    assert task.cancelled()


async def test_a_task_that_never_ends_is_left_after_the_timeout_and_nudged_meanwhile() -> None:
    release = asyncio.Event()
    nudges: list[int] = []

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    async def nudge() -> None:
        nudges.append(1)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert not await tasks.stop(task, timeout=0.3, nudge=nudge)
    assert nudges and not task.done()
    release.set()
    await task

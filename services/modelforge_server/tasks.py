"""Stopping background tasks within a bound, even when a library absorbs a cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


async def stop(
    task: asyncio.Task[Any], *, timeout: float = 5.0, nudge: Callable[[], Awaitable[object]] | None = None
) -> bool:
    """Cancels `task` until it ends, for at most `timeout` seconds; True when it ended.

    A cancellation that lands inside a library that absorbs it (psycopg, while it connects) is repeated at the
    task's next await. `nudge` runs after each cancellation, for what the task may be blocked on (closing the
    connection a LISTEN waits on, say).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        if nudge is not None:
            await nudge()
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        return False
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return True

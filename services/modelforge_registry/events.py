"""Fans model events out to watchers; every replica hears every change through PostgreSQL LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from modelforge_registry.domain import EventType, ModelEvent
from modelforge_registry.errors import DatabaseUnavailable, ReplicaStopping, WatchInterrupted
from modelforge_registry.store import EVENTS_CHANNEL
from modelforge_server import db, tasks

log = logging.getLogger("modelforge.registry.events")

# A watcher that falls this many events behind is disconnected (with UNAVAILABLE) rather than slowing the others.
_QUEUE_LIMIT = 10_000
# Queued to end a watch: the feed broke and events may have been missed, the watcher fell _QUEUE_LIMIT events
# behind, or this replica is shutting down.
_LOST = None
_BEHIND = "behind"
_CLOSED = "closed"
_CLOSE_SECONDS = 5.0
# A feed quiet this long checks that PostgreSQL still answers on its connection, within as long again: a connection
# that PostgreSQL no longer serves (a network cut, a host gone) fails nothing by itself, and its watchers would wait
# for events that never come while other replicas commit changes.
_HEARTBEAT_SECONDS = 10.0


class EventHub:
    """One LISTEN connection per process, shared by all watchers of this replica.

    Events are published inside the writing transaction (store._notify), so PostgreSQL delivers them on commit,
    to every replica, in commit order. When the LISTEN connection breaks, current watchers end with
    WatchInterrupted (they may have missed events) and the hub reconnects in the background. Once closed (the
    server is stopping), current watchers end with ReplicaStopping and new ones are refused with it.
    """

    def __init__(
        self,
        database_url: str,
        *,
        retry_seconds: float = 1.0,
        heartbeat_seconds: float = _HEARTBEAT_SECONDS,
        queue_limit: int = _QUEUE_LIMIT,
    ) -> None:
        self._url = database_url
        self._queue_limit = queue_limit
        self._retry = retry_seconds
        self._heartbeat = heartbeat_seconds
        self._watchers: set[asyncio.Queue[ModelEvent | str | None]] = set()
        self._live = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._closed = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="registry-events")

    async def aclose(self) -> None:
        """Stops listening and ends every watch with ReplicaStopping; later calls do nothing."""
        self._closed = True
        if self._task is not None:
            task, self._task = self._task, None
            # Closing the LISTEN connection ends any wait on it; bounded, so that shutdown never waits on the feed.
            if not await tasks.stop(task, timeout=_CLOSE_SECONDS, nudge=self._close_connection):
                log.warning("the model event feed did not stop within %.0f s; leaving it behind", _CLOSE_SECONDS)
        self._live.set()  # wakes watches still waiting for the feed; they see the hub closed
        self._interrupt(_CLOSED)

    async def _close_connection(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def watch(self, model: str = "", *, wait_seconds: float = 5.0) -> AsyncGenerator[ModelEvent, None]:
        """WATCH_STARTED once the subscription is live, then every later event (of `model` if given)."""
        queue: asyncio.Queue[ModelEvent | str | None] = asyncio.Queue(self._queue_limit)
        try:
            async with asyncio.timeout(wait_seconds):
                while not self._live.is_set():
                    await self._live.wait()
        except TimeoutError:
            raise DatabaseUnavailable() from None
        if self._closed:
            raise ReplicaStopping()
        # Registered in the same step as the check above: the feed is live now, so nothing after this is missed.
        self._watchers.add(queue)
        try:
            yield ModelEvent(type=EventType.WATCH_STARTED, model=model)
            while True:
                event = await queue.get()
                if event is _LOST:
                    raise WatchInterrupted()
                if event == _BEHIND:
                    raise WatchInterrupted(behind=self._queue_limit)
                if isinstance(event, str):
                    raise ReplicaStopping()
                if not model or event.model == model:
                    yield event
        finally:
            self._watchers.discard(queue)

    async def _listen_forever(self) -> None:
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
                    self._conn = conn
                    if self._closed:
                        return
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL)))
                    self._live.set()
                    log.info("listening for model events")
                    while not self._closed:
                        async for notify in conn.notifies(timeout=self._heartbeat):
                            self._publish(_parse(notify.payload))
                        with db.bound(conn, self._heartbeat):  # cut, and so broken, past that
                            await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection broke, or PostgreSQL is down: retry
                if self._live.is_set():
                    log.warning("model event feed interrupted: %s", exc)
            self._live.clear()
            self._interrupt()
            await asyncio.sleep(self._retry)  # back off before reconnecting; not used for synchronisation

    def _publish(self, event: ModelEvent | None) -> None:
        if event is None:
            return
        for queue in list(self._watchers):
            if queue.full():  # a watcher this far behind is cut off rather than holding memory without bound
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(_BEHIND)
                log.warning(
                    "ended a watch of model events that fell %d events behind (its client reads too slowly)",
                    self._queue_limit,
                )
            else:
                queue.put_nowait(event)

    def _interrupt(self, why: str | None = _LOST) -> None:
        for queue in list(self._watchers):
            self._watchers.discard(queue)
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(why)


def _parse(payload: str) -> ModelEvent | None:
    """The event a notification carries, or None (logged) for one the registry did not publish: anyone who may
    connect can NOTIFY on the channel, and what they send must end neither the feed nor a watch."""
    try:
        doc: dict[str, Any] = json.loads(payload)
        event = ModelEvent(
            type=EventType(doc["type"]),
            model=doc["model"],
            version=int(doc.get("version") or 0),
            alias=doc.get("alias") or "",
            event_time=datetime.fromisoformat(doc["event_time"]),
        )
    # OverflowError: an infinite version; RecursionError: JSON nested deeper than the parser goes.
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        event = None
    # Fields of another type would fail each watch as it makes its message; WATCH_STARTED is a watch's own.
    if (
        event is None
        or event.type is EventType.WATCH_STARTED
        or not isinstance(event.model, str)
        or not isinstance(event.alias, str)
        or not 0 <= event.version < 2**63
    ):
        log.error(
            "ignoring a malformed model event on %s (the registry alone should notify there): %r",
            EVENTS_CHANNEL,
            payload,
        )
        return None
    return event

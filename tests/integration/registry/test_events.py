"""The registry's event feed closes promptly whatever it is doing, connecting included, and notices a PostgreSQL
that stopped answering."""

from __future__ import annotations

import asyncio
import json
import logging

import psycopg
import pytest

from modelforge_registry.domain import EventType
from modelforge_registry.errors import WatchInterrupted
from modelforge_registry.events import EventHub
from modelforge_registry.store import EVENTS_CHANNEL
from tests.fixtures.proxy import TcpProxy


async def test_closing_while_the_feed_connects_never_hangs(clean_db: str) -> None:
    for delay in (0.0, 0.001, 0.005, 0.02) * 5:
        hub = EventHub(clean_db)
        await hub.start()
        await asyncio.sleep(delay)  # close at different points of the connection's start
        await asyncio.wait_for(hub.aclose(), timeout=10)


async def test_a_feed_whose_postgresql_went_silent_interrupts_its_watchers_and_comes_back(clean_db: str) -> None:
    """A LISTEN connection that PostgreSQL no longer serves fails nothing by itself: watchers used to wait for
    events that never came while other replicas committed changes. The feed's heartbeat notices it."""
    proxy = await TcpProxy.to_postgres(clean_db)
    hub = EventHub(proxy.url, retry_seconds=0.1, heartbeat_seconds=0.5)
    await hub.start()
    try:
        events = hub.watch()
        assert (await anext(events)).type == EventType.WATCH_STARTED
        proxy.stall()
        with pytest.raises(WatchInterrupted):
            async with asyncio.timeout(10):
                await anext(events)
        await proxy.restore()
        again = hub.watch(wait_seconds=10)
        assert (await anext(again)).type == EventType.WATCH_STARTED  # the feed is live again
        await again.aclose()
    finally:
        await hub.aclose()
        await proxy.close()


async def test_a_watcher_that_falls_behind_is_told_so_not_that_the_feed_broke(
    clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub = EventHub(clean_db, queue_limit=3)
    await hub.start()
    try:
        slow = hub.watch()
        assert (await anext(slow)).type == EventType.WATCH_STARTED
        reader = hub.watch()
        assert (await anext(reader)).type == EventType.WATCH_STARTED
        with caplog.at_level(logging.WARNING, logger="modelforge.registry.events"):
            async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
                for version in range(1, 5):  # one more than the slow watcher holds
                    payload = {"type": "VERSION_CREATED", "model": "m", "version": version, "alias": "",
                               "event_time": "2026-11-25T00:00:00+00:00"}  # fmt: skip
                    await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, json.dumps(payload)))
                    async with asyncio.timeout(10):  # a watcher that keeps up: each event read before the next
                        assert (await anext(reader)).version == version
        with pytest.raises(WatchInterrupted) as ended:
            async with asyncio.timeout(10):
                while True:
                    await anext(slow)
        assert str(ended.value) == (
            "this watch fell 3 events behind and was ended, so events were missed: read them as they come, then "
            "watch again"
        )
        assert [r.getMessage() for r in caplog.records] == [
            "ended a watch of model events that fell 3 events behind (its client reads too slowly)"
        ]
        await reader.aclose()
    finally:
        await hub.aclose()

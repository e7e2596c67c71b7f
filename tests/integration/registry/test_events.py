"""The registry's event feed closes promptly whatever it is doing, connecting included, and notices a PostgreSQL
that stopped answering."""

from __future__ import annotations

import asyncio

import pytest

from modelforge_registry.domain import EventType
from modelforge_registry.errors import WatchInterrupted
from modelforge_registry.events import EventHub
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

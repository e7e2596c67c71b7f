"""The registry's event feed closes promptly whatever it is doing, connecting included, and notices a PostgreSQL
that stopped answering."""

from __future__ import annotations

import asyncio
import json
import logging

import psycopg
import pytest

from modelforge.registry.v1 import registry_pb2 as pb
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


_TIME = '"event_time": "2026-11-25T00:00:00+00:00"'
# Anything another client may send on the channel with pg_notify: none of it is an event the registry published.
MALFORMED = [
    "garbage",
    "",
    "[]",
    '"x"',
    "5",
    "null",
    "{}",
    "[" * 7000,  # nested deeper than the JSON parser goes (a payload is at most 8000 bytes)
    '{"type": "NO_SUCH_EVENT", "model": "m", ' + _TIME + "}",
    '{"type": "MODEL_CREATED", ' + _TIME + "}",  # no model
    '{"type": "MODEL_CREATED", "model": "m"}',  # no event_time
    '{"type": "MODEL_CREATED", "model": "m", "event_time": "yesterday"}',
    '{"type": "MODEL_CREATED", "model": "m", "event_time": 5}',
    '{"type": ["MODEL_CREATED"], "model": "m", ' + _TIME + "}",
    '{"type": "VERSION_CREATED", "model": "m", "version": "one", ' + _TIME + "}",
    '{"type": "VERSION_CREATED", "model": "m", "version": 1e400, ' + _TIME + "}",  # infinity
    '{"type": "VERSION_CREATED", "model": "m", "version": 99999999999999999999, ' + _TIME + "}",  # past int64
    '{"type": "VERSION_CREATED", "model": "m", "version": -1, ' + _TIME + "}",
    '{"type": "MODEL_CREATED", "model": 5, ' + _TIME + "}",
    '{"type": "ALIAS_SET", "model": "m", "version": 1, "alias": 7, ' + _TIME + "}",
    '{"type": "WATCH_STARTED", "model": "m", ' + _TIME + "}",  # only a watch itself says that, never the feed
]


async def notify(database_url: str, *payloads: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for payload in payloads:
            await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, payload))


async def test_malformed_notifications_are_logged_and_skipped_and_the_feed_goes_on(
    clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone allowed to connect may NOTIFY on the channel: what is not an event the registry published is
    skipped, neither ending the watches (as a broken feed would) nor reaching them."""
    hub = EventHub(clean_db, retry_seconds=0.1)
    await hub.start()
    try:
        events = hub.watch()
        assert (await anext(events)).type == EventType.WATCH_STARTED
        with caplog.at_level(logging.WARNING, logger="modelforge.registry.events"):
            real = {"type": "VERSION_CREATED", "model": "m", "version": 3, "event_time": "2026-11-25T00:00:00+00:00"}
            await notify(clean_db, *MALFORMED, json.dumps(real))
            async with asyncio.timeout(10):
                event = await anext(events)  # the first thing the watch sees is the real event
        assert (event.type, event.model, event.version) == (EventType.VERSION_CREATED, "m", 3)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == len(MALFORMED), messages  # one error each, and no "feed interrupted" warning
        assert all(r.levelno == logging.ERROR for r in caplog.records)
        assert all(m.startswith(f"ignoring a malformed model event on {EVENTS_CHANNEL} ") for m in messages)
        await events.aclose()
    finally:
        await hub.aclose()


async def test_a_watch_over_grpc_outlives_malformed_notifications(registry, clean_db: str) -> None:
    """Fields of the wrong type used to reach the stream, which then ended INTERNAL when it made the message."""
    watch = registry.stub.WatchModelEvents(pb.WatchModelEventsRequest())
    try:
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.event.type == pb.MODEL_EVENT_TYPE_WATCH_STARTED
        await notify(clean_db, *MALFORMED)
        await registry.stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="after")))
        event = (await asyncio.wait_for(watch.read(), 10)).event
        assert (event.type, event.model) == (pb.MODEL_EVENT_TYPE_MODEL_CREATED, "after")
    finally:
        watch.cancel()

"""The registry's event feed closes promptly whatever it is doing, connecting included."""

from __future__ import annotations

import asyncio

from modelforge_registry.events import EventHub


async def test_closing_while_the_feed_connects_never_hangs(clean_db: str) -> None:
    for delay in (0.0, 0.001, 0.005, 0.02) * 5:
        hub = EventHub(clean_db)
        await hub.start()
        await asyncio.sleep(delay)  # close at different points of the connection's start
        await asyncio.wait_for(hub.aclose(), timeout=10)

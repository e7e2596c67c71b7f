"""SingleFlight: one piece of work per key, shared by concurrent callers, cancelled when the last one leaves."""

from __future__ import annotations

import asyncio

from modelforge_server.flights import SingleFlight


async def test_single_flight_shares_one_run_and_its_error() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 42

    callers = [asyncio.create_task(flights.run("k", work)) for _ in range(10)]
    while "k" not in flights or runs == 0:
        await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*callers) == [42] * 10
    assert runs == 1
    assert len(flights) == 0

    async def failing() -> int:
        raise RuntimeError("boom")

    results = await asyncio.gather(*(flights.run("k", failing) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)


async def test_single_flight_survives_one_cancelled_caller_and_stops_when_all_leave() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    started = asyncio.Event()
    release = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "done"

    first = asyncio.create_task(flights.run("k", work))
    second = asyncio.create_task(flights.run("k", work))
    await started.wait()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    release.set()
    assert await second == "done"

    release.clear()
    started.clear()
    only = asyncio.create_task(flights.run("k", work))
    await started.wait()
    only.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert "k" not in flights

"""The event loop a service process runs on (MODELFORGE_EVENT_LOOP)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from modelforge_server import app


def loop_module(event_loop: str) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    app.run(main(), event_loop)
    return seen[0]


def test_auto_and_uvloop_run_on_uvloop_when_it_is_installed() -> None:
    assert uvloop.Loop.__module__.startswith("uvloop")
    assert loop_module("auto").startswith("uvloop")
    assert loop_module("uvloop").startswith("uvloop")


def test_asyncio_keeps_the_standard_loop() -> None:
    assert loop_module("asyncio").startswith("asyncio")


def test_an_unknown_loop_is_refused_with_the_variable_to_fix() -> None:
    async def main() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="MODELFORGE_EVENT_LOOP must be auto, uvloop or asyncio"):
        app.run(main(), "trio")


def test_use_event_loop_applies_to_loops_that_libraries_create() -> None:
    previous = asyncio.get_event_loop_policy()
    try:
        app.use_event_loop("auto")
        loop = asyncio.new_event_loop()
        try:
            assert type(loop).__module__.startswith("uvloop")
        finally:
            loop.close()
        app.use_event_loop("asyncio")
        loop = asyncio.new_event_loop()
        try:
            assert type(loop).__module__.startswith("asyncio")
        finally:
            loop.close()
    finally:
        asyncio.set_event_loop_policy(previous)

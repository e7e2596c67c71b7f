"""Inspections: uploaded files are validated in threads, as many at once as a budget of file bytes allows."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from modelforge_registry.domain import OnnxInfo, Signature
from modelforge_registry.onnxfile import Inspected, Inspections
from tests.fixtures.polling import eventually


class Gated:
    """An inspection that waits, in its thread, until the test opens the gate of its file."""

    def __init__(self) -> None:
        self.gates: dict[Path, threading.Event] = {}
        self.started: list[Path] = []

    def __call__(self, path: Path) -> Inspected:
        self.started.append(path)
        self.gates.setdefault(path, threading.Event()).wait(30)
        return Signature(), OnnxInfo()

    def open(self, path: Path) -> None:
        self.gates.setdefault(path, threading.Event()).set()


async def test_files_beyond_the_budget_wait_for_the_ones_being_inspected() -> None:
    gated = Gated()
    inspections = Inspections(100, inspect=gated)
    a, b, c = Path("a.onnx"), Path("b.onnx"), Path("c.onnx")
    first = asyncio.ensure_future(inspections.inspect(a, 60))
    second = asyncio.ensure_future(inspections.inspect(b, 40))  # fits beside the first
    third = asyncio.ensure_future(inspections.inspect(c, 500))  # larger than the budget: takes all of it
    await eventually(lambda: len(gated.started) == 2, "the two that fit to start")
    await asyncio.sleep(0.05)
    assert gated.started == [a, b] and inspections.in_use == 100
    gated.open(a)
    gated.open(b)
    await asyncio.gather(first, second)
    await eventually(lambda: gated.started == [a, b, c], "the large one to start once the others are done")
    assert inspections.in_use == 100
    gated.open(c)
    await third
    await eventually(lambda: inspections.in_use == 0, "the budget to be given back")


async def test_a_caller_that_goes_away_keeps_its_share_until_its_thread_ends() -> None:
    gated = Gated()
    inspections = Inspections(100, inspect=gated)
    a, b = Path("a.onnx"), Path("b.onnx")
    gone = asyncio.ensure_future(inspections.inspect(a, 100))
    await eventually(lambda: gated.started == [a], "the first to start")
    gone.cancel()
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(inspections.inspect(b, 1))
    await asyncio.sleep(0.05)
    assert gated.started == [a]  # the abandoned thread still holds the memory its file needs
    gated.open(a)
    await eventually(lambda: gated.started == [a, b], "the next to start once that thread ended")
    gated.open(b)
    await waiting

"""Where the benchmark's processes run: a CPU set for the suite and one for the load generator.

With `--server-cpus` and `--client-cpus` on a host with cores to spare, the load generator stays off the suite's
cores, as a load generator on another host would; raw ONNX Runtime is then measured on the suite's cores, so that
the ratios compare like with like. Linux only (sched_setaffinity), which is where the benchmark runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# Run as `python -c _EXEC CPUS COMMAND...`: pins itself, then becomes COMMAND, whose processes and threads inherit it.
_EXEC = "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); os.execv(sys.argv[2], sys.argv[2:])"


def parse(text: str) -> frozenset[int]:
    """A CPU list as taskset writes it ("0-1,4") as a set, checked against the CPUs this process may use."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{text!r} is not a CPU list like 0-1,4") from None
        if first > last:
            raise ValueError(f"{part!r} in {text!r} runs backwards")
        cpus.update(range(first, last + 1))
    missing = cpus - os.sched_getaffinity(0)
    if missing:
        raise ValueError(f"CPUs {describe(frozenset(missing))} are not among this machine's usable ones")
    return frozenset(cpus)


def describe(cpus: frozenset[int] | None) -> str:
    """The set as a CPU list ("0-1,4"); "any" for no set."""
    if not cpus:
        return "any"
    ordered = sorted(cpus)
    runs: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


def count(cpus: frozenset[int] | None) -> int:
    """How many CPUs the set holds; without one, how many this process may use."""
    return len(cpus) if cpus else len(os.sched_getaffinity(0))


def pin(cpus: frozenset[int] | None) -> None:
    """Keeps the calling thread, and the threads and processes it starts from now on, on `cpus` (None: no change)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """`pin` for a block: the calling thread's CPUs are restored after it."""
    before = os.sched_getaffinity(0)
    pin(cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def command(argv: list[str], cpus: frozenset[int] | None) -> list[str]:
    """`argv` (its first element a path) to run on `cpus` from its first instruction; unchanged for None."""
    if not cpus:
        return argv
    return [sys.executable, "-c", _EXEC, ",".join(map(str, sorted(cpus))), *argv]

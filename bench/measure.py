"""One measured point: a load run against the suite with the CPU of every party accounted for."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from bench.loadgen import Load, LoadGenerator
from bench.suite import CpuWindow


@dataclass(frozen=True)
class Point:
    """The figures of one measurement (or the medians of several)."""

    workload: str
    api: str  # predict | v2 | stream | live
    batching: bool
    concurrency: int
    batch: int  # items per request
    calls_per_second: float
    p50: float  # seconds
    p99: float
    mb_per_second: float  # response bytes, 10^6 per second
    errors: int
    server_cores: float  # the inference process (its replicas together)
    client_cores: float  # the load generator's processes
    machine_cores: float  # everything on the machine
    first_error: str = ""

    @property
    def items_per_second(self) -> float:
        return self.calls_per_second * self.batch

    @property
    def other_cores(self) -> float:
        return max(0.0, self.machine_cores - self.server_cores - self.client_cores)

    @property
    def key(self) -> tuple[str, str, bool, int, int]:
        return (self.workload, self.api, self.batching, self.concurrency, self.batch)


def measure(
    generator: LoadGenerator,
    load: Load,
    *,
    workload: str,
    api: str,
    batching: bool,
    concurrency: int,
    batch: int,
    duration: float,
    warmup: float,
    server_pids: Sequence[int],
    processes: int = 0,
) -> Point:
    pending = generator.start(load, concurrency=concurrency, duration=duration, warmup=warmup, processes=processes)
    servers = {f"server{i}": pid for i, pid in enumerate(server_pids)}
    window = CpuWindow({**servers, **{f"client{i}": pid for i, pid in enumerate(generator.pids)}})
    time.sleep(max(0.0, pending.begin - time.monotonic()))
    window.begin()
    time.sleep(max(0.0, pending.stop - time.monotonic()))
    window.end()
    result = pending.wait()
    return Point(
        workload=workload,
        api=api,
        batching=batching,
        concurrency=concurrency,
        batch=batch,
        calls_per_second=result.calls_per_second,
        p50=result.percentile(50),
        p99=result.percentile(99),
        mb_per_second=result.bytes_per_second / 1e6,
        errors=result.errors,
        server_cores=sum(v for k, v in window.cores.items() if k.startswith("server")),
        client_cores=sum(v for k, v in window.cores.items() if k.startswith("client")),
        machine_cores=window.machine_cores,
        first_error=result.first_error,
    )


def median_point(points: Sequence[Point]) -> Point:
    """Field by field medians of the same point measured in several runs."""
    if len(points) == 1:
        return points[0]
    numbers = {}
    for f in fields(Point):
        values = [getattr(p, f.name) for p in points]
        if isinstance(values[0], float):
            numbers[f.name] = statistics.median(values)
        elif f.name == "errors":
            numbers[f.name] = sum(values)
    return replace(points[0], **numbers)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


Printer = Callable[[str], None]

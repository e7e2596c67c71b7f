"""A closed-loop gRPC load generator: processes of grpc.aio clients replaying pre-serialised requests.

Requests are serialised once, before the clock starts, and responses are not parsed, so the client's cost per
call is the gRPC transport alone. Each worker process runs its share of the concurrent callers for a fixed time
and returns raw latencies; the parent merges them.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass

import grpc
import numpy as np

_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


@dataclass(frozen=True)
class Load:
    """What to send: a full method name, one serialised request, and whether the answer is a stream."""

    target: str
    method: str
    request: bytes
    streaming: bool = False


@dataclass(frozen=True)
class Result:
    """Latencies in seconds of every call completed inside the measured window, and the window's length."""

    latencies: np.ndarray
    seconds: float
    errors: int
    response_bytes: int

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if len(self.latencies) else float("nan")


async def _callers(load: Load, callers: int, warmup: float, duration: float) -> tuple[list[float], int, int, float]:
    async with grpc.aio.insecure_channel(load.target, options=_OPTIONS) as channel:
        if load.streaming:
            stream = channel.unary_stream(load.method)
        else:
            unary = channel.unary_unary(load.method)
        latencies: list[float] = []
        errors = 0
        received = 0
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration

        async def caller() -> None:
            nonlocal errors, received
            while True:
                began = time.perf_counter()
                if began >= stop_at:
                    return
                try:
                    if load.streaming:
                        size = 0
                        async for message in stream(load.request):
                            size += len(message)
                    else:
                        size = len(await unary(load.request))
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                ended = time.perf_counter()
                if began >= measure_from and ended <= stop_at:
                    latencies.append(ended - began)
                    received += size

        await asyncio.gather(*(caller() for _ in range(callers)))
        return latencies, errors, received, duration


def _process(load: Load, callers: int, warmup: float, duration: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_callers(load, callers, warmup, duration)))


def run(load: Load, *, concurrency: int, duration: float, warmup: float = 1.0, processes: int = 0) -> Result:
    """Keeps `concurrency` calls in flight for `duration` seconds after a warm-up, from one or more processes."""
    processes = processes or (1 if concurrency < 8 else 2)
    processes = min(processes, concurrency)
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    workers = [ctx.Process(target=_process, args=(load, share, warmup, duration, queue)) for share in shares]
    for worker in workers:
        worker.start()
    parts = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    latencies = np.concatenate([np.asarray(p[0], dtype=np.float64) for p in parts])
    return Result(
        latencies=latencies,
        seconds=duration,
        errors=sum(p[1] for p in parts),
        response_bytes=sum(p[2] for p in parts),
    )

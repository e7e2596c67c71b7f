"""Raw ONNX Runtime in this process: the ceiling that ModelForge's figures are compared with."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from modelforge_inference.sessions import intra_op_threads as usable_intra_op_threads


@dataclass(frozen=True)
class RawFigures:
    """Sequential batch-1 latency and rate, threaded batch-1 rate, and the best items/s over batch sizes."""

    intra_op_threads: int
    p50_seconds: float
    p99_seconds: float
    batch1_items_per_second: float
    threaded_items_per_second: float
    best_batch_size: int
    best_items_per_second: float


def session(model: bytes, *, intra_op_threads: int = 0) -> ort.InferenceSession:
    """A session as the inference service would build it; 0 is ONNX Runtime's choice, held to this thread's CPUs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_intra_op_threads(intra_op_threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _batch(item: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    return {name: np.repeat(value, size, axis=0) for name, value in item.items()}


def _timed(run: object, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    while (began := time.perf_counter()) < stop:
        run()  # type: ignore[operator]
        latencies.append(time.perf_counter() - began)
    return len(latencies), latencies


def measure(
    model: bytes,
    item: Mapping[str, np.ndarray],
    *,
    seconds: float,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    threads: int = 2,
    intra_op_threads: int = 0,
) -> RawFigures:
    """Measures the model on `item` (a batch of one) for about `seconds` per figure.

    threads: callers sharing the session for the threaded batch-1 figure (as the server's compute threads do).
    intra_op_threads: ONNX Runtime's intra-op pool (0: its default, one per core).
    """
    sess = session(model, intra_op_threads=intra_op_threads)
    feeds = dict(item)
    for _ in range(20):
        sess.run(None, feeds)
    count, latencies = _timed(lambda: sess.run(None, feeds), seconds)
    lat = np.asarray(latencies)

    def spin(_: int) -> int:
        done = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            sess.run(None, feeds)
            done += 1
        return done

    with ThreadPoolExecutor(threads) as pool:
        threaded = sum(pool.map(spin, range(threads))) / seconds

    best = (1, count / seconds)
    for size in batch_sizes:
        batch = _batch(item, size)
        sess.run(None, batch)
        runs, _ = _timed(lambda batch=batch: sess.run(None, batch), seconds)
        rate = runs * size / seconds
        if rate > best[1]:
            best = (size, rate)
    return RawFigures(
        intra_op_threads=intra_op_threads,
        p50_seconds=float(np.percentile(lat, 50)),
        p99_seconds=float(np.percentile(lat, 99)),
        batch1_items_per_second=count / seconds,
        threaded_items_per_second=threaded,
        best_batch_size=best[0],
        best_items_per_second=best[1],
    )

"""A closed-loop gRPC load generator: persistent processes of grpc.aio callers replaying pre-serialised requests.

Requests are serialised once, before the clock starts, and responses are not parsed, so the client's cost per
call is the gRPC transport alone. The worker processes are started once and reused for every measurement; each
runs its share of the concurrent callers over one channel, and all of them measure the same window of the
system-wide monotonic clock. A worker reports the latency of every call that ended inside the window, the bytes
it received, the errors, and the CPU time it spent inside the window, so that the benchmark can tell how much of
the machine the load generator itself took.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import grpc
import numpy as np

from bench import cpus as cpu_sets
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb
from modelforge_server.app import use_event_loop

_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),  # what the SDK's channels advertise
]


UNARY = "unary"
SERVER_STREAM = "server-stream"  # one request, a stream of answers (PredictStream)
BIDI = "bidi"  # one long-lived stream per caller, one request in flight on it (V2 ModelStreamInfer)

_READY = "ready"

# A ModelStreamInferResponse whose first byte is field 1's tag carries an error_message: answered in-band.
IN_BAND_ERROR = b"\x0a"


@dataclass(frozen=True)
class Load:
    """What to send: a full method name, one serialised request, and the call's shape (UNARY, SERVER_STREAM, BIDI).

    BIDI callers each open one bidirectional stream and keep one request in flight on it, as Triton's
    perf_analyzer does with --streaming; answers that carry an in-band error_message count as errors.

    ``shared_output`` (an output name and its size in bytes) asks, in a V2 ModelInferRequest, for that output in
    system shared memory: each caller creates and registers a region of its own before the clock starts, and
    counts the output's bytes as received (the caller reads neither it nor a socket-borne output).
    """

    target: str
    method: str
    request: bytes
    kind: str = UNARY
    shared_output: tuple[str, int] | None = None


@dataclass(frozen=True)
class Result:
    """Latencies in seconds of every call that ended inside the measured window, and what the window cost."""

    latencies: np.ndarray
    seconds: float
    errors: int
    response_bytes: int
    client_cpu_seconds: float
    first_error: str = ""

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.response_bytes / self.seconds if self.seconds else 0.0

    @property
    def client_cores(self) -> float:
        """CPU cores the load generator kept busy on average during the window."""
        return self.client_cpu_seconds / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if len(self.latencies) else float("nan")


@dataclass(frozen=True)
class _Job:
    load: Load
    callers: int
    connections: int  # channels the callers are dealt over, each its own connection
    warmup_until: float  # time.monotonic(): callers start at once, calls ending before this do not count
    stop_at: float


async def _callers(job: _Job) -> tuple[list[float], int, int, float, str]:
    load = job.load
    # Each channel its own connection (no shared subchannel pool): replicas sharing a port see several.
    options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if job.connections > 1 else _OPTIONS
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(load.target, options=options))
            for _ in range(max(1, min(job.connections, job.callers)))
        ]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
        latencies: list[float] = []
        errors = 0
        received = 0
        first_error = ""
        clock = time.monotonic
        measure_from, stop_at = job.warmup_until, job.stop_at
        cpu = [0.0, 0.0]

        async def caller(channel: grpc.aio.Channel) -> None:
            async with _shared_output(channel, load) as (request, extra):
                await calls(channel, request, extra)

        async def calls(channel: grpc.aio.Channel, request: bytes, extra: int) -> None:
            nonlocal errors, received, first_error
            stream = channel.unary_stream(load.method, _registered_method=True)
            unary = channel.unary_unary(load.method, _registered_method=True)
            bidi = channel.stream_stream(load.method, _registered_method=True)
            call = bidi() if load.kind == BIDI else None
            while True:
                began = clock()
                if began >= stop_at:
                    break
                try:
                    if call is not None:
                        await call.write(request)
                        message = await call.read()
                        if message is grpc.aio.EOF:
                            raise RuntimeError("the server ended the stream")
                        size = len(message)
                        if message[:1] == IN_BAND_ERROR:
                            errors += 1
                            first_error = first_error or f"in-band: {message[2:200]!r}"
                            continue
                    elif load.kind == SERVER_STREAM:
                        size = 0
                        async for part in stream(request):
                            size += len(part)
                    else:
                        size = len(await unary(request))
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    if not first_error:
                        first_error = f"{exc.code().name}: {exc.details()}"
                    await asyncio.sleep(0.01)
                    if call is not None:
                        call = bidi()
                    continue
                ended = clock()
                if measure_from <= ended <= stop_at:
                    latencies.append(ended - began)
                    received += size + extra
            if call is not None:
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass

        async def cpu_meter() -> None:
            await asyncio.sleep(max(0.0, measure_from - clock()))
            cpu[0] = time.process_time()
            await asyncio.sleep(max(0.0, stop_at - clock()))
            cpu[1] = time.process_time()

        await asyncio.gather(cpu_meter(), *(caller(channels[i % len(channels)]) for i in range(job.callers)))
        return latencies, errors, received, cpu[1] - cpu[0], first_error


_REGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryRegister"
_UNREGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryUnregister"


@contextlib.asynccontextmanager
async def _shared_output(channel: grpc.aio.Channel, load: Load) -> AsyncIterator[tuple[bytes, int]]:
    """The caller's request, and the bytes each call leaves in shared memory; with ``load.shared_output``, a region
    of the caller's own, registered for the caller's calls and dropped after them."""
    if load.shared_output is None:
        yield load.request, 0
        return
    output, size = load.shared_output
    segment = shared_memory.SharedMemory(create=True, size=size)
    name = f"loadgen-{os.getpid()}-{segment.name}"
    register = channel.unary_unary(_REGISTER, _registered_method=True)
    unregister = channel.unary_unary(_UNREGISTER, _registered_method=True)
    try:
        key = "/" + segment.name
        await register(oip_pb.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=size).SerializeToString())
        requested = oip_pb.ModelInferRequest.InferRequestedOutputTensor(name=output)
        requested.parameters["shared_memory_region"].string_param = name
        requested.parameters["shared_memory_byte_size"].int64_param = size
        # Serialised messages concatenate: this appends one entry to the request's repeated outputs.
        yield load.request + oip_pb.ModelInferRequest(outputs=[requested]).SerializeToString(), size
        await unregister(oip_pb.SystemSharedMemoryUnregisterRequest(name=name).SerializeToString())
    finally:
        segment.close()
        segment.unlink()


def _serve(conn: Connection, cpus: frozenset[int] | None) -> None:
    """A worker process on `cpus`: runs the jobs it is sent until it receives None, on the loop the services run on
    (uvloop where installed: it costs the load generator about a quarter less CPU per message on a stream)."""
    cpu_sets.pin(cpus)
    use_event_loop("auto")
    conn.send(_READY)  # imported and set up: a job sent from now on starts at once
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(asyncio.run(_callers(job)))
        except Exception as exc:  # report, keep serving: the parent decides
            conn.send(exc)


class LoadGenerator:
    """A set of worker processes that keep `concurrency` calls in flight for a fixed window.

    Use as a context manager; the processes start once (spawned, so they hold no state of the parent) and are
    reused by every `run`. With `cpus`, the processes run on those CPUs alone.
    """

    def __init__(self, processes: int = 2, cpus: frozenset[int] | None = None, connections: int = 1) -> None:
        self._connections = connections
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for _ in range(max(1, processes)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, cpus), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        # A job's window opens a fixed allowance after it is sent: a worker still importing would miss it.
        for conn in self._conns:
            if not conn.poll(120) or conn.recv() != _READY:
                self.close()
                raise RuntimeError("a load generator process did not start within 120 s")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._conns.clear()
        self._procs.clear()

    def start(
        self, load: Load, *, concurrency: int, duration: float, warmup: float = 1.0, processes: int = 0
    ) -> Pending:
        """Starts a measurement and returns at once; `Pending.wait()` gives the Result.

        The window opens `warmup` seconds (plus a short set-up allowance) from now and lasts `duration` seconds.
        processes: how many worker processes share the callers (0: one below concurrency 16, else all).
        """
        count = processes or (1 if concurrency < 16 else len(self._conns))
        count = max(1, min(count, concurrency, len(self._conns)))
        shares = [concurrency // count + (1 if i < concurrency % count else 0) for i in range(count)]
        begin = time.monotonic() + 0.3 + warmup
        stop = begin + duration
        conns = self._conns[:count]
        for conn, share in zip(conns, shares, strict=True):
            conn.send(_Job(load, share, self._connections, begin, stop))
        return Pending(conns, begin, stop, duration)

    def run(self, load: Load, *, concurrency: int, duration: float, warmup: float = 1.0, processes: int = 0) -> Result:
        """Keeps `concurrency` calls in flight for `duration` seconds after a warm-up and returns what happened."""
        return self.start(load, concurrency=concurrency, duration=duration, warmup=warmup, processes=processes).wait()


@dataclass
class Pending:
    """A measurement in progress: the window it measures (time.monotonic) and the workers to collect from."""

    conns: Sequence[Connection]
    begin: float
    stop: float
    duration: float

    def wait(self) -> Result:
        parts = [conn.recv() for conn in self.conns]
        for part in parts:
            if isinstance(part, Exception):
                raise RuntimeError(f"a load generator process failed: {part!r}") from part
        latencies = np.concatenate([np.asarray(p[0], dtype=np.float64) for p in parts])
        return Result(
            latencies=latencies,
            seconds=self.duration,
            errors=sum(p[1] for p in parts),
            response_bytes=sum(p[2] for p in parts),
            client_cpu_seconds=sum(p[3] for p in parts),
            first_error=next((p[4] for p in parts if p[4]), ""),
        )

"""The floor under every figure: a bare grpc.aio server, with no ModelForge code, answering small messages.

It runs in its own process on the event loop the services use, registers one unary and one bidirectional
method that answer every request with 20 bytes, and is measured by the same load generator as the suite. What it
costs per call is what Python gRPC itself costs on this machine, for a unary call and for a message on an open
stream, before any model or servicer runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import socket
from collections.abc import AsyncIterator, Iterator

import grpc

from bench import cpus as cpu_sets
from modelforge_server.app import LARGE_FRAMES, NO_CALL_BACKLOG_LIMIT, use_event_loop

SERVICE = "bench.Bare"
UNARY = f"/{SERVICE}/Unary"
BIDI = f"/{SERVICE}/Bidi"
_ANSWER = b"x" * 20


def _same(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _ANSWER


async def _bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield _ANSWER


async def _serve(port: int, ready: mp.synchronize.Event) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, request_deserializer=_same, response_serializer=_same),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, request_deserializer=_same, response_serializer=_same),
    }
    server = grpc.aio.server(
        options=[LARGE_FRAMES, ("grpc.so_reuseport", 0), *NO_CALL_BACKLOG_LIMIT]
    )  # as the services
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _main(port: int, ready: mp.synchronize.Event, cpus: frozenset[int] | None) -> None:
    cpu_sets.pin(cpus)
    use_event_loop("auto")
    asyncio.run(_serve(port, ready))


@contextlib.contextmanager
def bare_server(cpus: frozenset[int] | None = None) -> Iterator[tuple[str, int]]:
    """Starts the bare server in a spawned process, on `cpus` where given (the suite's); yields its address and pid."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    process = ctx.Process(target=_main, args=(port, ready, cpus), daemon=True)
    process.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the bare gRPC server did not start within 30 s")
        assert process.pid is not None
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.kill()
        process.join(10)

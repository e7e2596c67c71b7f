"""The benchmark's load generator against a real gRPC server: unary and bidirectional calls, in-band errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from bench import transport
from bench.loadgen import BIDI, IN_BAND_ERROR, Load, LoadGenerator
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb


@pytest.fixture(scope="module")
def generator() -> Iterator[LoadGenerator]:
    with LoadGenerator(processes=1) as gen:
        yield gen


@pytest.fixture(scope="module")
def bare() -> Iterator[str]:
    with transport.bare_server() as (address, _pid):
        yield address


@pytest.mark.parametrize("load_of", [
    lambda address: Load(address, transport.UNARY, b"r"),
    lambda address: Load(address, transport.BIDI, b"r", BIDI),
], ids=["unary", "bidi"])  # fmt: skip
def test_every_call_in_the_window_is_counted_with_its_answer(generator, bare, load_of):
    result = generator.run(load_of(bare), concurrency=2, duration=0.3, warmup=0.1)
    assert result.errors == 0, result.first_error
    assert result.calls > 10
    assert result.response_bytes == 20 * result.calls  # the bare server answers 20 bytes
    assert (result.latencies > 0).all()


def test_unknown_methods_count_as_errors_with_their_status(generator, bare):
    result = generator.run(Load(bare, "/bench.Bare/Nope", b"r"), concurrency=1, duration=0.2, warmup=0.05)
    assert result.calls == 0
    assert result.errors > 0
    assert result.first_error.startswith("UNIMPLEMENTED")


async def test_in_band_stream_errors_count_as_errors_and_the_stream_goes_on(generator):
    failed = oip_pb.ModelStreamInferResponse(error_message="boom", infer_response=oip_pb.ModelInferResponse(id="1"))
    answers = iter([failed.SerializeToString(), _OK] * 1_000_000)

    async def answer(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield next(answers)

    handler = grpc.stream_stream_rpc_method_handler(answer, request_deserializer=bytes, response_serializer=bytes)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"S": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        load = Load(f"127.0.0.1:{port}", "/t.T/S", b"r", BIDI)
        result = await asyncio.to_thread(generator.run, load, concurrency=1, duration=0.3, warmup=0.05)
    finally:
        await server.stop(None)
    assert result.errors > 0 and result.calls > 0  # every other answer failed, on one stream that stayed open
    assert "boom" in result.first_error
    assert failed.SerializeToString()[:1] == IN_BAND_ERROR != _OK[:1]


_OK = oip_pb.ModelStreamInferResponse(
    infer_response=oip_pb.ModelInferResponse(id="1", model_name="m")
).SerializeToString()


def test_callers_dealt_over_several_connections_each_get_their_answers(bare):
    with LoadGenerator(processes=1, connections=3) as gen:
        for load in (Load(bare, transport.UNARY, b"r"), Load(bare, transport.BIDI, b"r", BIDI)):
            result = gen.run(load, concurrency=4, duration=0.3, warmup=0.1)
            assert result.errors == 0, result.first_error
            assert result.calls > 10 and result.response_bytes == 20 * result.calls

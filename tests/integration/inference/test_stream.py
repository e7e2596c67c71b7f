"""PredictStream over real gRPC: a 200 MB output in chunks, reassembled and checked against its sha256."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2 as pb
from tests.fixtures.onnx_models import ModelFile, build_identity, model_bytes
from tests.integration.inference.conftest import (
    RunningInference,
    StartInference,
    error_reason,
    predict_request,
    ref,
    upload,
)

MiB = 1024 * 1024
STREAMED = "modelforge_inference_streamed_bytes_total"


def stream_request(model: str, inputs: dict[str, np.ndarray], **fields) -> pb.PredictStreamRequest:
    plain = predict_request(model, inputs, **fields)
    return pb.PredictStreamRequest(ref=plain.ref, inputs=plain.inputs, output_names=plain.output_names)


async def test_200_mb_output_streams_in_chunks_and_reassembles(inference: RunningInference, image_generator: ModelFile):
    await upload(inference, "imagegen", image_generator)
    latent = np.random.default_rng(3).standard_normal((67, 16)).astype(np.float32)  # 67 x 3 MiB = 201 MiB
    chunk_bytes = inference.settings.chunk_bytes

    call = inference.stub.PredictStream(stream_request("imagegen", {"latent": latent}))
    header = (await call.read()).header
    (spec,) = header.outputs
    assert (spec.name, list(spec.shape), spec.dtype) == ("image", [67, 3, 512, 512], tensor_pb2.DATA_TYPE_FLOAT32)
    assert spec.byte_size == 67 * 3 * 512 * 512 * 4
    buffer = bytearray(spec.byte_size)
    received = chunks = 0
    trailer = None
    while (message := await call.read()) is not grpc.aio.EOF:
        kind = message.WhichOneof("content")
        if kind == "chunk":
            chunk = message.chunk
            assert chunk.output == "image" and chunk.offset == received
            assert 0 < len(chunk.data) <= chunk_bytes
            buffer[received : received + len(chunk.data)] = chunk.data
            received += len(chunk.data)
            chunks += 1
        else:
            assert kind == "trailer"
            trailer = message.trailer

    assert received == spec.byte_size and chunks == -(-spec.byte_size // chunk_bytes)
    assert trailer is not None
    assert trailer.sha256["image"] == hashlib.sha256(buffer).hexdigest()
    image = np.frombuffer(buffer, dtype=np.float32).reshape(67, 3, 512, 512)
    session = ort.InferenceSession(str(image_generator.path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(image, session.run(["image"], {"latent": latent})[0])
    assert (header.model, header.version, header.sha256) == ("imagegen", 1, image_generator.sha256)


async def test_skip_sha256_streams_the_same_bytes_with_an_empty_trailer_map(
    inference: RunningInference, image_generator: ModelFile, string_model: ModelFile
):
    await upload(inference, "imagegen", image_generator)
    await upload(inference, "strings", string_model)
    latent = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)  # 6 MiB: hashed off the loop
    text = np.array(["cat", "dog"], dtype=object)

    for model, inputs in (("imagegen", {"latent": latent}), ("strings", {"text": text})):
        request = stream_request(model, inputs)
        hashed = [m async for m in inference.stub.PredictStream(request)]
        request.skip_sha256 = True
        unhashed = [m async for m in inference.stub.PredictStream(request)]

        assert [m.WhichOneof("content") for m in unhashed] == [m.WhichOneof("content") for m in hashed]
        assert [m.chunk for m in unhashed[1:-1]] == [m.chunk for m in hashed[1:-1]]
        assert len(hashed[-1].trailer.sha256) == len(hashed[0].header.outputs) > 0
        assert dict(unhashed[-1].trailer.sha256) == {}
        assert unhashed[-1].trailer.timings.total.ToTimedelta().total_seconds() > 0


async def test_stream_of_strings_and_several_outputs(inference: RunningInference, string_model: ModelFile):
    await upload(inference, "strings", string_model)
    text = np.array(["cat", "fish", "dog"], dtype=object)

    messages = [m async for m in inference.stub.PredictStream(stream_request("strings", {"text": text}))]

    assert [m.WhichOneof("content") for m in messages] == ["header", "chunk", "chunk", "trailer"]
    ids = np.frombuffer(messages[1].chunk.data, dtype=np.int64)
    assert ids.tolist() == [0, -1, 1]
    assert list(messages[2].chunk.string_data) == [b"CAT", b"UNKNOWN", b"DOG"]
    assert set(messages[3].trailer.sha256) == {"label_id", "label"}


def streamed_bytes(inference: RunningInference, model: str) -> float:
    """What the server's modelforge_inference_streamed_bytes counter says the transport took for `model`."""
    labels = {"model": model, "version": "1"}
    return inference.server.metrics.registry.get_sample_value(STREAMED, labels) or 0.0


async def settled(read: Callable[[], float], *, quiet: float = 0.5) -> float:
    """The value `read` returns once it has not changed for `quiet` seconds (waits at most 30 s)."""
    async with asyncio.timeout(30):
        value, since = read(), time.monotonic()
        while time.monotonic() - since < quiet:
            await asyncio.sleep(0.05)
            if (now := read()) != value:
                value, since = now, time.monotonic()
    return value


async def test_a_stream_the_client_stops_reading_stalls_and_a_cancel_ends_it(
    inference: RunningInference, image_generator: ModelFile
):
    await upload(inference, "imagegen", image_generator)
    latent = np.zeros((67, 16), dtype=np.float32)  # 201 MiB of output
    total = 67 * 3 * 512 * 512 * 4
    call = inference.stub.PredictStream(stream_request("imagegen", {"latent": latent}))
    assert (await call.read()).WhichOneof("content") == "header"
    assert (await call.read()).WhichOneof("content") == "chunk"

    # The client reads nothing more: flow control stops the server after what the windows and buffers hold.
    stalled = await settled(lambda: streamed_bytes(inference, "imagegen"))
    assert inference.settings.chunk_bytes < stalled < total / 8

    call.cancel()
    await asyncio.sleep(0.5)
    assert streamed_bytes(inference, "imagegen") == stalled  # no chunk was built or sent after the cancel

    async with asyncio.timeout(10):  # the stream's request leaves the server's books
        while True:
            listed = await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())
            if all(m.in_flight == 0 for m in listed.loaded_models):
                break
            await asyncio.sleep(0.01)
    small = await inference.stub.Predict(predict_request(ref("imagegen"), {"latent": latent[:1]}))
    assert tensors.to_numpy(small.outputs[0]).shape == (1, 3, 512, 512)


async def test_a_slow_reader_gets_every_byte(inference: RunningInference, image_generator: ModelFile):
    await upload(inference, "imagegen", image_generator)
    latent = np.random.default_rng(7).standard_normal((8, 16)).astype(np.float32)  # 24 MiB
    call = inference.stub.PredictStream(stream_request("imagegen", {"latent": latent}))
    header = (await call.read()).header
    first = await settled(lambda: streamed_bytes(inference, "imagegen"), quiet=0.3)
    assert first < header.outputs[0].byte_size  # the server waits for the reader

    buffer = bytearray()
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("content") == "chunk":
            buffer += message.chunk.data
            await asyncio.sleep(0.01)  # a reader slower than the server
        else:
            trailer = message.trailer

    assert trailer.sha256["image"] == hashlib.sha256(buffer).hexdigest()
    assert len(buffer) == header.outputs[0].byte_size
    assert streamed_bytes(inference, "imagegen") > len(buffer)  # every chunk counted, with its framing


async def test_a_string_element_larger_than_a_message_is_refused_before_the_header_and_counted_failed(
    start_inference: StartInference,
) -> None:
    """A stream carries any number of bytes, but each string element whole, in one message."""
    async with start_inference(max_message_bytes=2 * MiB, chunk_bytes=64 * 1024) as running:
        await upload(running, "echo", model_bytes(build_identity(TensorProto.STRING, ["n"])))
        text = np.array([b"a" * (3 * MiB), b"b"], dtype=object)
        call = running.stub.PredictStream(stream_request("echo", {"x": text}))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for message in call:
                received.append(message)
        assert received == []  # not even the header
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(refused.value) == "RESPONSE_TOO_LARGE"
        assert f"output 'y' of echo:1 holds a string element of {3 * MiB} bytes" in (refused.value.details() or "")
        stats = await running.stub.GetModelStatistics(pb.GetModelStatisticsRequest(ref=ref("echo")))
        (entry,) = stats.model_statistics
        assert (entry.request_count, entry.failure_count) == (0, 1)
        small = [m async for m in running.stub.PredictStream(stream_request("echo", {"x": text[1:]}))]
        assert list(small[1].chunk.string_data) == [b"b"]

"""Responses assembled by hand (modelforge_inference.wire) equal what protobuf itself would serialise; a stream's
digest is hashlib's."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
from typing import Any

import numpy as np
import pytest

from modelforge.inference.v1 import inference_pb2
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb
from modelforge_inference import convert, oip_convert, servicer, wire
from modelforge_inference.domain import Prediction, Signature, TensorSpec, Timings
from tests.fixtures import oip_reference

BF16 = "tensor(bfloat16)"


def _outputs() -> dict[str, np.ndarray[Any, Any]]:
    big = np.arange(3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)  # lengths past two varint bytes
    return {
        "image": big,
        "strided": big[0, :, ::2, ::3],  # not contiguous: gathered once
        "big_endian": np.arange(6, dtype=">i8").reshape(2, 3),
        "half": np.array([[1.5, -2.0]], dtype=np.float16),
        "flags": np.array([True, False, True]),
        "bf16": np.array([0x3F80, 0xC000], dtype="<u2"),  # bfloat16 bit patterns, per the signature
        "plain_u16": np.array([1, 2], dtype="<u2"),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.float64(2.5) * np.ones(()),
        "words": np.array([b"a", b"", "caf\u00e9".encode()], dtype=object),
    }


def _signature() -> Signature:
    return Signature(
        inputs=(),
        outputs=(
            TensorSpec("bf16", np.dtype("<u2"), (-1,), ort_type=BF16),
            TensorSpec("plain_u16", np.dtype("<u2"), (-1,), ort_type="tensor(uint16)"),
        ),
    )


def _prediction(outputs: dict[str, np.ndarray[Any, Any]]) -> Prediction:
    return Prediction(
        outputs=outputs,
        model="gen",
        version=7,
        sha256="ab" * 32,
        timings=Timings(queue=0.001, compute=0.25, total=1.5),
        cache_hit=True,
        signature=_signature(),
    )


def test_predict_response_bytes_are_what_protobuf_serialises() -> None:
    prediction = _prediction(_outputs())
    expected = convert.predict_response(prediction)
    assembled = convert.predict_response_bytes(prediction)
    assert inference_pb2.PredictResponse.FromString(assembled) == expected
    assert assembled == expected.SerializeToString()


@pytest.mark.parametrize(
    ("timings", "cache_hit"),
    [(Timings(), False), (Timings(queue=0.0, compute=2.0, total=3600.000000001), False), (Timings(total=1e-9), True)],
)
def test_predict_response_bytes_set_every_duration_of_the_timings_as_protobuf_does(
    timings: Timings, cache_hit: bool
) -> None:
    prediction = dataclasses.replace(
        _prediction({"y": np.ones((1, 2), np.float32)}), timings=timings, cache_hit=cache_hit
    )
    expected = convert.predict_response(prediction)
    assembled = convert.predict_response_bytes(prediction)
    assert assembled == expected.SerializeToString()
    parsed = inference_pb2.PredictResponse.FromString(assembled)
    assert all(parsed.timings.HasField(name) for name in ("queue", "compute", "total"))
    assert parsed.cache_hit is cache_hit


@pytest.mark.parametrize("name", sorted(_outputs()))
def test_each_output_alone_round_trips_through_predict_response_bytes(name: str) -> None:
    prediction = _prediction({name: _outputs()[name]})
    expected = convert.predict_response(prediction)
    assert inference_pb2.PredictResponse.FromString(convert.predict_response_bytes(prediction)) == expected


@pytest.mark.parametrize("chunk_bytes", [1, 1000, 1 << 14, 1 << 20])
def test_raw_chunks_parse_to_the_chunks_protobuf_would_build(chunk_bytes: int) -> None:
    array = np.arange(4096, dtype=np.float32).reshape(4, 1024)
    view = convert.raw_view(array)
    if chunk_bytes == 1:
        view = view[:300]  # a byte at a time, kept short
    chunks = [inference_pb2.PredictStreamResponse.FromString(c) for c in convert.raw_chunks("y", view, chunk_bytes)]
    expected = [
        inference_pb2.PredictStreamResponse(
            chunk=inference_pb2.PredictStreamChunk(
                output="y", offset=offset, data=bytes(view[offset : offset + chunk_bytes])
            )
        )
        for offset in range(0, len(view), chunk_bytes)
    ]
    assert chunks == expected
    assert b"".join(c.chunk.data for c in chunks) == bytes(view)


def _string_data_size(chunk: inference_pb2.PredictStreamResponse) -> int:
    """The serialised size of a chunk's string_data field alone: every element's key, varint length and bytes."""
    return inference_pb2.PredictStreamChunk(string_data=chunk.chunk.string_data).ByteSize()


def _check_string_chunks(elements: list[bytes], chunk_bytes: int) -> list[inference_pb2.PredictStreamResponse]:
    """The chunks of ``elements``, checked to reassemble them in order with each offset the first element's index."""
    chunks = list(convert.string_chunks("s", elements, chunk_bytes))
    assert all(c.WhichOneof("content") == "chunk" and c.chunk.output == "s" for c in chunks)
    assert all(c.chunk.string_data for c in chunks)  # no empty chunks
    offsets = [c.chunk.offset for c in chunks]
    assert offsets == [sum(len(c.chunk.string_data) for c in chunks[:i]) for i in range(len(chunks))]
    assert [e for c in chunks for e in c.chunk.string_data] == elements
    return chunks


@pytest.mark.parametrize(
    "elements",
    [
        [b"x"] * 1000,
        [b""] * 1000,
        [b"", b"a", b"bc" * 5, b"", b"d" * 13, b"e" * 127, b"f" * 128, b"", b"g"] * 50,
    ],
    ids=["one-byte", "empty", "mixed"],
)
@pytest.mark.parametrize("chunk_bytes", [16, 64, 300, 1 << 14])
def test_string_chunks_keep_their_serialised_string_data_within_chunk_bytes(
    elements: list[bytes], chunk_bytes: int
) -> None:
    chunks = _check_string_chunks(elements, chunk_bytes)
    for chunk in chunks:  # only an element too large for any chunk goes over the limit, alone
        assert _string_data_size(chunk) <= chunk_bytes or len(chunk.chunk.string_data) == 1
    # Chunks are full: each next element would not have fitted in the chunk before it.
    for before, after in zip(chunks, chunks[1:], strict=False):
        grown = inference_pb2.PredictStreamChunk(string_data=[*before.chunk.string_data, after.chunk.string_data[0]])
        assert grown.ByteSize() > chunk_bytes


def test_one_byte_strings_fill_sixteen_byte_chunks_five_at_a_time() -> None:
    chunks = _check_string_chunks([b"x"] * 1000, 16)  # each element is 3 bytes: key, length 1, the byte
    assert [len(c.chunk.string_data) for c in chunks] == [5] * 200
    assert all(_string_data_size(c) == 15 for c in chunks)


def test_empty_strings_are_split_by_their_framing() -> None:
    chunks = _check_string_chunks([b""] * 1000, 16)  # each element is 2 bytes: key and length 0
    assert [len(c.chunk.string_data) for c in chunks] == [8] * 125
    assert [c.chunk.offset for c in chunks] == list(range(0, 1000, 8))


def test_an_element_larger_than_chunk_bytes_is_sent_alone() -> None:
    elements = [b"a", b"b", b"L" * 100, b"c", b"M" * 15, b"d"]  # 15 bytes take 17 encoded: over the limit too
    chunks = _check_string_chunks(elements, 16)
    assert [list(c.chunk.string_data) for c in chunks] == [[b"a", b"b"], [b"L" * 100], [b"c"], [b"M" * 15], [b"d"]]
    assert [c.chunk.offset for c in chunks] == [0, 2, 3, 4, 5]


def test_no_elements_make_no_chunks() -> None:
    assert list(convert.string_chunks("s", [], 16)) == []


def test_infer_response_parts_are_what_protobuf_serialises() -> None:
    outputs = {name: array for name, array in _outputs().items()}
    outputs["words"] = np.array([[b"x", b"yz"]], dtype=object)
    kwargs: dict[str, Any] = {
        "model": "gen",
        "version": 3,
        "request_id": "req-1",
        "outputs": outputs,
        "signature": _signature(),
    }
    expected = oip_reference.infer_response(**kwargs)
    assembled = wire.join(oip_convert.infer_response_parts(**kwargs))
    assert oip_pb.ModelInferResponse.FromString(assembled) == expected
    assert assembled == expected.SerializeToString()
    assert expected.outputs[[o.name for o in expected.outputs].index("bf16")].datatype == "BF16"

    streamed = wire.join(oip_convert.stream_infer_response(oip_convert.infer_response_parts(**kwargs, final=True)))
    expected.parameters[oip_convert.FINAL_RESPONSE].bool_param = True  # every answer on a stream is final
    assert streamed == oip_pb.ModelStreamInferResponse(infer_response=expected).SerializeToString()


def test_infer_responses_built_from_remembered_pieces_match_protobuf_for_every_id_and_shape() -> None:
    for request_id, rows in [("", 1), ("a", 2), ("é-42" * 40, 1), ("", 3), ("a", 1)]:  # repeats hit the caches
        outputs = {"y": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "n": np.ones(rows, dtype=np.int64)}
        kwargs: dict[str, Any] = {"model": "mlp", "version": 7, "request_id": request_id, "outputs": outputs}
        assembled = wire.join(oip_convert.infer_response_parts(**kwargs))
        assert assembled == oip_reference.infer_response(**kwargs).SerializeToString()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 2_097_151, 2_097_152])
def test_length_prefixes_match_protobuf_at_varint_boundaries(size: int) -> None:
    data = bytes(size)
    expected = inference_pb2.PredictStreamChunk(data=data).SerializeToString() if size else b""
    assembled = wire.join(wire.length_delimited(3, [memoryview(data)])) if size else b""
    assert assembled == expected
    assert wire.varint(size) == expected[1 : 1 + len(wire.varint(size))] or size == 0


def test_passthrough_sends_bytes_unchanged_and_serialises_messages() -> None:
    serialize = wire.passthrough(inference_pb2.PredictResponse.SerializeToString)
    message = inference_pb2.PredictResponse(model="m", version=1)
    assert serialize(b"\x0a\x01m") == b"\x0a\x01m"
    assert serialize(message) == message.SerializeToString()


def test_stream_digest_equals_hashlib_and_stops_when_the_stream_ends() -> None:
    size = 2 * servicer._HASH_SEGMENT_BYTES + 12345  # three segments, the last short
    data = np.random.default_rng(0).integers(0, 255, size=size, dtype=np.uint8)
    view = memoryview(data).cast("B")
    assert servicer.sha256(view, threading.Event()) == hashlib.sha256(data).hexdigest()

    ended = threading.Event()
    ended.set()
    with pytest.raises(asyncio.CancelledError):
        servicer.sha256(view, ended)


@pytest.mark.parametrize("value", [0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 2**35, 2**63 - 1])
def test_varint_size_is_the_length_of_the_varint(value: int) -> None:
    assert wire.varint_size(value) == len(wire.varint(value))

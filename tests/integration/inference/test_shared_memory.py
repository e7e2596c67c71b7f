"""The V2 system shared memory extension over real gRPC: regions in real POSIX shared memory objects (/dev/shm),
registered with a real inference server, holding inputs it reads and outputs it writes."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np
import pytest

from modelforge.oip.v2 import grpc_service_pb2 as pb
from modelforge_inference.shm import SHM_DIRECTORY
from tests.fixtures.onnx_models import ModelFile
from tests.integration.inference.conftest import RunningInference, StartInference, error_reason, failure
from tests.integration.inference.test_oip import (
    V2,
    Output,
    Tensor,
    _decode_bytes,
    _encode_bytes,
    assert_status,
    infer_request,
    run_onnxruntime,
)

Segment = shared_memory.SharedMemory


@pytest.fixture
async def shm_v2(start_inference: StartInference) -> AsyncIterator[V2]:
    async with start_inference(allow_client_shm=True) as running:
        yield V2(running)


@pytest.fixture
def v2(inference: RunningInference) -> V2:
    return V2(inference)


@pytest.fixture
def segment() -> Iterator[Segment]:
    """A 64 KiB POSIX shared memory object, unlinked after the test."""
    created = Segment(name=f"mf-test-{uuid.uuid4().hex[:12]}", create=True, size=64 * 1024)
    yield created
    created.close()
    created.unlink()


def key(segment: Segment) -> str:
    return "/" + segment.name


def register(name: str, segment: Segment, *, offset: int = 0, byte_size: int | None = None) -> Any:
    return pb.SystemSharedMemoryRegisterRequest(
        name=name, key=key(segment), offset=offset, byte_size=segment.size - offset if byte_size is None else byte_size
    )


def in_region(tensor: Tensor | Output, region: str, byte_size: int, offset: int = 0) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def put(segment: Segment, offset: int, data: bytes) -> None:
    segment.buf[offset : offset + len(data)] = data


def take(segment: Segment, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    return np.frombuffer(segment.buf, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


async def reason_of(call: Any, code: grpc.StatusCode) -> tuple[str, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, exc.details()
        return error_reason(exc), exc.details() or ""
    raise AssertionError(f"the call succeeded; expected {code}")


# --- off by default --------------------------------------------------------------------------------------------


async def test_shared_memory_is_off_by_default_and_says_how_to_turn_it_on(
    v2: V2, mlp: ModelFile, segment: Segment
) -> None:
    metadata = await v2.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert "system_shared_memory" not in metadata.extensions
    reason, details = await reason_of(
        v2.stub.SystemSharedMemoryRegister(register("in", segment)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "SHARED_MEMORY_OFF"
    assert "MODELFORGE_ALLOW_CLIENT_SHM=true" in details
    await assert_status(
        v2.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()), grpc.StatusCode.FAILED_PRECONDITION
    )
    await assert_status(
        v2.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    await v2.publish("mlp", mlp)
    request = infer_request("mlp", {})
    tensor = Tensor(name="input", datatype="FP32", shape=[1, 64])
    in_region(tensor, "in", 256)
    request.inputs.append(tensor)
    reason, _ = await reason_of(v2.stub.ModelInfer(request), grpc.StatusCode.FAILED_PRECONDITION)
    assert reason == "SHARED_MEMORY_OFF"


async def test_cuda_shared_memory_stays_unimplemented(shm_v2: V2) -> None:
    reason, _ = await reason_of(
        shm_v2.stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="gpu")),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    assert reason == "CUDA_SHARED_MEMORY_UNSUPPORTED"


# --- registering -----------------------------------------------------------------------------------------------


async def test_register_lists_status_and_unregister(shm_v2: V2, segment: Segment) -> None:
    metadata = await shm_v2.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert "system_shared_memory" in metadata.extensions
    stub = shm_v2.stub
    await stub.SystemSharedMemoryRegister(register("first", segment, byte_size=4096))
    await stub.SystemSharedMemoryRegister(register("second", segment, offset=4096, byte_size=8192))

    status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert {name: (r.name, r.key, r.offset, r.byte_size) for name, r in status.regions.items()} == {
        "first": ("first", key(segment), 0, 4096),
        "second": ("second", key(segment), 4096, 8192),
    }
    one = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="second"))
    assert list(one.regions) == ["second"]

    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="first"))
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="first"))  # no error twice
    status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert list(status.regions) == ["second"]
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())  # empty name: all of them
    assert not (await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())).regions


async def test_registering_a_name_twice_is_already_exists(shm_v2: V2, segment: Segment) -> None:
    await shm_v2.stub.SystemSharedMemoryRegister(register("region", segment))
    reason, details = await reason_of(
        shm_v2.stub.SystemSharedMemoryRegister(register("region", segment, byte_size=16)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert reason == "SHARED_MEMORY_REGION_EXISTS"
    assert "'region'" in details
    # The first registration stands unchanged.
    status = await shm_v2.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="region"))
    assert status.regions["region"].byte_size == segment.size


async def test_status_of_an_unknown_region_is_not_found(shm_v2: V2) -> None:
    reason, _ = await reason_of(
        shm_v2.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "SHARED_MEMORY_REGION_NOT_FOUND"


@pytest.mark.parametrize(
    ("change", "code", "reason", "needle"),
    [
        ({"key": "/mf-test-does-not-exist"}, grpc.StatusCode.NOT_FOUND, "SHARED_MEMORY_KEY_NOT_FOUND", "shm_open"),
        ({"key": "/../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SHARED_MEMORY_REGION", "POSIX"),
        ({"key": "/"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SHARED_MEMORY_REGION", "POSIX"),
        ({"byte_size": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SHARED_MEMORY_REGION", "more than 0"),
        (
            {"offset": 60 * 1024, "byte_size": 8192},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SHARED_MEMORY_REGION",
            "65536 bytes",
        ),
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SHARED_MEMORY_REGION", "name is required"),
    ],
)
async def test_bad_registrations_are_refused_and_leave_nothing(
    shm_v2: V2, segment: Segment, change: dict[str, Any], code: grpc.StatusCode, reason: str, needle: str
) -> None:
    request = register("region", segment)
    for field, value in change.items():
        setattr(request, field, value)
    got, details = await reason_of(shm_v2.stub.SystemSharedMemoryRegister(request), code)
    assert got == reason
    assert needle in details
    assert not (await shm_v2.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())).regions


async def test_a_symbolic_link_in_dev_shm_is_refused_and_its_target_left_alone(shm_v2: V2, tmp_path) -> None:
    # Anyone may put a link in /dev/shm; followed, it gave requests the server's access to the file it names.
    target = tmp_path / "not-shared.txt"
    target.write_bytes(b"private" * 1000)
    link = f"mf-test-link-{uuid.uuid4().hex[:12]}"
    os.symlink(target, os.path.join(SHM_DIRECTORY, link))
    try:
        request = pb.SystemSharedMemoryRegisterRequest(name="region", key="/" + link, byte_size=1000)
        call = shm_v2.stub.SystemSharedMemoryRegister(request)
        got, details = await reason_of(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert got == "INVALID_SHARED_MEMORY_REGION"
        assert "symbolic link" in details
        assert not (await shm_v2.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())).regions
    finally:
        os.unlink(os.path.join(SHM_DIRECTORY, link))
    assert target.read_bytes() == b"private" * 1000


# --- inference -------------------------------------------------------------------------------------------------


async def test_inputs_and_outputs_in_shared_memory_equal_onnxruntime(
    shm_v2: V2, mlp: ModelFile, segment: Segment
) -> None:
    await shm_v2.publish("mlp", mlp)
    inputs = mlp.sample(3)
    data = inputs["input"].tobytes()
    await shm_v2.stub.SystemSharedMemoryRegister(register("io", segment))
    put(segment, 1024, data)

    tensor = Tensor(name="input", datatype="FP32", shape=[3, 64])
    in_region(tensor, "io", len(data), offset=1024)
    output = Output(name="output")
    in_region(output, "io", 4096, offset=32 * 1024)
    request = pb.ModelInferRequest(model_name="mlp", id="7", inputs=[tensor], outputs=[output])
    response = await shm_v2.stub.ModelInfer(request)

    assert response.id == "7"
    assert list(response.raw_output_contents) == [b""]  # one entry per output, empty: the data is in the region
    (described,) = response.outputs
    assert (described.name, described.datatype, list(described.shape)) == ("output", "FP32", [3, 8])
    assert described.parameters["shared_memory_region"].string_param == "io"
    assert described.parameters["shared_memory_byte_size"].int64_param == 3 * 8 * 4
    np.testing.assert_allclose(
        take(segment, 32 * 1024, "<f4", (3, 8)), run_onnxruntime(mlp, inputs)["output"], rtol=1e-6
    )


async def test_shared_memory_and_raw_tensors_mix_in_one_request(
    shm_v2: V2, multi_io: ModelFile, segment: Segment
) -> None:
    await shm_v2.publish("multi", multi_io)
    inputs = multi_io.sample(2)
    await shm_v2.stub.SystemSharedMemoryRegister(register("io", segment))
    ids = inputs["ids"].tobytes()
    put(segment, 0, ids)
    features = Tensor(name="features", datatype="FP32", shape=[2, 4])
    in_region_ids = Tensor(name="ids", datatype="INT64", shape=[2, 2])
    in_region(in_region_ids, "io", len(ids))
    scores = Output(name="scores")
    in_region(scores, "io", 1024, offset=8192)
    request = pb.ModelInferRequest(
        model_name="multi",
        # The one raw entry belongs to the one input not in shared memory, whatever its position.
        inputs=[in_region_ids, features],
        raw_input_contents=[inputs["features"].tobytes()],
        outputs=[scores, Output(name="id_sum")],
    )
    response = await shm_v2.stub.ModelInfer(request)

    expected = run_onnxruntime(multi_io, inputs)
    assert [o.name for o in response.outputs] == ["scores", "id_sum"]
    assert response.raw_output_contents[0] == b""
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[1], "<i8").reshape(expected["id_sum"].shape), expected["id_sum"]
    )
    np.testing.assert_allclose(take(segment, 8192, "<f4", expected["scores"].shape), expected["scores"], rtol=1e-6)


async def test_bytes_tensors_in_shared_memory_are_length_prefixed(
    shm_v2: V2, string_model: ModelFile, segment: Segment
) -> None:
    await shm_v2.publish("animals", string_model)
    await shm_v2.stub.SystemSharedMemoryRegister(register("io", segment))
    data = _encode_bytes([b"cat", b"zebra", b"bird"])
    put(segment, 0, data)
    text = Tensor(name="text", datatype="BYTES", shape=[3])
    in_region(text, "io", len(data))
    label = Output(name="label")
    in_region(label, "io", 1024, offset=4096)
    response = await shm_v2.stub.ModelInfer(
        pb.ModelInferRequest(model_name="animals", inputs=[text], outputs=[label, Output(name="label_id")])
    )
    written = response.outputs[0].parameters["shared_memory_byte_size"].int64_param
    assert _decode_bytes(bytes(segment.buf[4096 : 4096 + written])) == [b"CAT", b"UNKNOWN", b"BIRD"]
    assert response.raw_output_contents[0] == b""
    assert np.frombuffer(response.raw_output_contents[1], "<i8").tolist() == [0, -1, 2]


async def test_stream_infer_writes_outputs_to_shared_memory(shm_v2: V2, mlp: ModelFile, segment: Segment) -> None:
    await shm_v2.publish("mlp", mlp)
    await shm_v2.stub.SystemSharedMemoryRegister(register("out", segment))
    inputs = mlp.sample(1)
    requests = []
    for index in range(4):
        output = Output(name="output")
        in_region(output, "out", 32, offset=index * 32)
        requests.append(infer_request("mlp", inputs, id=str(index), outputs=[output]))
    answers = [answer async for answer in shm_v2.stub.ModelStreamInfer(iter(requests))]
    assert sorted(a.infer_response.id for a in answers) == ["0", "1", "2", "3"]
    assert all(not a.error_message for a in answers)
    expected = run_onnxruntime(mlp, inputs)["output"]
    for index in range(4):
        np.testing.assert_allclose(take(segment, index * 32, "<f4", (1, 8)), expected, rtol=1e-6)


@pytest.mark.parametrize("batching", ["0", "16"], ids=["alone", "merged"])
async def test_concurrent_callers_each_get_their_own_rows_in_their_own_slice(
    shm_v2: V2, mlp: ModelFile, segment: Segment, batching: str
) -> None:
    """Outputs go into the slices straight from ONNX Runtime (a run of one request) or are copied there from a merged
    run; either way each caller's slice holds exactly its own rows, and the bytes between slices stay as they were."""
    labels = {"modelforge.io/max-batch-size": batching, "modelforge.io/max-queue-delay-us": "20000"}
    await shm_v2.publish("mlp", mlp, **labels)
    await shm_v2.stub.SystemSharedMemoryRegister(register("out", segment))
    put(segment, 0, b"\xee" * 8192)
    callers = 24
    samples = [mlp.sample(1 + index % 3, seed=index) for index in range(callers)]
    stride = 3 * 8 * 4 + 16  # room for three rows and a gap of 16 bytes

    async def call(index: int) -> pb.ModelInferResponse:
        output = Output(name="output")
        in_region(output, "out", 3 * 8 * 4, offset=index * stride)
        return await shm_v2.stub.ModelInfer(infer_request("mlp", samples[index], outputs=[output]))

    responses = await asyncio.gather(*(call(index) for index in range(callers)))

    for index, response in enumerate(responses):
        rows = samples[index]["input"].shape[0]
        assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == rows * 8 * 4
        expected = run_onnxruntime(mlp, samples[index])["output"]
        np.testing.assert_allclose(take(segment, index * stride, "<f4", (rows, 8)), expected, rtol=1e-5)
        untouched = bytes(segment.buf[index * stride + rows * 32 : (index + 1) * stride])
        assert untouched == b"\xee" * len(untouched)
    statistics = await shm_v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
    (model,) = statistics.model_stats
    executions = model.execution_count
    assert executions < callers if batching != "0" else executions == callers


async def test_a_large_output_reaches_its_region_equal_to_onnxruntime(shm_v2: V2, image_generator: ModelFile) -> None:
    """3 MiB per image: large enough for ONNX Runtime to write it into the region itself."""
    await shm_v2.publish("generator", image_generator)
    inputs = image_generator.sample(1)
    expected = run_onnxruntime(image_generator, inputs)
    ((name, image),) = expected.items()
    segment = Segment(name=f"mf-test-{uuid.uuid4().hex[:12]}", create=True, size=image.nbytes + 4096)
    try:
        await shm_v2.stub.SystemSharedMemoryRegister(register("images", segment))
        output = Output(name=name)
        in_region(output, "images", image.nbytes, offset=4096)
        response = await shm_v2.stub.ModelInfer(infer_request("generator", inputs, outputs=[output]))

        assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == image.nbytes
        np.testing.assert_allclose(take(segment, 4096, "<f4", image.shape), image, rtol=1e-6)
        assert bytes(segment.buf[:4096]) == bytes(4096)
        await shm_v2.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="images"))
    finally:
        segment.close()
        segment.unlink()


def _mlp_input(region: str, byte_size: int, offset: int = 0) -> Tensor:
    tensor = Tensor(name="input", datatype="FP32", shape=[1, 64])
    in_region(tensor, region, byte_size, offset)
    return tensor


@pytest.mark.parametrize(
    ("tensor", "code", "reason", "needle"),
    [
        (_mlp_input("nope", 256), grpc.StatusCode.NOT_FOUND, "SHARED_MEMORY_REGION_NOT_FOUND", "'nope'"),
        (_mlp_input("io", 128), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", "shared memory slice has 128"),
        (
            _mlp_input("io", 256, offset=64 * 1024 - 128),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SHARED_MEMORY_REGION",
            "the region holds 65536",
        ),
    ],
)
async def test_bad_shared_memory_inputs_are_refused(
    shm_v2: V2, mlp: ModelFile, segment: Segment, tensor: Tensor, code: grpc.StatusCode, reason: str, needle: str
) -> None:
    await shm_v2.publish("mlp", mlp)
    await shm_v2.stub.SystemSharedMemoryRegister(register("io", segment))
    got, details = await reason_of(
        shm_v2.stub.ModelInfer(pb.ModelInferRequest(model_name="mlp", inputs=[tensor])), code
    )
    assert got == reason
    assert needle in details


async def test_half_given_shared_memory_parameters_are_invalid_argument(shm_v2: V2, mlp: ModelFile) -> None:
    await shm_v2.publish("mlp", mlp)
    request = infer_request("mlp", mlp.sample(1))
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = 256
    details = await assert_status(shm_v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "shared_memory_region" in details

    request = infer_request("mlp", mlp.sample(1))
    output = Output(name="output")
    output.parameters["shared_memory_region"].string_param = "io"
    request.outputs.append(output)
    details = await assert_status(shm_v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "shared_memory_byte_size" in details


async def test_an_object_cut_short_after_registering_is_refused_and_the_server_lives_on(
    shm_v2: V2, mlp: ModelFile, segment: Segment
) -> None:
    """Writing into a mapping past its object's end would raise SIGBUS and end the server."""
    await shm_v2.publish("mlp", mlp)
    await shm_v2.stub.SystemSharedMemoryRegister(register("io", segment))
    os.truncate(SHM_DIRECTORY / segment.name, 4096)  # from here on the test must not touch segment.buf past 4096
    output = Output(name="output")
    in_region(output, "io", 32, offset=8192)
    tensor = _mlp_input("io", 256)

    for request in (
        infer_request("mlp", mlp.sample(1), outputs=[output]),
        pb.ModelInferRequest(model_name="mlp", inputs=[tensor]),
    ):
        reason, details = await reason_of(shm_v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert reason == "INVALID_SHARED_MEMORY_REGION"
        assert "was cut to 4096 bytes" in details
    assert (await shm_v2.stub.ServerLive(pb.ServerLiveRequest())).live


async def refused_and_untouched(v2: V2, segment: Segment, request: pb.ModelInferRequest, needle: str) -> None:
    """Asserts that `request`, whose outputs go to region "out" in `segment`, is refused for an output that does not
    fit, and that nothing was written into the region."""
    await v2.stub.SystemSharedMemoryRegister(register("out", segment))
    put(segment, 0, b"\xab" * 1024)
    reason, details = await reason_of(v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert reason == "INVALID_SHARED_MEMORY_REGION"
    assert needle in details
    assert bytes(segment.buf[:1024]) == b"\xab" * 1024


async def test_an_output_larger_than_its_slice_is_invalid_argument_and_leaves_the_region_alone(
    shm_v2: V2, mlp: ModelFile, segment: Segment
) -> None:
    await shm_v2.publish("mlp", mlp)
    output = Output(name="output")
    in_region(output, "out", 16)  # [2, 8] float32 needs 64
    await refused_and_untouched(
        shm_v2, segment, infer_request("mlp", mlp.sample(2), outputs=[output]), "needs 64 bytes"
    )


async def test_when_one_output_does_not_fit_no_output_is_written(
    shm_v2: V2, multi_io: ModelFile, segment: Segment
) -> None:
    await shm_v2.publish("multi", multi_io)
    scores, id_sum = Output(name="scores"), Output(name="id_sum")
    in_region(scores, "out", 512)  # fits
    in_region(id_sum, "out", 4, offset=512)  # [2, 1] int64 needs 16
    request = infer_request("multi", multi_io.sample(2), outputs=[scores, id_sum])
    await refused_and_untouched(shm_v2, segment, request, "'id_sum' needs 16 bytes")


async def test_an_unregistered_region_is_no_longer_found(shm_v2: V2, mlp: ModelFile, segment: Segment) -> None:
    await shm_v2.publish("mlp", mlp)
    await shm_v2.stub.SystemSharedMemoryRegister(register("io", segment))
    put(segment, 0, mlp.sample(1)["input"].tobytes())
    request = pb.ModelInferRequest(model_name="mlp", inputs=[_mlp_input("io", 256)])
    await shm_v2.stub.ModelInfer(request)
    await shm_v2.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="io"))
    got, _, _ = await failure(shm_v2.stub.ModelInfer(request))
    assert got == grpc.StatusCode.NOT_FOUND


async def test_the_benchmark_load_generator_gives_each_caller_a_region_and_drops_it(
    shm_v2: V2, mlp: ModelFile, segment: Segment
) -> None:
    from bench import scenarios
    from bench.loadgen import Load, LoadGenerator

    await shm_v2.publish("mlp", mlp)
    request = scenarios.model_infer_request("mlp", mlp.sample(1))
    load = Load(shm_v2.running.address, scenarios.MODEL_INFER, request, shared_output=("output", 32))
    with LoadGenerator(processes=1) as generator:
        result = await asyncio.to_thread(generator.run, load, concurrency=2, duration=0.3, warmup=0.1)
    assert result.errors == 0, result.first_error
    assert result.calls > 10
    assert not (await shm_v2.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())).regions

    # Each call's answer carries only metadata, and its output's 32 bytes count as received: compare with one
    # such answer.
    await shm_v2.stub.SystemSharedMemoryRegister(register("one", segment))
    alike = pb.ModelInferRequest.FromString(request)
    output = Output(name="output")
    in_region(output, "one", 32)
    alike.outputs.append(output)
    answer = await shm_v2.stub.ModelInfer(alike)
    assert list(answer.raw_output_contents) == [b""]
    per_call, rest = divmod(result.response_bytes, result.calls)
    assert rest == 0
    # The same answer, but for the region's name: the load generator's is longer than "one".
    assert answer.ByteSize() + 32 < per_call < answer.ByteSize() + 32 + 64

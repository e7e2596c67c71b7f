"""The Open Inference Protocol (V2) endpoint over real gRPC, a real registry and real ONNX Runtime sessions.

These tests use ModelForge's own generated V2 stubs; test_tritonclient.py drives the same endpoint with
tritonclient from PyPI.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from modelforge.oip.v2 import grpc_service_pb2 as pb
from modelforge.oip.v2 import grpc_service_pb2_grpc
from modelforge.oip.v2 import model_config_pb2 as config_pb
from modelforge.registry.v1 import registry_pb2
from tests.fixtures.onnx_models import ModelFile, build_identity, image_generator, model_bytes  # noqa: F401
from tests.fixtures.polling import eventually
from tests.integration.inference.conftest import RunningInference, StartInference, failure, upload
from tests.integration.inference.test_scheduling import (
    BLOCKER,
    COUNTER,
    LONG,
    MEDIUM,
    SLOW,
    SMALL,
    rejected,
    start_blocker,
    wait_in_flight,
    waited_ms,
)

Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor

DATATYPES = {np.dtype("<f4"): "FP32", np.dtype("<i8"): "INT64", np.dtype("<f2"): "FP16", np.dtype(object): "BYTES"}


@dataclass
class V2:
    """The V2 stub of a running inference server, and a way to publish models through its registry."""

    running: RunningInference

    @property
    def stub(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        return self.running.oip

    @property
    def registry(self) -> Any:
        return self.running.registry_stub

    async def publish(self, name: str, model: ModelFile, **labels: str) -> int:
        return (await upload(self.running, name, model, labels=labels)).version


@pytest.fixture
def v2(inference: RunningInference) -> V2:
    return V2(inference)


def _encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _decode_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def infer_request(model: str, inputs: dict[str, np.ndarray], **fields: Any) -> pb.ModelInferRequest:
    """A request carrying every input as raw bytes (BYTES elements length-prefixed)."""
    tensors, raws = [], []
    for name, array in inputs.items():
        tensors.append(Tensor(name=name, datatype=DATATYPES[array.dtype], shape=array.shape))
        raws.append(_encode_bytes(array.ravel().tolist()) if array.dtype == object else array.tobytes())
    return pb.ModelInferRequest(model_name=model, inputs=tensors, raw_input_contents=raws, **fields)


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    numpy = {"FP32": "<f4", "INT64": "<i8", "FP16": "<f2"}
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            out[tensor.name] = np.array(_decode_bytes(raw), dtype=object).reshape(tuple(tensor.shape))
        else:
            out[tensor.name] = np.frombuffer(raw, dtype=numpy[tensor.datatype]).reshape(tuple(tensor.shape))
    return out


def run_onnxruntime(model: ModelFile, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.data, providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(str) if v.dtype == object else v for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


async def assert_status(call: Any, code: grpc.StatusCode) -> str:
    """Awaits a call that must fail with `code`; returns the details."""
    got, _, details = await failure(call)
    assert got == code, details
    return details


# --- server ----------------------------------------------------------------------------------------------------


async def test_server_is_live_ready_and_lists_its_extensions(v2: V2) -> None:
    assert (await v2.stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await v2.stub.ServerReady(pb.ServerReadyRequest())).ready
    metadata = await v2.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "modelforge"
    assert metadata.version
    assert set(metadata.extensions) == {
        "classification", "model_repository", "model_repository(unload_dependents)", "model_configuration",
        "schedule_policy", "parameters", "statistics",
    }  # fmt: skip


_NO_CUDA = "CUDA_SHARED_MEMORY_UNSUPPORTED"


@pytest.mark.parametrize(
    ("method", "request_class", "reason", "advice"),
    [
        ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest, "CUDA_SHARED_MEMORY_UNSUPPORTED", "system"),
        ("TraceSetting", pb.TraceSettingRequest, "TRACE_SETTINGS_UNSUPPORTED", "MODELFORGE_OTLP_ENDPOINT"),
        ("LogSettings", pb.LogSettingsRequest, "LOG_SETTINGS_UNSUPPORTED", "MODELFORGE_LOG_LEVEL"),
    ],
)
async def test_unserved_protocol_methods_are_unimplemented_and_say_what_to_do_instead(
    v2: V2, method: str, request_class: type, reason: str, advice: str
) -> None:
    code, found, message = await failure(getattr(v2.stub, method)(request_class()))
    assert (code, found) == (grpc.StatusCode.UNIMPLEMENTED, reason)
    assert advice in message


async def test_cuda_shared_memory_has_no_regions_to_list_or_drop_as_triton_without_any(v2: V2) -> None:
    """perf_analyzer --shared-memory system unregisters every region of both kinds when it ends."""
    await v2.stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())
    await v2.stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name="gpu"))
    assert not (await v2.stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())).regions
    code, reason, _ = await failure(v2.stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name="gpu")))
    assert (code, reason) == (grpc.StatusCode.UNIMPLEMENTED, _NO_CUDA)


@pytest.mark.parametrize(("name", "version"), [("MLP", ""), ("not a name", "1"), ("mlp", "0")])
async def test_a_model_or_version_no_registry_could_hold_is_not_found_as_triton_answers(
    v2: V2, mlp: ModelFile, name: str, version: str
) -> None:
    """Triton's clients tell a missing model by NOT_FOUND, whatever its spelling."""
    await v2.publish("mlp", mlp)
    for call in (
        v2.stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version)),
        v2.stub.ModelConfig(pb.ModelConfigRequest(name=name, version=version)),
        v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version)),
        v2.stub.ModelInfer(infer_request(name, mlp.sample(1), model_version=version)),
    ):
        code, reason, _ = await failure(call)
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert not (await v2.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version))).ready


# --- metadata and configuration --------------------------------------------------------------------------------


async def test_model_metadata_by_number_alias_and_newest(v2: V2, mlp: ModelFile, multi_io: ModelFile) -> None:
    first = await v2.publish("scorer", mlp)
    second = await v2.publish("scorer", multi_io)
    await v2.registry.SetAlias(registry_pb2.SetAliasRequest(model="scorer", alias="production", version=first))

    newest = await v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="scorer"))
    assert list(newest.versions) == [str(second)]
    assert newest.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in newest.inputs] == [
        ("features", "FP32", [-1, 4]),
        ("ids", "INT64", [-1, 2]),
    ]
    assert [t.name for t in newest.outputs] == ["scores", "id_sum"]

    aliased = await v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="scorer", version="production"))
    numbered = await v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="scorer", version=str(first)))
    assert aliased == numbered
    assert [(t.name, t.datatype, list(t.shape)) for t in aliased.inputs] == [("input", "FP32", [-1, 64])]


async def test_version_minus_one_is_the_newest_as_triton_reads_it(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    newest = await v2.publish("mlp", mlp)
    metadata = await v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp", version="-1"))
    assert list(metadata.versions) == [str(newest)]
    response = await v2.stub.ModelInfer(infer_request("mlp", mlp.sample(1), model_version="-1"))
    assert response.model_version == str(newest)
    assert (await v2.stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="-1"))).ready


async def test_metadata_of_unknown_model_is_not_found(v2: V2) -> None:
    details = await assert_status(
        v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="no-such-model")), grpc.StatusCode.NOT_FOUND
    )
    assert "no-such-model" in details


async def test_bad_model_version_is_invalid_argument(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    await assert_status(
        v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp", version="not an alias!")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    past_int64 = str(1 << 63)  # versions travel as int64
    for call in (
        v2.stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp", version=past_int64)),
        v2.stub.ModelInfer(infer_request("mlp", mlp.sample(1), model_version=past_int64)),
        v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=f"mlp:{past_int64}")),
    ):
        code, reason, details = await failure(call)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_V2_REQUEST")
        assert "versions are whole numbers from 1 to 9223372036854775807" in details


async def test_model_config_reports_batching_in_the_protocols_shape(v2: V2, mlp: ModelFile) -> None:
    await v2.publish(
        "mlp",
        mlp,
        **{
            "modelforge.io/max-batch-size": "16",
            "modelforge.io/max-queue-delay-us": "300",
            "modelforge.io/preferred-batch-sizes": "4,8",
            "modelforge.io/max-queue-size": "50",
        },
    )
    config = (await v2.stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "mlp",
        "onnxruntime_onnx",
        "onnxruntime",
        16,
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", config_pb.TYPE_FP32, [64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("output", config_pb.TYPE_FP32, [8])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 300
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 50


async def test_model_config_without_batching_keeps_every_dimension(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp, **{"modelforge.io/max-batch-size": "0"})
    config = (await v2.stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert config.max_batch_size == 0
    assert config.WhichOneof("scheduling_choice") is None
    assert list(config.input[0].dims) == [-1, 64]


# --- inference -------------------------------------------------------------------------------------------------


async def test_infer_with_raw_inputs_equals_onnxruntime_and_echoes_the_id(v2: V2, mlp: ModelFile) -> None:
    version = await v2.publish("mlp", mlp)
    inputs = mlp.sample(3)
    response = await v2.stub.ModelInfer(infer_request("mlp", inputs, id="request-42"))
    assert (response.model_name, response.model_version, response.id) == ("mlp", str(version), "request-42")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("output", "FP32", [3, 8])]
    np.testing.assert_allclose(outputs_of(response)["output"], run_onnxruntime(mlp, inputs)["output"], rtol=1e-6)


async def test_infer_with_typed_contents_equals_raw(v2: V2, multi_io: ModelFile) -> None:
    await v2.publish("multi", multi_io)
    inputs = multi_io.sample(2)
    typed = pb.ModelInferRequest(
        model_name="multi",
        inputs=[
            Tensor(
                name="features",
                datatype="FP32",
                shape=[2, 4],
                contents=pb.InferTensorContents(fp32_contents=inputs["features"].ravel().tolist()),
            ),
            Tensor(
                name="ids",
                datatype="INT64",
                shape=[2, 2],
                contents=pb.InferTensorContents(int64_contents=inputs["ids"].ravel().tolist()),
            ),
        ],
    )
    from_typed = outputs_of(await v2.stub.ModelInfer(typed))
    from_raw = outputs_of(await v2.stub.ModelInfer(infer_request("multi", inputs)))
    expected = run_onnxruntime(multi_io, inputs)
    for name in ("scores", "id_sum"):
        np.testing.assert_array_equal(from_typed[name], from_raw[name])
        np.testing.assert_allclose(from_raw[name], expected[name], rtol=1e-6)


async def test_requested_outputs_return_only_those_in_request_order(v2: V2, multi_io: ModelFile) -> None:
    await v2.publish("multi", multi_io)
    request = infer_request("multi", multi_io.sample(2), outputs=[Output(name="id_sum")])
    response = await v2.stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["id_sum"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(
        outputs_of(response)["id_sum"], run_onnxruntime(multi_io, multi_io.sample(2))["id_sum"]
    )


async def test_unknown_requested_output_is_invalid_argument(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    request = infer_request("mlp", mlp.sample(1), outputs=[Output(name="nope")])
    details = await assert_status(v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "'nope'" in details


async def test_an_output_requested_twice_is_invalid_argument_as_triton_refuses_it(v2: V2, mlp: ModelFile) -> None:
    """Two requests of one output may name two destinations (shared-memory regions); only one could be met."""
    await v2.publish("mlp", mlp)
    request = infer_request("mlp", mlp.sample(1), outputs=[Output(name="output"), Output(name="output")])
    code, reason, details = await failure(v2.stub.ModelInfer(request))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_V2_REQUEST")
    assert "output 'output' is requested twice" in details


async def test_bytes_inputs_and_outputs_travel_length_prefixed(v2: V2, string_model: ModelFile) -> None:
    await v2.publish("animals", string_model)
    text = np.array([b"cat", b"zebra", b"bird"], dtype=object)
    response = await v2.stub.ModelInfer(infer_request("animals", {"text": text}))
    assert {o.name: o.datatype for o in response.outputs} == {"label_id": "INT64", "label": "BYTES"}
    out = outputs_of(response)
    assert out["label"].tolist() == [b"CAT", b"UNKNOWN", b"BIRD"]
    assert out["label_id"].tolist() == [0, -1, 2]


async def test_priority_and_timeout_parameters_are_accepted(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp, **{"modelforge.io/priority-levels": "2"})
    request = infer_request("mlp", mlp.sample(1))
    request.parameters["priority"].uint64_param = 1
    request.parameters["timeout"].int64_param = 5_000_000
    response = await v2.stub.ModelInfer(request)
    assert list(response.outputs[0].shape) == [1, 8]


async def test_sequence_parameters_are_refused_not_answered_statelessly(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    for key, field, value in (
        ("sequence_id", "uint64_param", 7),
        ("sequence_id", "string_param", "session-1"),
        ("sequence_start", "bool_param", True),
        ("sequence_end", "bool_param", True),
    ):
        request = infer_request("mlp", mlp.sample(1))
        setattr(request.parameters[key], field, value)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await v2.stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, key
        assert "runs no sequence batching" in (caught.value.details() or ""), key
    request = infer_request("mlp", mlp.sample(1))  # as Triton: no sequence, spelled out, passes
    request.parameters["sequence_id"].uint64_param = 0
    request.parameters["sequence_start"].bool_param = False
    assert list((await v2.stub.ModelInfer(request)).outputs[0].shape) == [1, 8]


# The blocker pattern of test_scheduling.py: one compute thread, held by a long Predict on a slow model, while V2
# requests queue behind it.


@pytest.fixture
async def single_thread(start_inference: StartInference) -> AsyncIterator[RunningInference]:
    async with start_inference(compute_threads=1) as running:
        yield running


async def v2_statistics(running: RunningInference, model: str) -> pb.ModelStatistics:
    response: pb.ModelStatisticsResponse = await running.oip.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    (stats,) = response.model_stats
    return stats


async def test_timeout_parameter_passing_in_the_queue_is_deadline_exceeded_and_never_runs(
    single_thread: RunningInference,
) -> None:
    await upload(single_thread, "slow", SLOW)
    blocker = await start_blocker(single_thread, "slow")
    request = infer_request("slow", SMALL)
    request.parameters["timeout"].int64_param = 50_000  # microseconds, as Triton reads it

    code, reason, details = await failure(single_thread.oip.ModelInfer(request))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    assert "queue of slow:1" in details
    assert waited_ms(details) >= 40  # 50 ms, not 50 us (a loop timer may fire up to a millisecond early)
    await blocker
    stats = await v2_statistics(single_thread, "slow")
    assert (stats.execution_count, stats.inference_count) == (1, len(BLOCKER["x"]))
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (1, 1)
    assert stats.inference_stats.fail.ns >= 40_000_000  # the time the failed request took, its wait included
    assert rejected(single_thread, "slow", "deadline") == 1


async def test_timeout_parameter_longer_than_the_models_default_does_not_extend_it(
    single_thread: RunningInference,
) -> None:
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/queue-timeout-seconds": "0.05"})
    blocker = await start_blocker(single_thread, "slow")
    request = infer_request("slow", SMALL)
    # Ten minutes: had it replaced the model's 50 ms, the request would run, and succeed, once the blocker ends.
    request.parameters["timeout"].uint64_param = 600_000_000

    code, reason, details = await failure(single_thread.oip.ModelInfer(request))

    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT")
    assert waited_ms(details) >= 40
    await blocker
    stats = await v2_statistics(single_thread, "slow")
    assert (stats.execution_count, stats.inference_count) == (1, len(BLOCKER["x"]))
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (1, 1)


async def test_priority_parameter_runs_the_most_urgent_first_and_each_level_in_order(
    single_thread: RunningInference,
) -> None:
    await upload(single_thread, "slow", SLOW, labels={"modelforge.io/priority-levels": "2"})
    blocker = await start_blocker(single_thread, "slow")
    finished: list[str] = []

    async def call(label: str, priority: int | None) -> None:
        request = infer_request("slow", MEDIUM, id=label)
        if priority is not None:  # absent: the model's default level, the last one
            request.parameters["priority"].uint64_param = priority
        response = await single_thread.oip.ModelInfer(request)
        assert response.id == label
        finished.append(label)

    tasks = []
    queued = [("low-1", 2), ("low-2", None), ("high-1", 1), ("low-3", 0), ("high-2", 1)]
    for index, (label, priority) in enumerate(queued):
        tasks.append(asyncio.create_task(call(label, priority)))
        await wait_in_flight(single_thread, "slow", 2 + index)  # queued in this order
    await blocker
    await asyncio.gather(*tasks)

    assert finished == ["high-1", "high-2", "low-1", "low-2", "low-3"]
    assert (await v2_statistics(single_thread, "slow")).execution_count == 6  # each ran alone: no batching


async def test_non_integer_priority_is_invalid_argument(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    request = infer_request("mlp", mlp.sample(1))
    request.parameters["priority"].string_param = "high"
    await assert_status(v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 7), "'input'"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "'input'"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 32), "'input'"),
        (lambda r: setattr(r.inputs[0], "datatype", "FLOAT"), "unknown datatype"),
        (lambda r: setattr(r, "model_name", ""), "model_name"),
    ],
)
async def test_bad_inputs_are_invalid_argument(v2: V2, mlp: ModelFile, mutate: Any, needle: str) -> None:
    await v2.publish("mlp", mlp)
    request = infer_request("mlp", mlp.sample(1))
    mutate(request)
    details = await assert_status(v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert needle in details


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "needle"),
    [
        # Data matching the shape where it can, so that only the shape is wrong; each of these was once INTERNAL.
        ("BYTES", [1 << 40], b"\x00" * 64, "cannot hold the 1099511627776 elements"),  # an 8 TiB allocation
        ("BYTES", [1 << 62], b"\x00" * 64, "is too large"),
        ("FP32", [1] * 65, b"\x00" * 4, "at most 64 dimensions"),
        ("FP32", [1 << 40, 1 << 40, 0], b"", "is too large"),  # no elements, but the dimensions overflow int64
    ],
    ids=["bytes-2^40", "bytes-2^62", "rank-65", "overflow"],
)
async def test_shapes_no_array_can_hold_are_invalid_argument(
    v2: V2, mlp: ModelFile, datatype: str, shape: list[int], raw: bytes, needle: str
) -> None:
    await v2.publish("mlp", mlp)
    request = infer_request("mlp", mlp.sample(1))
    request.inputs[0].datatype = datatype
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)
    request.raw_input_contents[0] = raw
    code, reason, details = await failure(v2.stub.ModelInfer(request))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"), details
    assert "input 'input'" in details
    assert needle in details


@pytest.mark.parametrize("letter", ["m", "é", "😀"])
async def test_a_name_of_thousands_of_characters_is_refused_in_words_not_a_metadata_overflow(
    v2: V2, mlp: ModelFile, letter: str
) -> None:
    # The error quotes the name; uncut, the status would exceed the client's 8 KiB metadata limit and the client
    # would report RESOURCE_EXHAUSTED instead. grpc-message percent-encodes a character beyond ASCII, "😀" as 12
    # bytes: a thousand of them pass the limit.
    await v2.publish("mlp", mlp)
    many = letter * 5000
    for call, code in (
        (v2.stub.ModelInfer(infer_request(many, mlp.sample(1))), grpc.StatusCode.NOT_FOUND),  # no model is named so
        (v2.stub.ModelInfer(infer_request("mlp", mlp.sample(1), model_version=many)), grpc.StatusCode.INVALID_ARGUMENT),
        (
            v2.stub.ModelInfer(infer_request("mlp", mlp.sample(1), outputs=[Output(name=many)])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (v2.stub.ModelMetadata(pb.ModelMetadataRequest(name=many)), grpc.StatusCode.NOT_FOUND),
        (
            v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp", version=many)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        details = await assert_status(call, code)
        assert details.endswith("…")


async def test_a_class_count_the_server_cannot_honour_is_refused_with_its_reason(
    v2: V2, mlp: ModelFile, string_model: ModelFile
) -> None:
    await v2.publish("mlp", mlp)
    await v2.publish("animals", string_model)

    def classify(request: pb.ModelInferRequest, output: str, count: int) -> pb.ModelInferRequest:
        requested = request.outputs.add(name=output)
        requested.parameters["classification"].int64_param = count
        return request

    for request, says in (
        (classify(infer_request("mlp", mlp.sample(1)), "output", 0), "takes a positive integer"),
        (classify(infer_request("animals", {"text": np.array([b"dog"], dtype=object)}), "label", 2), "BYTES"),
    ):
        code, reason, details = await failure(v2.stub.ModelInfer(request))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_V2_REQUEST"), details
        assert says in details
    # Refused before the run: nothing ran (the version was not even loaded), so nothing counts as a success.
    stats = (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="animals"))).model_stats
    assert [(s.execution_count, s.inference_stats.success.count, s.inference_stats.fail.count) for s in stats] == [
        (0, 0, 1)  # the refusal, counted as the refusals of the model's own checks are
    ]
    unknown = classify(infer_request("no-such-model", mlp.sample(1)), "output", 3)
    await assert_status(v2.stub.ModelInfer(unknown), grpc.StatusCode.NOT_FOUND)


async def test_infer_on_unknown_model_is_not_found(v2: V2, mlp: ModelFile) -> None:
    await assert_status(v2.stub.ModelInfer(infer_request("no-such-model", mlp.sample(1))), grpc.StatusCode.NOT_FOUND)


# --- streaming -------------------------------------------------------------------------------------------------


async def test_stream_answers_every_request_and_reports_failures_in_band(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    good = [infer_request("mlp", mlp.sample(1, seed=i), id=f"good-{i}") for i in range(5)]
    bad = infer_request("no-such-model", mlp.sample(1), id="bad")

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for request in (*good[:2], bad, *good[2:]):
            yield request

    answers = [answer async for answer in v2.stub.ModelStreamInfer(requests())]
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == sorted(["bad", *(r.id for r in good)])
    assert "no-such-model" in by_id["bad"].error_message
    # Each answer is its request's last, and says so as Triton does, failed ones too: clients of decoupled models
    # read until they see the flag.
    assert all(a.infer_response.parameters["triton_final_response"].bool_param for a in answers)
    unary = await v2.stub.ModelInfer(good[0])
    assert "triton_final_response" not in unary.parameters
    for index, request in enumerate(good):
        answer = by_id[request.id]
        assert answer.error_message == ""
        expected = run_onnxruntime(mlp, mlp.sample(1, seed=index))["output"]
        np.testing.assert_allclose(outputs_of(answer.infer_response)["output"], expected, rtol=1e-6)


async def test_a_stream_opened_with_tritons_grpc_error_header_ends_with_the_first_failures_status(
    v2: V2, mlp: ModelFile
) -> None:
    await v2.publish("mlp", mlp)
    good = [infer_request("mlp", mlp.sample(1, seed=i), id=f"good-{i}") for i in range(3)]
    bad = infer_request("no-such-model", mlp.sample(1), id="bad")

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for request in (*good[:2], bad, good[2]):
            yield request

    call = v2.stub.ModelStreamInfer(requests(), metadata=(("triton_grpc_error", "true"),))
    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in call:
            answers.append(answer)
    assert [a.infer_response.id for a in answers] == ["good-0", "good-1"]  # the answers before the failure
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (caught.value.details() or "")


async def test_a_failed_request_whose_fields_are_huge_is_answered_in_band_and_the_stream_goes_on(
    v2: V2, mlp: ModelFile
) -> None:
    """An in-band error quotes what was wrong and echoes the request's name, version and id: bounded, so that the
    answer to one bad request can always be sent (one too large would end the stream for every request on it)."""
    await v2.publish("mlp", mlp)
    huge = "a" * (40 * 1024 * 1024)  # the request fits under the receive limit; its echo and quote would not
    requests = [
        infer_request("mlp", mlp.sample(1), id="first"),
        pb.ModelInferRequest(model_name="mlp", model_version=huge, id="huge-version"),
        pb.ModelInferRequest(model_name="mlp", model_version="no such alias!", id="x" * (100 * 1024)),
        infer_request("mlp", mlp.sample(1), id="last"),
    ]

    async def stream() -> AsyncIterator[pb.ModelInferRequest]:
        for request in requests:
            yield request

    answers = [answer async for answer in v2.stub.ModelStreamInfer(stream())]
    assert len(answers) == 4
    first, bad_version, long_id, last = answers
    assert (first.error_message, last.error_message) == ("", "")
    assert (first.infer_response.id, last.infer_response.id) == ("first", "last")
    assert bad_version.infer_response.id == "huge-version"
    assert "invalid model_version" in bad_version.error_message and len(bad_version.error_message) <= 1024
    assert len(bad_version.infer_response.model_version) <= 256
    assert long_id.infer_response.id == ""
    assert "the request's id, 102400 characters, is too long to echo" in long_id.error_message


async def test_a_request_that_is_not_a_protobuf_message_is_invalid_argument_unary_and_streamed(
    v2: V2, mlp: ModelFile, caplog: pytest.LogCaptureFixture
) -> None:
    await v2.publish("mlp", mlp)
    channel = v2.running.channel
    not_utf8_name = b"\x0a\x02\xff\xfe"  # ModelReadyRequest.name = two bytes that are not UTF-8
    for method, garbage in (("ModelInfer", b"\xff\xff\xff\xff"), ("ModelReady", not_utf8_name)):
        code, reason, details = await failure(channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(garbage))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST")
        assert f"/inference.GRPCInferenceService/{method} is not a valid protobuf message" in details

    # On a stream, the answers before it arrive; the stream then ends with the status (it has no id to answer).
    good = infer_request("mlp", mlp.sample(1), id="good").SerializeToString()
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(iter([good, b"\xff\xff\xff"]))
    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in call:
            answers.append(pb.ModelStreamInferResponse.FromString(answer))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a.infer_response.id for a in answers] == ["good"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_leaving_a_stream_of_large_answers_is_no_error_in_the_log(
    v2: V2, image_generator: ModelFile, caplog: pytest.LogCaptureFixture
) -> None:
    # A cancelled client makes the server's next write fail before gRPC has marked the call cancelled; that failure
    # used to reach gRPC, which logged "ExecuteBatchError raised in core" with a traceback.
    await v2.publish("painter", image_generator)
    request = infer_request("painter", image_generator.sample(4))  # 12 MiB answers
    for _ in range(16):
        call = v2.stub.ModelStreamInfer(iter([request] * 10))
        await call.read()
        call.cancel()
    await asyncio.sleep(2.5)  # past the server's wait for the cancellation (handlers._CANCELLATION_SECONDS)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_stream_answers_in_the_order_of_the_requests_though_a_later_one_finishes_first(
    start_inference: StartInference, mlp: ModelFile
) -> None:
    async with start_inference(compute_threads=2) as running:  # the quick request need not wait for a thread
        v2 = V2(running)
        await upload(running, "slow", SLOW)
        await v2.publish("mlp", mlp)
        for name in ("slow", "mlp"):
            await v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:  # no ids: the client pairs answers by order
            yield infer_request("slow", BLOCKER)
            await wait_in_flight(running, "slow", 1)
            yield infer_request("mlp", mlp.sample(1))

        answers = [answer async for answer in v2.stub.ModelStreamInfer(requests())]
        assert [a.error_message for a in answers] == ["", ""]
        assert [a.infer_response.model_name for a in answers] == ["slow", "mlp"]
        finished = {}
        for name in ("slow", "mlp"):
            (stats,) = (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))).model_stats
            finished[name] = stats.last_inference
        assert finished["mlp"] < finished["slow"]  # the second request's run ended first; its answer waited


async def test_stream_keeps_going_after_a_bad_input(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    bad = infer_request("mlp", mlp.sample(1), id="bad")
    bad.raw_input_contents[0] = b"\x00"
    good = infer_request("mlp", mlp.sample(1), id="good")

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        yield bad
        yield good

    answers = {a.infer_response.id: a for a in [x async for x in v2.stub.ModelStreamInfer(requests())]}
    assert "'input'" in answers["bad"].error_message
    assert answers["good"].error_message == ""


async def test_a_stream_holds_at_most_stream_max_in_flight_requests(start_inference: Any, mlp: ModelFile) -> None:
    # Batching with a long delay merges whatever is queued: with room for two requests, no batch holds more.
    batching = {"modelforge.io/max-batch-size": "8", "modelforge.io/max-queue-delay-us": "50000"}
    async with start_inference(stream_max_in_flight=2) as running:
        v2 = V2(running)
        await v2.publish("mlp", mlp, **batching)
        sent = [infer_request("mlp", mlp.sample(1, seed=i), id=str(i)) for i in range(8)]

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            for request in sent:  # all at once: the server, not the client, holds them back
                yield request

        answers = [answer async for answer in v2.stub.ModelStreamInfer(requests())]
        assert sorted(a.infer_response.id for a in answers) == sorted(r.id for r in sent)
        for answer in answers:
            assert answer.error_message == ""
            expected = run_onnxruntime(mlp, mlp.sample(1, seed=int(answer.infer_response.id)))["output"]
            np.testing.assert_allclose(outputs_of(answer.infer_response)["output"], expected, rtol=1e-6)
        (stats,) = (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))).model_stats
        assert stats.inference_count == 8
        assert stats.batch_stats and max(b.batch_size for b in stats.batch_stats) <= 2
        assert stats.execution_count >= 4


def test_stream_max_in_flight_must_be_positive() -> None:
    from modelforge_inference.oip import OipServicer

    with pytest.raises(ValueError, match="stream_max_in_flight must be at least 1"):
        OipServicer(None, max_message_bytes=1 << 20, stream_max_in_flight=0)  # type: ignore[abstract, arg-type]


# --- repository and statistics ---------------------------------------------------------------------------------


async def test_repository_unload_answers_at_once_while_a_request_in_flight_goes_on(v2: V2) -> None:
    await upload(v2.running, "counter", COUNTER)
    # Seconds of counting: the unload must answer long before this run could end.
    call = v2.stub.ModelInfer(infer_request("counter", {**LONG, "steps": np.array([10**7])}))
    running = asyncio.ensure_future(call)
    await wait_in_flight(v2.running, "counter", 1)

    await v2.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="counter"), timeout=2.0)

    assert not running.done()
    ready = await v2.stub.ModelReady(pb.ModelReadyRequest(name="counter", version="1"))
    assert not ready.ready  # out of service at once; the run in flight keeps its session until it ends
    call.cancel()  # the caller leaves: its run stops, and the drain ends
    await eventually(lambda: _nothing_loaded(v2), "the unloaded version to leave the repository index")


async def _nothing_loaded(v2: V2) -> bool:
    index = await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=False))
    return all(m.state == "UNAVAILABLE" for m in index.models)


async def test_repository_load_index_ready_and_unload(v2: V2, mlp: ModelFile) -> None:
    version = await v2.publish("mlp", mlp)
    ready = pb.ModelReadyRequest(name="mlp", version=str(version))
    assert not (await v2.stub.ModelReady(ready)).ready

    await v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"))
    assert (await v2.stub.ModelReady(ready)).ready
    assert (await v2.stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
    index = await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version, m.state) for m in index.models] == [("mlp", str(version), "READY")]

    await v2.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"))
    assert not (await v2.stub.ModelReady(ready)).ready
    assert not (await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models


async def test_repository_index_lists_the_registry_models_with_their_loaded_state(v2: V2, add_one: ModelFile) -> None:
    await v2.publish("loaded", add_one)
    await v2.publish("loaded", add_one)
    await v2.publish("idle", add_one)
    await v2.publish("retired", add_one)
    await v2.registry.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(model="retired", version=1))
    for version in ("1", "2"):
        await v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=f"loaded:{version}"))

    index = await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest())

    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("idle", "1", "UNAVAILABLE", "unloaded"),
        ("loaded", "1", "READY", ""),
        ("loaded", "2", "READY", ""),
        ("retired", "", "UNAVAILABLE", "no READY version"),
    ]
    ready = await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version) for m in ready.models] == [("loaded", "1"), ("loaded", "2")]


async def test_repository_unload_of_a_model_not_loaded_succeeds_and_changes_nothing(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    for name in ("mlp", "mlp", "no-such-model"):  # never loaded, the same again, and a model the registry lacks
        await v2.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name))
    assert not (await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models
    await v2.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="not a name"))  # none such


async def test_repository_unload_takes_unload_dependents_as_a_bool_only(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    await v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"))
    worded = pb.RepositoryModelUnloadRequest(model_name="mlp")
    worded.parameters["unload_dependents"].string_param = "yes"

    code, reason, details = await failure(v2.stub.RepositoryModelUnload(worded))

    assert (code, reason, details) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_V2_REQUEST", "parameter 'unload_dependents' takes a bool_param"
    )  # fmt: skip
    assert [m.name for m in (await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models] == ["mlp"]
    as_bool = pb.RepositoryModelUnloadRequest(model_name="mlp")
    as_bool.parameters["unload_dependents"].bool_param = True
    await v2.stub.RepositoryModelUnload(as_bool)  # no model depends on another: it unloads the model itself


async def test_repository_load_of_unknown_model_is_not_found(v2: V2) -> None:
    for name in ("no-such-model", "Not A Name", "Not A Name:2", "no-such-model:0"):
        await assert_status(
            v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name)), grpc.StatusCode.NOT_FOUND
        )


async def test_model_ready_of_unknown_model_is_false(v2: V2) -> None:
    # A name no model can have (as Triton answers for any model it lacks); a version that does not parse is refused.
    for name in ("no-such-model", "My_Model", "mlp:1"):
        assert not (await v2.stub.ModelReady(pb.ModelReadyRequest(name=name))).ready
    for request in (pb.ModelReadyRequest(name=""), pb.ModelReadyRequest(name="mlp", version="not an alias!")):
        await assert_status(v2.stub.ModelReady(request), grpc.StatusCode.INVALID_ARGUMENT)


async def test_repository_requests_for_another_repository_are_invalid_argument(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    other = "elsewhere"
    for call in (
        v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name=other)),
        v2.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(repository_name=other, model_name="mlp")),
        v2.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(repository_name=other, model_name="mlp")),
    ):
        code, reason, details = await failure(call)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_V2_REQUEST")
        assert "repository_name 'elsewhere' is not supported" in details
    assert not (await v2.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models  # nothing loaded


async def test_statistics_count_requests_per_version(v2: V2, mlp: ModelFile) -> None:
    version = await v2.publish("mlp", mlp)
    await asyncio.gather(*(v2.stub.ModelInfer(infer_request("mlp", mlp.sample(1, seed=i))) for i in range(3)))
    stats = await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
    [entry] = stats.model_stats
    assert (entry.name, entry.version) == ("mlp", str(version))
    assert entry.inference_stats.success.count == 3
    assert entry.inference_count == 3
    assert 1 <= entry.execution_count <= 3
    assert entry.last_inference > 0
    everything = await v2.stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert [s.name for s in everything.model_stats] == ["mlp"]


async def test_statistics_count_requests_refused_as_they_are_decoded_as_failures(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)
    await v2.stub.ModelInfer(infer_request("mlp", mlp.sample(1)))
    short = infer_request("mlp", mlp.sample(1))
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]  # a byte short of its shape
    worded = infer_request("mlp", mlp.sample(1))
    worded.parameters["priority"].string_param = "high"
    twice = infer_request("mlp", mlp.sample(1))
    twice.inputs.append(twice.inputs[0])
    twice.raw_input_contents.append(twice.raw_input_contents[0])
    elsewhere = infer_request("no-such-model", mlp.sample(1))
    elsewhere.raw_input_contents[0] = b""
    for request in (short, worded, twice, elsewhere):
        await assert_status(v2.stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)

    async def stream() -> AsyncIterator[pb.ModelInferRequest]:
        yield short

    (answer,) = [answer async for answer in v2.stub.ModelStreamInfer(stream())]
    assert answer.error_message

    (entry,) = (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))).model_stats
    # The refusals before the model was even looked up count as the refusals of its checks do; an unknown model's
    # refusal counts nowhere.
    assert (entry.inference_stats.success.count, entry.inference_stats.fail.count) == (1, 4)
    assert entry.inference_stats.fail.ns > 0
    assert [s.name for s in (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest())).model_stats] == ["mlp"]


async def test_statistics_leave_cache_hits_out_of_the_compute_counts(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp, **{"modelforge.io/cache": "true"})
    request = infer_request("mlp", mlp.sample(1))

    async def stats() -> pb.InferStatistics:
        (entry,) = (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))).model_stats
        return entry.inference_stats

    await v2.stub.ModelInfer(request)  # a miss: runs, and stores its answer
    async with asyncio.timeout(30):
        while (await stats()).cache_hit.count == 0:  # until the entry is stored and a repeat hits it
            await v2.stub.ModelInfer(request)
    inference = await stats()
    assert inference.cache_hit.count >= 1
    for computed in (inference.compute_input, inference.compute_infer, inference.compute_output):
        assert computed.count == inference.success.count - inference.cache_hit.count == inference.cache_miss.count
    assert inference.queue.count == inference.success.count


async def test_statistics_count_a_request_to_a_model_without_a_batch_dimension_as_one_inference(v2: V2) -> None:
    # Its ModelConfig says max_batch_size 0, and Triton counts one inference per request of such a model.
    await upload(v2.running, "pair", model_bytes(build_identity(shape=[2, 3])))
    assert (await v2.stub.ModelConfig(pb.ModelConfigRequest(name="pair"))).config.max_batch_size == 0
    x = np.ones((2, 3), np.float32)
    for _ in range(3):
        await v2.stub.ModelInfer(infer_request("pair", {"x": x}))
    [entry] = (await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="pair"))).model_stats
    assert (entry.inference_stats.success.count, entry.inference_count, entry.execution_count) == (3, 3, 3)
    assert [(b.batch_size, b.compute_infer.count) for b in entry.batch_stats] == [(1, 3)]


async def test_statistics_count_every_row_of_a_request_run_alone(v2: V2, mlp: ModelFile) -> None:
    await v2.publish("mlp", mlp)  # batching is off by default: each request runs alone
    await v2.stub.ModelInfer(infer_request("mlp", mlp.sample(2)))
    stats = await v2.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
    [entry] = stats.model_stats
    assert (entry.inference_stats.success.count, entry.inference_count, entry.execution_count) == (1, 2, 1)
    assert [(b.batch_size, b.compute_infer.count) for b in entry.batch_stats] == [(2, 1)]
    [batch] = entry.batch_stats
    assert 0 < batch.compute_infer.ns <= entry.inference_stats.compute_infer.ns

"""The SDK's public surface, and its pure conversions (no servers, no sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import pickle
import re
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import modelforge
from modelforge import TensorSpec, _arrayfiles, _channel, _convert, tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2
from modelforge.jobs.v1 import jobs_pb2
from modelforge.registry.v1 import registry_pb2

PUBLIC = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncInferenceClient",
    "AsyncJob",
    "AsyncJobsClient",
    "AsyncRegistryClient",
    "CacheStatus",
    "CancelledError",
    "Client",
    "ClientClosedError",
    "Dataset",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InferenceClient",
    "IntegrityError",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobFailure",
    "JobPriority",
    "JobProgress",
    "JobState",
    "JobStatus",
    "JobsClient",
    "LoadedModel",
    "Model",
    "ModelEvent",
    "ModelEventType",
    "ModelForgeError",
    "ModelRef",
    "ModelState",
    "ModelStatistics",
    "ModelVersion",
    "NotFoundError",
    "OnnxInfo",
    "PermissionDeniedError",
    "Prediction",
    "RegistryClient",
    "ResourceExhaustedError",
    "Signature",
    "Statistics",
    "TensorSpec",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnservedOutputsWarning",
    "VersionState",
    "__version__",
]

PAIRS = [
    (modelforge.RegistryClient, modelforge.AsyncRegistryClient),
    (modelforge.InferenceClient, modelforge.AsyncInferenceClient),
    (modelforge.JobsClient, modelforge.AsyncJobsClient),
    (modelforge.Job, modelforge.AsyncJob),
    (modelforge.Client, modelforge.AsyncClient),
]
CLIENTS = PAIRS[:3]


def test_public_names_are_pinned() -> None:
    assert sorted(modelforge.__all__) == PUBLIC
    for name in modelforge.__all__:
        assert hasattr(modelforge, name), name


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    "client", [modelforge.AsyncInferenceClient, modelforge.AsyncRegistryClient, modelforge.AsyncJobsClient]
)
def test_an_async_client_made_outside_an_event_loop_says_where_to_make_it(client: type) -> None:
    # Its grpc.aio channel would belong to no running loop and fail at its first call, in another loop.
    with pytest.raises(RuntimeError, match=f"create {client.__name__} inside the coroutine that uses it"):
        client("127.0.0.1:1")


def test_the_package_is_marked_as_typed() -> None:
    # PEP 561: type checkers read the SDK's annotations only from a package that ships this marker (packaged by
    # pyproject.toml's package-data).
    assert (Path(modelforge.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=lambda c: c.__name__)
def test_sync_and_async_clients_have_the_same_methods_and_arguments(sync: type, aio: type) -> None:
    sync_methods, aio_methods = _methods(sync), _methods(aio)
    assert sorted(sync_methods) == sorted(aio_methods)
    for name, signature in sync_methods.items():
        assert list(signature.parameters) == list(aio_methods[name].parameters), name
        for param in signature.parameters.values():
            other = aio_methods[name].parameters[param.name]
            assert (param.kind, param.default) == (other.kind, other.default), f"{name}({param.name})"


@pytest.mark.parametrize("client", [modelforge.Client, modelforge.AsyncClient], ids=lambda c: c.__name__)
def test_the_clients_shortcuts_name_their_arguments_as_the_methods_they_call_do(client: type) -> None:
    shortcuts = {
        "upload_model": modelforge.RegistryClient.push,
        "list_models": modelforge.RegistryClient.list_models,
        "predict": modelforge.InferenceClient.predict,
        "submit_job": modelforge.JobsClient.submit,
    }
    for name, method in shortcuts.items():
        own = inspect.signature(getattr(client, name)).parameters
        called = inspect.signature(method).parameters
        named = [p for p in own if own[p].kind is not inspect.Parameter.VAR_KEYWORD]
        assert named == [p for p in called if called[p].kind is not inspect.Parameter.VAR_KEYWORD][: len(named)], name
    init = inspect.signature(client).parameters
    assert list(init) == ["registry", "inference", "jobs", "timeout", "max_message_bytes"]


def test_the_jobs_clients_unary_calls_take_a_timeout_of_their_own_and_waits_keep_theirs() -> None:
    # The async twins follow from the test above.
    per_call = {
        modelforge.JobsClient: ["submit", "get_job", "list_jobs", "get_dataset", "list_datasets", "delete_dataset"],
        modelforge.Job: ["refresh", "cancel", "retry", "delete"],
    }
    for cls, names in per_call.items():
        for name in names:
            timeout = inspect.signature(getattr(cls, name)).parameters["timeout"]
            assert (timeout.kind, timeout.default) == (inspect.Parameter.KEYWORD_ONLY, _channel.CLIENT_TIMEOUT), name
    for name in ("watch", "wait", "result", "save_result"):  # how long to wait for the job: no limit by default
        assert inspect.signature(getattr(modelforge.Job, name)).parameters["timeout"].default is None, name


@pytest.mark.parametrize(("sync", "aio"), CLIENTS, ids=lambda c: c.__name__)
def test_options_are_keyword_only(sync: type, aio: type) -> None:
    for cls in (sync, aio):
        init = inspect.signature(cls.__init__).parameters
        assert [p for p in init if init[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == ["self", "target"]


def test_async_methods_are_coroutines_or_async_iterators() -> None:
    for _, aio in PAIRS:
        for name in _methods(aio):
            member = getattr(aio, name)
            assert inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member), name


def test_channel_target_comes_from_argument_then_environment_then_default() -> None:
    env = {"MODELFORGE_REGISTRY_ADDRESS": "registry.internal:7000"}
    assert _channel.resolve_target(_channel.REGISTRY, "here:1", env) == "here:1"
    assert _channel.resolve_target(_channel.REGISTRY, None, env) == "registry.internal:7000"
    assert _channel.resolve_target(_channel.INFERENCE, None, env) == "127.0.0.1:50052"


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "localhost:0", "[::1]:70000", "dns:///host:65536"])
def test_an_address_whose_port_is_out_of_range_is_refused_not_dialled_as_another_port(target: str) -> None:
    # gRPC dials 127.0.0.1:99999 as port 34463 (99999 - 65536) instead of refusing it.
    with pytest.raises(ValueError, match=r"has port \d+: a port is a number from 1 to 65535"):
        _channel.resolve_target(_channel.REGISTRY, target)
    with pytest.raises(ValueError, match="^MODELFORGE_JOBS_ADDRESS "):
        _channel.resolve_target(_channel.JOBS, None, {"MODELFORGE_JOBS_ADDRESS": target})
    with pytest.raises(ValueError, match="has port"):
        modelforge.RegistryClient(target)


@pytest.mark.parametrize("target", ["h:65535", "h:1", "unix:/tmp/x:99999", "unix-abstract:a:0", "dns://8.8.8.8/h:80"])
def test_addresses_with_ports_in_range_or_no_port_are_dialled_as_given(target: str) -> None:
    assert _channel.resolve_target(_channel.REGISTRY, target) == target


def test_retry_policy_covers_only_idempotent_registry_calls() -> None:
    import json

    options = dict(_channel.channel_options(_channel.REGISTRY))
    config = json.loads(options["grpc.service_config"])
    (method_config,) = config["methodConfig"]
    methods = {n["method"] for n in method_config["name"]}
    assert {"GetModel", "ResolveModelRef"} <= methods
    assert not {"UploadModelVersion", "CreateModel", "DeleteModel", "DeleteModelVersion", "DeleteAlias"} & methods
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    service = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
    assert methods <= set(service.methods_by_name)


@pytest.mark.parametrize(
    ("service", "protos"),
    [(_channel.REGISTRY, registry_pb2), (_channel.INFERENCE, inference_pb2), (_channel.JOBS, jobs_pb2)],
)
def test_only_unary_calls_that_can_be_repeated_are_retried(service: _channel.Service, protos: Any) -> None:
    import json

    options = dict(_channel.channel_options(service))
    (method_config,) = json.loads(options["grpc.service_config"])["methodConfig"]
    methods = {n["method"] for n in method_config["name"]}
    descriptor = protos.DESCRIPTOR.services_by_name[service.full_name.rsplit(".", 1)[1]]
    # A stream's retry, after its keepalive ended it on a quiet connection, could wait for ever.
    assert not [m for m in methods if descriptor.methods_by_name[m].server_streaming], methods
    assert "UnloadModel" not in methods  # repeated after its answer was lost, it finds nothing to unload
    # A request up to the largest the channel sends can be retried, not only up to gRPC's 256 KiB.
    assert options["grpc.per_rpc_retry_buffer_size"] == options["grpc.max_send_message_length"]


def test_ref_proto_keeps_the_selector() -> None:
    assert _convert.ref_proto("m:3").WhichOneof("selector") == "version"
    assert _convert.ref_proto("m@prod").alias == "prod"
    assert _convert.ref_proto("m").WhichOneof("selector") is None
    with pytest.raises(ValueError):
        _convert.ref_proto("M")


def test_update_requests_mask_only_the_fields_given() -> None:
    request = _convert.update_model_request("m", description="d", labels=None)
    assert list(request.update_mask.paths) == ["description"]
    with pytest.raises(ValueError, match="nothing to update"):
        _convert.update_model_request("m", description=None, labels=None)


def _download(data: bytes, *, sha256: str | None = None, size: int | None = None) -> list[object]:
    header = registry_pb2.ModelVersion(
        model="m",
        version=1,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size_bytes=len(data) if size is None else size,
    )
    return [
        registry_pb2.DownloadModelVersionResponse(model_version=header),
        *(registry_pb2.DownloadModelVersionResponse(chunk=data[i : i + 3]) for i in range(0, len(data), 3)),
    ]


def test_download_check_accepts_a_good_stream() -> None:
    check = _convert.DownloadCheck()
    received = b"".join(check.accept(m) for m in _download(b"hello world"))  # type: ignore[arg-type]
    assert received == b"hello world"
    assert check.finish().version == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"sha256": "0" * 64}, "sha256"), ({"size": 20}, "ended after"), ({"size": 4}, "sent more")],
)
def test_download_check_refuses_a_corrupt_or_short_stream(kwargs: dict[str, object], message: str) -> None:
    check = _convert.DownloadCheck()
    with pytest.raises(modelforge.IntegrityError, match=message):
        for m in _download(b"hello world", **kwargs):  # type: ignore[arg-type]
            check.accept(m)  # type: ignore[arg-type]
        check.finish()


def _stream(
    array: np.ndarray, chunk: int, *, digest: str | None = None, hashed: bool = True
) -> list[inference_pb2.PredictStreamResponse]:
    raw = array.tobytes()
    header = inference_pb2.PredictStreamHeader(
        model="gen",
        version=2,
        outputs=[
            inference_pb2.StreamedOutput(
                name="image", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=array.shape, byte_size=len(raw)
            )
        ],
    )
    chunks = [
        inference_pb2.PredictStreamResponse(
            chunk=inference_pb2.PredictStreamChunk(output="image", offset=i, data=raw[i : i + chunk])
        )
        for i in range(0, len(raw), chunk)
    ]
    digests = {"image": digest or hashlib.sha256(raw).hexdigest()} if hashed else {}
    trailer = inference_pb2.PredictStreamTrailer(sha256=digests)
    return [
        inference_pb2.PredictStreamResponse(header=header),
        *chunks,
        inference_pb2.PredictStreamResponse(trailer=trailer),
    ]


def test_stream_assembler_reassembles_outputs_and_reports_progress() -> None:
    array = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    seen: list[tuple[int, int]] = []
    assembler = _convert.StreamAssembler(lambda d, t: seen.append((d, t)))
    for message in _stream(array, 7):
        assembler.accept(message)
    prediction = assembler.finish()
    np.testing.assert_array_equal(prediction.outputs["image"], array)
    assert (prediction.model, prediction.version) == ("gen", 2)
    assert seen[0] == (0, array.nbytes) and seen[-1] == (array.nbytes, array.nbytes)


def test_stream_assembler_refuses_a_bad_checksum_or_an_early_end() -> None:
    array = np.ones((4,), dtype=np.float32)
    assembler = _convert.StreamAssembler()
    for message in _stream(array, 8, digest="f" * 64):
        assembler.accept(message)
    with pytest.raises(modelforge.IntegrityError, match="sha256"):
        assembler.finish()
    early = _convert.StreamAssembler()
    for message in _stream(array, 8)[:-1]:
        early.accept(message)
    with pytest.raises(modelforge.IntegrityError, match="ended early"):
        early.finish()


def test_a_verifying_assembler_refuses_an_output_the_trailer_has_no_sha256_for() -> None:
    array = np.arange(6, dtype=np.float32)
    verifying = _convert.StreamAssembler()
    for message in _stream(array, 8, hashed=False):
        verifying.accept(message)
    with pytest.raises(modelforge.IntegrityError, match="no sha256"):
        verifying.finish()


def test_without_verify_the_request_skips_sha256_and_the_assembler_checks_only_sizes() -> None:
    array = np.arange(6, dtype=np.float32)
    request = _convert.predict_stream_request(
        "gen", {"x": array}, outputs=None, priority=0, queue_timeout=None, cache=None, verify=False
    )
    assert request.skip_sha256
    unverified = _convert.StreamAssembler(verify=False)
    for message in _stream(array, 8, hashed=False):
        unverified.accept(message)
    np.testing.assert_array_equal(unverified.finish().outputs["image"], array)
    short = _convert.StreamAssembler(verify=False)
    for message in _stream(array, 8, hashed=False)[:-2] + _stream(array, 8, hashed=False)[-1:]:
        short.accept(message)  # the last chunk is missing
    with pytest.raises(modelforge.IntegrityError, match="received 16 of 24"):
        short.finish()
    default = _convert.predict_stream_request(
        "gen", {"x": array}, outputs=None, priority=0, queue_timeout=None, cache=None
    )
    assert not default.skip_sha256


def _header(*outputs: inference_pb2.StreamedOutput) -> inference_pb2.PredictStreamResponse:
    return inference_pb2.PredictStreamResponse(header=inference_pb2.PredictStreamHeader(outputs=outputs))


_F32 = tensor_pb2.DATA_TYPE_FLOAT32
_STR = tensor_pb2.DATA_TYPE_STRING


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([inference_pb2.StreamedOutput(name="y", dtype=_F32, shape=[3, 4], byte_size=40)], "with 40 bytes, not 48"),
        ([inference_pb2.StreamedOutput(name="y", dtype=_F32, shape=[-1], byte_size=0)], "with shape [-1]"),
        ([inference_pb2.StreamedOutput(name="y", dtype=0, shape=[1], byte_size=4)], "announced output 'y' with"),
        ([inference_pb2.StreamedOutput(name="s", dtype=_STR, shape=[2], byte_size=3)], "with 3 elements, not 2"),
        (
            [inference_pb2.StreamedOutput(name="y", dtype=_F32, shape=[1], byte_size=4)] * 2,
            "announced output 'y' twice",
        ),
    ],
)
def test_stream_assembler_refuses_a_header_whose_outputs_do_not_add_up(
    outputs: list[inference_pb2.StreamedOutput], message: str
) -> None:
    with pytest.raises(modelforge.IntegrityError, match=re.escape(message)):
        _convert.StreamAssembler().accept(_header(*outputs))


def test_stream_assembler_refuses_chunks_of_the_wrong_kind_and_anything_after_the_trailer() -> None:
    strings = _convert.StreamAssembler()
    strings.accept(_header(inference_pb2.StreamedOutput(name="s", dtype=_STR, shape=[1], byte_size=1)))
    with pytest.raises(modelforge.IntegrityError, match="a STRING output's chunk carries raw bytes"):
        strings.accept(
            inference_pb2.PredictStreamResponse(chunk=inference_pb2.PredictStreamChunk(output="s", data=b"ab"))
        )
    with pytest.raises(modelforge.IntegrityError, match="more elements than the 1 announced"):
        strings.accept(
            inference_pb2.PredictStreamResponse(
                chunk=inference_pb2.PredictStreamChunk(output="s", string_data=[b"a", b"b"])
            )
        )
    numbers = _convert.StreamAssembler()
    numbers.accept(_header(inference_pb2.StreamedOutput(name="y", dtype=_F32, shape=[1], byte_size=4)))
    with pytest.raises(modelforge.IntegrityError, match="a numeric output's chunk carries string elements"):
        numbers.accept(
            inference_pb2.PredictStreamResponse(chunk=inference_pb2.PredictStreamChunk(output="y", string_data=[b"a"]))
        )

    array = np.arange(4, dtype=np.float32)
    late = _convert.StreamAssembler()
    messages = _stream(array, 8)
    for message in messages:
        late.accept(message)
    for extra in (messages[1], messages[-1]):  # a chunk, and a second trailer
        with pytest.raises(modelforge.IntegrityError, match="after its trailer"):
            late.accept(extra)
    np.testing.assert_array_equal(late.finish().outputs["image"], array)


def test_stream_assembler_refuses_bool_bytes_other_than_0_and_1_as_the_unary_path_does() -> None:
    raw = b"\x00\x02"
    bools = _convert.StreamAssembler()
    bools.accept(
        _header(inference_pb2.StreamedOutput(name="b", dtype=tensor_pb2.DATA_TYPE_BOOL, shape=[2], byte_size=2))
    )
    bools.accept(inference_pb2.PredictStreamResponse(chunk=inference_pb2.PredictStreamChunk(output="b", data=raw)))
    trailer = inference_pb2.PredictStreamTrailer(sha256={"b": hashlib.sha256(raw).hexdigest()})
    bools.accept(inference_pb2.PredictStreamResponse(trailer=trailer))
    with pytest.raises(modelforge.IntegrityError, match="BOOL elements must be bytes 0 or 1"):
        bools.finish()


def test_stream_assembler_refuses_an_output_too_large_to_hold_as_a_misbehaving_stream() -> None:
    huge = inference_pb2.StreamedOutput(name="y", dtype=_F32, shape=[2**60], byte_size=2**62)
    with pytest.raises(modelforge.IntegrityError, match=re.escape("output 'y' of 4611686018427387904 bytes")):
        _convert.StreamAssembler().accept(_header(huge))


def test_predict_request_encodes_inputs_as_raw_bytes() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = _convert.predict_request(
        "mlp@prod", {"x": x}, outputs=None, priority=1, queue_timeout=0.5, cache="bypass"
    )
    (tensor,) = request.inputs
    assert tensor.raw_data == x.tobytes() and list(tensor.shape) == [2, 3]
    assert request.timeout.ToTimedelta().total_seconds() == 0.5
    assert request.cache_mode == inference_pb2.CACHE_MODE_BYPASS
    with pytest.raises(TypeError, match="a mapping of input name to array"):
        _convert.predict_request("mlp", [x], outputs=None, priority=0, queue_timeout=None, cache=None)  # type: ignore[arg-type]
    assert not _convert.predict_request("constant", {}, outputs=None, priority=0, queue_timeout=None, cache=None).inputs


def test_predict_request_refuses_a_string_for_outputs_and_a_queue_timeout_that_would_mean_none() -> None:
    x = {"x": np.zeros((1, 4), np.float32)}
    with pytest.raises(TypeError, match=re.escape("outputs takes a list of output names, e.g. ['scores']")):
        _convert.predict_request("mlp", x, outputs="scores", priority=0, queue_timeout=None, cache=None)  # type: ignore[arg-type]
    for bad in (0, 0.0, 1e-7, -1.0, float("inf"), float("nan"), 1e12, True, "5"):
        with pytest.raises(ValueError, match="queue_timeout must be a number of seconds from a microsecond to"):
            _convert.predict_request("mlp", x, outputs=None, priority=0, queue_timeout=bad, cache=None)  # type: ignore[arg-type]
    request = _convert.predict_request("mlp", x, outputs=("y",), priority=0, queue_timeout=1e-6, cache=None)
    assert (list(request.output_names), request.timeout.nanos) == (["y"], 1000)


def test_a_tensor_spec_prints_its_type_and_named_dims_or_that_it_is_not_served() -> None:
    assert str(TensorSpec("x", "float32", (-1, 4), ("batch", ""))) == "x: float32[batch, 4]"
    assert str(TensorSpec("ids", "int64", (-1, -1))) == "ids: int64[-1, -1]"
    assert str(TensorSpec("probabilities", "unspecified", ())) == (
        "probabilities: not a tensor ModelForge serves (a sequence, map or optional, or another element type)"
    )


def test_input_names_that_are_not_strings_are_a_type_error_naming_the_name() -> None:
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(TypeError, match=re.escape("input names must be strings, but 1 is int")):
        _convert.predict_request("mlp", {1: x}, outputs=None, priority=0, queue_timeout=None, cache=None)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=re.escape("input names must be strings, but b'x' is bytes")):
        _convert.inline_input({b"x": x})  # type: ignore[dict-item]


@pytest.mark.parametrize("priority", [2**40, -1, 1.5, True])
def test_a_priority_out_of_its_range_is_a_value_error_saying_the_range(priority: Any) -> None:
    options: dict[str, Any] = {"outputs": None, "queue_timeout": None, "cache": None}
    with pytest.raises(
        ValueError, match=re.escape(f"priority must be a whole number from 0 to 2147483647, not {priority!r}")
    ):
        _convert.predict_request("mlp", {}, priority=priority, **options)
    assert _convert.predict_request("mlp", {}, priority=np.int64(3), **options).priority == 3


NOWHERE = "127.0.0.1:1"


@pytest.mark.parametrize("page_size", [2**31, -1, 2.5, True])
def test_a_page_size_out_of_its_range_is_a_value_error_saying_the_range_before_any_call(page_size: Any) -> None:
    message = re.escape(f"page_size must be a whole number from 0 to 2147483647, not {page_size!r}")
    # Channels connect on their first call: these never do, since each is refused before it.
    with modelforge.InferenceClient(NOWHERE) as inference, modelforge.RegistryClient(NOWHERE) as registry:
        with pytest.raises(ValueError, match=message):
            next(inference.list_loaded(page_size=page_size))
        with pytest.raises(ValueError, match=message):
            next(registry.list_models(page_size=page_size))
        with pytest.raises(ValueError, match=message):
            next(registry.list_versions("m", page_size=page_size))


@pytest.mark.parametrize("bad_id", ["nosuch", "", "123", "6cb5-not-hex"])
def test_a_job_or_dataset_id_that_is_not_a_uuid_is_a_value_error_before_any_call(bad_id: str) -> None:
    says = re.escape(f"{bad_id!r} is not a UUID, as the ids of jobs and datasets are")
    with modelforge.JobsClient(NOWHERE, timeout=5) as jobs:  # NOWHERE would answer UNAVAILABLE, not ValueError
        for call in (jobs.get_job, jobs.get_dataset, jobs.delete_dataset):
            with pytest.raises(ValueError, match=f"_id {says}$"):
                call(bad_id)
        with pytest.raises(ValueError, match=f"^dataset {says}$"):
            jobs.submit("m", dataset=bad_id)

    async def asynchronously() -> None:
        async with modelforge.AsyncJobsClient(NOWHERE, timeout=5) as jobs:
            for call in (jobs.get_job, jobs.get_dataset, jobs.delete_dataset):
                with pytest.raises(ValueError, match=says):
                    await call(bad_id)

    asyncio.run(asynchronously())


def test_a_model_filter_that_is_no_model_name_is_a_value_error_before_any_call() -> None:
    with modelforge.JobsClient(NOWHERE, timeout=5) as jobs, pytest.raises(ValueError, match="invalid model name"):
        next(jobs.list_jobs(model="Bad!"))


@pytest.mark.parametrize("client", [modelforge.InferenceClient, modelforge.AsyncInferenceClient])
@pytest.mark.parametrize("connections", [0, -1, 2.0, True, "2"])
def test_connections_that_are_no_count_are_a_value_error_before_any_channel_opens(client: type, connections: Any):
    with pytest.raises(ValueError, match=re.escape(f"connections must be a whole number >= 1, not {connections!r}")):
        client(NOWHERE, connections=connections)


def test_a_channel_of_your_own_is_one_connection() -> None:
    with grpc.insecure_channel(NOWHERE) as channel:
        with pytest.raises(ValueError, match="pass either connections or channel, not both"):
            modelforge.InferenceClient(channel=channel, connections=2)
        assert modelforge.InferenceClient(channel=channel, connections=1).inference_stub is not None


def test_a_job_priority_that_is_not_a_level_is_a_value_error_naming_the_levels() -> None:
    assert _convert.job_priority_proto("high") == jobs_pb2.JOB_PRIORITY_HIGH
    for wrong in ("urgent", 1):
        with pytest.raises(
            ValueError, match=re.escape(f"priority must be 'low', 'normal' or 'high' (or a JobPriority), not {wrong!r}")
        ):
            _convert.job_priority_proto(wrong)  # type: ignore[arg-type]


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.arange(12, dtype=np.float32).reshape(3, 4), s=np.array(["a", "bc"]))
    return buffer.getvalue()


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(12, dtype=np.float32))
    return buffer.getvalue()


def test_array_files_read_whole_arrays_or_every_array_of_an_archive(tmp_path: Path) -> None:
    (tmp_path / "a.npz").write_bytes(_npz_bytes())
    (tmp_path / "a.npy").write_bytes(_npy_bytes())
    archive = _arrayfiles.read(tmp_path / "a.npz")
    assert isinstance(archive, dict) and list(archive) == ["x", "s"] and archive["s"].tolist() == ["a", "bc"]
    np.testing.assert_array_equal(_arrayfiles.read(tmp_path / "a.npy"), np.arange(12, dtype=np.float32))
    with pytest.raises(IsADirectoryError):
        _arrayfiles.read(tmp_path)


@pytest.mark.parametrize("original", [_npz_bytes(), _npy_bytes()], ids=["npz", "npy"])
def test_every_damaged_or_truncated_array_file_is_one_value_error_naming_it(original: bytes, tmp_path: Path) -> None:
    path = tmp_path / "damaged.npz"
    damaged = [original[:end] for end in range(len(original))]
    for at in range(len(original)):
        for flip in (0xFF, 0x01):
            data = bytearray(original)
            data[at] ^= flip
            damaged.append(bytes(data))
    damaged.append(b"PK\x03\x04garbage")
    refused = 0
    for data in damaged:
        path.write_bytes(data)
        try:
            _arrayfiles.read(path)  # a flip in a timestamp or padding leaves the file readable
        except ValueError as exc:
            assert str(exc).startswith(f"{path} is not a .npy or .npz file that numpy reads without pickle: "), exc
            refused += 1
    assert refused > len(damaged) // 2


def _result_message(first: int, **outputs: np.ndarray) -> jobs_pb2.GetJobResultResponse:
    record = jobs_pb2.DatasetRecord(tensors=[tensors.to_tensor(array, name) for name, array in outputs.items()])
    return jobs_pb2.GetJobResultResponse(first_item=first, record=record)


def test_result_check_lays_out_numeric_outputs_by_record_and_keeps_strings_whole() -> None:
    check = _convert.ResultCheck(5)
    y = np.arange(10, dtype=np.float32).reshape(5, 2)
    first = check.accept(_result_message(0, y=y[:3], label=np.array([b"a", b"b", b"c"], dtype=object)))
    second = check.accept(_result_message(3, y=y[3:], label=np.array([b"\xff", b"e"], dtype=object)))
    assert [(p.output, p.shape) for p in first + second] == [("y", (5, 2)), ("y", (5, 2))]
    np.testing.assert_array_equal(np.concatenate([p.array for p in first + second]), y)
    saved, strings = check.finish()
    assert saved == {"y": (np.dtype(np.float32), (5, 2)), "label": (np.dtype("S1"), (5,))}  # not all UTF-8: bytes
    assert strings["label"].tolist() == [b"a", b"b", b"c", b"\xff", b"e"]


@pytest.mark.parametrize(
    ("messages", "error", "says"),
    [
        ([(0, 2), (3, 2)], modelforge.IntegrityError, "a record starts at item 3, expected 2; retry the call"),
        ([(0, 2), (0, 2)], modelforge.IntegrityError, "a record starts at item 0, expected 2; retry the call"),
        ([(0, 2), (2, 3)], modelforge.IntegrityError, "more items than the job's 4: a record of 3 starts at item 2"),
        ([(0, 2)], modelforge.IntegrityError, "the job result ended early: it held 2 of the job's 4 items"),
    ],
)
def test_result_check_refuses_items_out_of_order_too_many_or_too_few(
    messages: list[tuple[int, int]], error: type[Exception], says: str
) -> None:
    check = _convert.ResultCheck(4)
    with pytest.raises(error, match=re.escape(says)):
        for first, count in messages:
            check.accept(_result_message(first, y=np.zeros((count, 2), np.float32)))
        check.finish()


@pytest.mark.parametrize("items", [3, 5])
def test_a_result_in_memory_must_hold_the_jobs_items_too(items: int) -> None:
    assembler = _convert.ResultAssembler(4)
    assembler.accept(_result_message(0, y=np.zeros((items, 2), np.float32)))
    with pytest.raises(modelforge.IntegrityError, match=re.escape(f"held {items} of the job's 4 items; retry")):
        assembler.finish()
    whole = _convert.ResultAssembler(4)
    whole.accept(_result_message(0, y=np.zeros((4, 2), np.float32)))
    assert whole.finish()["y"].shape == (4, 2)


@pytest.mark.parametrize("make", [_convert.ResultCheck, _convert.ResultAssembler])
def test_a_result_refuses_records_whose_outputs_disagree_in_a_file_or_in_memory(make: Any) -> None:
    check = make(6)
    check.accept(_result_message(0, y=np.zeros((2, 2), np.float32)))
    with pytest.raises(modelforge.IntegrityError, match=re.escape("holds outputs ['y', 'z'], not ['y'] as before")):
        check.accept(_result_message(2, y=np.zeros((2, 2), np.float32), z=np.zeros((2,), np.int64)))
    with pytest.raises(modelforge.IntegrityError, match=re.escape("different item counts {'y': 2, 'z': 1}")):
        make(6).accept(_result_message(0, y=np.zeros((2, 2), np.float32), z=np.zeros(1, np.int64)))
    with pytest.raises(ValueError, match=re.escape("output 'y' is float32[3] per item from item 2, float32[2] before")):
        check.accept(_result_message(2, y=np.zeros((2, 3), np.float32)))


def test_the_default_limits_send_what_the_services_receive_by_default_and_receive_what_they_send() -> None:
    MiB = 1024 * 1024
    for service, send in ((_channel.INFERENCE, 68 * MiB), (_channel.REGISTRY, 64 * MiB), (_channel.JOBS, 64 * MiB)):
        options = dict(_channel.channel_options(service))
        # The inference service receives MODELFORGE_MAX_REQUEST_BYTES of inputs (64 MiB) plus max(1 MiB, 1/16).
        assert options["grpc.max_send_message_length"] == send, service.key
        assert options["grpc.max_receive_message_length"] == 64 * MiB, service.key
    chosen = dict(_channel.channel_options(_channel.INFERENCE, max_message_bytes=2 * MiB))
    assert chosen["grpc.max_send_message_length"] == chosen["grpc.max_receive_message_length"] == 2 * MiB


def _use_on_another_loop(make: Any, use: Any) -> None:
    client = asyncio.run(make())  # its loop closes with this run
    with pytest.raises(RuntimeError, match="created on another event loop, which has closed") as caught:
        asyncio.run(use(client))
    assert f"`async with {type(client).__name__}() as client:`" in str(caught.value)

    async def on_two_loops() -> None:
        live = await make()
        error: list[BaseException] = []

        def elsewhere() -> None:
            try:
                asyncio.run(use(live))
            except BaseException as exc:  # examined below, on the test's own loop
                error.append(exc)

        await asyncio.to_thread(elsewhere)
        await live.close()
        assert isinstance(error[0], RuntimeError) and "created on another event loop" in str(error[0]), error
        assert "which has closed" not in str(error[0])

    asyncio.run(on_two_loops())


@pytest.mark.parametrize(
    ("client", "use"),
    [
        (modelforge.AsyncInferenceClient, lambda c: c.statistics()),
        (modelforge.AsyncInferenceClient, lambda c: anext(c.list_loaded())),
        (modelforge.AsyncRegistryClient, lambda c: c.get_model("m")),
        (modelforge.AsyncJobsClient, lambda c: c.get_job("00000000-0000-0000-0000-000000000000")),
    ],
    ids=["inference", "inference-pages", "registry", "jobs"],
)
def test_an_async_client_used_on_another_event_loop_says_where_to_make_it(client: type, use: Any) -> None:
    # The check comes before any call, so the address is never dialled.
    async def make() -> Any:
        return client("127.0.0.1:1", timeout=5)

    async def call(made: Any) -> None:
        await use(made)

    _use_on_another_loop(make, call)


def test_an_array_of_python_objects_is_refused_with_how_to_save_strings_instead(tmp_path: Path) -> None:
    texts = ["cat", "naïve"]
    np.save(tmp_path / "texts.npy", np.asarray(texts, dtype=object))  # what np.save(list of str objects) gives
    np.savez(tmp_path / "texts.npz", t=np.asarray(texts, dtype=object))
    for name in ("texts.npy", "texts.npz"):
        with pytest.raises(ValueError) as caught:
            _arrayfiles.read(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name} holds an array of Python objects"), message
        assert "np.save(path, np.asarray(texts, dtype=str))" in message and "allow_pickle" not in message
    np.save(tmp_path / "fixed.npy", np.asarray(texts, dtype=str))  # the advice works
    assert _arrayfiles.read(tmp_path / "fixed.npy").tolist() == texts
    (tmp_path / "pickled.npy").write_bytes(pickle.dumps(texts))  # numpy takes anything else for a pickle
    with pytest.raises(ValueError) as caught:
        _arrayfiles.read(tmp_path / "pickled.npy")
    assert str(caught.value) == (
        f"{tmp_path / 'pickled.npy'} is not a .npy or .npz file that numpy reads without pickle: it starts with "
        "neither's signature"
    )


def test_statistics_carry_every_counter_of_the_message() -> None:
    message = inference_pb2.ModelStatistics(
        model="m", version=2, request_count=5, failure_count=1, cancelled_count=3, cache_hit_count=4
    )
    stats = _convert.model_statistics(message)
    assert (stats.model, stats.version, stats.request_count, stats.failure_count) == ("m", 2, 5, 1)
    assert (stats.cancelled_count, stats.cache_hit_count) == (3, 4)


def test_predictions_compare_by_identity_and_other_values_by_their_fields() -> None:
    first, second = (modelforge.Prediction({"y": np.ones(2)}, "m", 1) for _ in range(2))
    assert first == first and first != second  # numpy arrays have no single truth value to compare by
    assert {first, second} == {first, second}
    spec = TensorSpec("x", "float32", (-1, 4), ("batch", ""))
    assert modelforge.Signature((spec,), (spec,)) == modelforge.Signature((spec,), (spec,))
    assert str(modelforge.Signature((spec,), ())) == "inputs x: float32[batch, 4] -> outputs none"


def test_states_compare_equal_to_the_strings_the_sdk_takes_for_them() -> None:
    assert modelforge.JobState.COMPLETED == "COMPLETED" and f"{modelforge.JobState.COMPLETED}" == "COMPLETED"
    assert modelforge.VersionState("ARCHIVED") == "ARCHIVED"
    assert modelforge.JobPriority.HIGH == "HIGH" and modelforge.ModelState.READY == "READY"

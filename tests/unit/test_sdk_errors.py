"""SDK error translation against a real gRPC server on localhost that fails with rich statuses."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelforge import _errors
from modelforge._errors import (
    UNREACHABLE_HINT,
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    IntegrityError,
    InternalError,
    InvalidArgumentError,
    ModelForgeError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    atranslated,
    translated,
)

UNARY = "/modelforge.test.Failing/Unary"
STREAM = "/modelforge.test.Failing/Stream"
PLAIN = "/modelforge.test.Failing/Plain"


def rich_status(code: grpc.StatusCode) -> status_pb2.Status:
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=f"TEST_{code.name}", domain="modelforge.test", metadata={"model": "fraud", "version": "3"}
        )
    )
    bad = any_pb2.Any()
    bad.Pack(
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field="inputs[0].shape", description="bad")]
        )
    )
    return status_pb2.Status(code=code.value[0], message=f"failed with {code.name}", details=[info, bad])


def requested_code(request: bytes) -> grpc.StatusCode:
    return grpc.StatusCode[request.decode()]


def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort_with_status(rpc_status.to_status(rich_status(requested_code(request))))
    raise AssertionError("abort_with_status returned")


def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    yield b"second"
    context.abort_with_status(rpc_status.to_status(rich_status(requested_code(request))))


def plain(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(requested_code(request), "no details attached")
    raise AssertionError("abort returned")


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Plain": grpc.unary_unary_rpc_method_handler(plain),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("modelforge.test.Failing", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


@pytest.fixture(scope="module")
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as channel:
        yield channel


EXPECTED: dict[grpc.StatusCode, type[ModelForgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.UNKNOWN: ModelForgeError,
}


def assert_rich(error: ModelForgeError, code: grpc.StatusCode) -> None:
    assert type(error) is EXPECTED[code]
    assert error.code == code
    assert error.details == str(error) == f"failed with {code.name}"
    assert error.reason == f"TEST_{code.name}"
    assert error.domain == "modelforge.test"
    assert error.metadata == {"model": "fraud", "version": "3"}
    assert error.field_violations == {"inputs[0].shape": "bad"}
    assert error.status is not None and error.status.code == code.value[0]
    assert isinstance(error.__cause__, grpc.RpcError)


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_sync_unary_errors_map_by_code_with_details(channel: grpc.Channel, code: grpc.StatusCode) -> None:
    call = channel.unary_unary(UNARY)
    with pytest.raises(ModelForgeError) as caught, translated():
        call(code.name.encode(), timeout=10)
    assert_rich(caught.value, code)


def test_sync_stream_error_after_messages(channel: grpc.Channel) -> None:
    received: list[bytes] = []
    with pytest.raises(NotFoundError) as caught, translated():
        for message in channel.unary_stream(STREAM)(b"NOT_FOUND", timeout=10):
            received.append(message)
    assert received == [b"first", b"second"]
    assert_rich(caught.value, grpc.StatusCode.NOT_FOUND)


def test_error_without_rich_details(channel: grpc.Channel) -> None:
    with pytest.raises(FailedPreconditionError) as caught, translated():
        channel.unary_unary(PLAIN)(b"FAILED_PRECONDITION", timeout=10)
    error = caught.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details == "no details attached"
    assert (error.reason, error.domain, error.metadata, error.field_violations, error.status) == ("", "", {}, {}, None)


def test_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    with pytest.raises(UnimplementedError) as caught, translated():
        channel.unary_unary("/modelforge.test.Failing/Nope")(b"", timeout=10)
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_unreachable_server_is_unavailable(closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    with grpc.insecure_channel(address) as channel, pytest.raises(UnavailableError) as caught, translated():
        channel.unary_unary(UNARY)(b"NOT_FOUND", timeout=10)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == ""
    assert caught.value.details.startswith(f"failed to connect to all addresses; last error: UNKNOWN: ipv4:{address}")
    assert caught.value.details.endswith(
        "; is the suite running (`modelforge up` starts it), and is the address right (the client's target, else "
        "MODELFORGE_REGISTRY_ADDRESS, MODELFORGE_INFERENCE_ADDRESS or MODELFORGE_JOBS_ADDRESS)?"
    )


def test_an_unresolvable_host_gets_the_same_advice() -> None:
    with (
        grpc.insecure_channel("modelforge.invalid:50051") as channel,
        pytest.raises(UnavailableError) as caught,
        translated(),
    ):
        channel.unary_unary(UNARY)(b"NOT_FOUND", timeout=10)
    assert caught.value.details.startswith("errors resolving modelforge.invalid:50051")
    assert caught.value.details.endswith(UNREACHABLE_HINT)


def test_a_services_own_unavailable_gets_no_advice_about_reaching_it(channel: grpc.Channel) -> None:
    with pytest.raises(UnavailableError) as caught, translated():
        channel.unary_unary(UNARY)(b"UNAVAILABLE", timeout=10)
    assert (caught.value.reason, caught.value.details) == ("TEST_UNAVAILABLE", "failed with UNAVAILABLE")
    with pytest.raises(UnavailableError) as caught, translated():
        channel.unary_unary(PLAIN)(b"UNAVAILABLE", timeout=10)
    assert caught.value.details == "no details attached"


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(KeyError), translated():
        raise KeyError("x")
    with pytest.raises(ValueError, match="not about channels"), translated():
        raise ValueError("not about channels")


def test_a_call_on_a_closed_channel_is_client_closed(target: str) -> None:
    channel = grpc.insecure_channel(target)
    channel.close()
    with pytest.raises(ClientClosedError) as caught, translated():
        channel.unary_unary(UNARY)(b"NOT_FOUND", timeout=10)
    assert isinstance(caught.value, CancelledError)
    assert caught.value.code == grpc.StatusCode.CANCELLED
    assert "client is closed" in caught.value.details


async def test_an_aio_call_on_a_closed_channel_is_client_closed(target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    await channel.close()
    with pytest.raises(ClientClosedError) as caught, translated():
        await channel.unary_unary(UNARY)(b"NOT_FOUND", timeout=10)
    assert caught.value.code == grpc.StatusCode.CANCELLED
    assert isinstance(caught.value.__cause__, grpc.aio.UsageError)


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED], ids=lambda c: c.name)
async def test_aio_unary_errors(target: str, code: grpc.StatusCode) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(ModelForgeError) as caught, translated():
            await channel.unary_unary(UNARY)(code.name.encode(), timeout=10)
        assert_rich(caught.value, code)
        assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)
        with pytest.raises(ModelForgeError) as again:
            async with atranslated():
                await channel.unary_unary(UNARY)(code.name.encode(), timeout=10)
        assert_rich(again.value, code)


async def test_aio_stream_error_after_messages(target: str) -> None:
    received: list[bytes] = []
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(AbortedError) as caught, translated():
            async for message in channel.unary_stream(STREAM)(b"ABORTED", timeout=10):
                received.append(message)
    assert received == [b"first", b"second"]
    assert_rich(caught.value, grpc.StatusCode.ABORTED)


async def test_aio_error_without_details(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(ResourceExhaustedError) as caught:
            async with atranslated():
                await channel.unary_unary(PLAIN)(b"RESOURCE_EXHAUSTED", timeout=10)
    assert caught.value.details == "no details attached"
    assert caught.value.reason == ""


def test_every_status_code_has_a_class_or_the_base() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        kind = _errors._BY_CODE.get(code, ModelForgeError)
        assert issubclass(kind, ModelForgeError)
        assert kind is EXPECTED[code]


def test_errors_pickle_with_their_fields(channel: grpc.Channel) -> None:
    with pytest.raises(NotFoundError) as caught, translated():
        channel.unary_unary(UNARY)(b"NOT_FOUND", timeout=10)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is NotFoundError
    assert (copy.code, copy.details, copy.reason, copy.metadata, copy.field_violations) == (
        grpc.StatusCode.NOT_FOUND,
        "failed with NOT_FOUND",
        "TEST_NOT_FOUND",
        {"model": "fraud", "version": "3"},
        {"inputs[0].shape": "bad"},
    )
    assert repr(copy) == "NotFoundError('failed with NOT_FOUND', code=NOT_FOUND, reason='TEST_NOT_FOUND')"


def test_errors_raised_without_a_call_carry_their_class_code() -> None:
    error = IntegrityError("sha256 mismatch")
    assert (error.code, error.details, error.reason, error.metadata, error.status) == (
        grpc.StatusCode.DATA_LOSS,
        "sha256 mismatch",
        "",
        {},
        None,
    )
    assert NotFoundError("x").code == grpc.StatusCode.NOT_FOUND
    assert ModelForgeError("x").code == grpc.StatusCode.UNKNOWN
    for code, kind in EXPECTED.items():
        if kind not in (InvalidArgumentError, IntegrityError):  # the two that take a second code
            assert kind.default_code == code

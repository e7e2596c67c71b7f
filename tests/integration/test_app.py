"""The server bootstrap over real channels: status mapping, health, dependencies and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from modelforge_server import app
from modelforge_server.errors import DeadlineExceeded
from modelforge_server.metrics import Metrics
from modelforge_server.ports import AddressInUse, PortInUse
from modelforge_server.settings import ServerSettings, SettingsError
from modelforge_server.telemetry import Telemetry
from tests.integration.registry.calls import reason_of

SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]


class Unfinished(jobs_pb2_grpc.JobServiceServicer):
    """Implements nothing: the generated base class answers every method."""


@contextlib.asynccontextmanager
async def serving(servicer: jobs_pb2_grpc.JobServiceServicer) -> AsyncIterator[tuple[app.Server, grpc.aio.Channel]]:
    """A started server of `servicer` on a free port, and a channel to it."""
    server = app.build_server(
        [app.Api(SERVICE, servicer, jobs_pb2_grpc.add_JobServiceServicer_to_server)],
        domain="modelforge.test",
        settings=ServerSettings(),
    )
    port = server.add_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield server, channel
    finally:
        await server.stop(None)


@pytest.fixture
async def server() -> AsyncIterator[tuple[app.Server, grpc.aio.Channel]]:
    async with serving(Unfinished()) as started:
        yield started


async def health_of(channel: grpc.aio.Channel, name: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))
    return response.status


async def test_a_burst_of_calls_is_served_whole_not_cancelled_by_the_transport(
    server: tuple[app.Server, grpc.aio.Channel],
) -> None:
    # gRPC core drops calls that arrive faster than the server takes them once a thousand wait (CANCELLED, with
    # nothing in the log); every call must reach the service, whose own limits answer with their own codes.
    _, channel = server
    check = health_pb2_grpc.HealthStub(channel).Check
    answers = await asyncio.gather(
        *(check(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(5000)), return_exceptions=True
    )
    failures = [answer.code() for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
    assert failures == []
    assert {answer.status for answer in answers} == {health_pb2.HealthCheckResponse.SERVING}


async def test_an_unimplemented_method_answers_unimplemented(server: tuple[app.Server, grpc.aio.Channel]) -> None:
    _, channel = server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


class Failing(jobs_pb2_grpc.JobServiceServicer):
    """Fails the way a bug would: with an exception that is no ServiceError."""

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        raise KeyError(request.id)

    async def WatchJob(  # noqa: N802
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        yield jobs_pb2.WatchJobResponse()
        raise ZeroDivisionError(request.id)


async def test_an_unexpected_error_is_internal_for_the_client_and_logged_with_its_method_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(Failing()) as (_, channel):
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.GetJob(jobs_pb2.GetJobRequest(id="j-1"))
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            [_ async for _ in stub.WatchJob(jobs_pb2.WatchJobRequest(id="j-2"))]
    for caught in (unary, streamed):
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == "internal error; details are in the server log"
    logged = [r for r in caplog.records if r.getMessage().startswith("unexpected error in ")]
    assert [(r.getMessage(), r.levelno, getattr(r, "rpc", None)) for r in logged] == [
        (f"unexpected error in /{SERVICE.full_name}/GetJob", logging.ERROR, f"/{SERVICE.full_name}/GetJob"),
        (f"unexpected error in /{SERVICE.full_name}/WatchJob", logging.ERROR, f"/{SERVICE.full_name}/WatchJob"),
    ]
    assert [type(r.exc_info[1]) if r.exc_info else None for r in logged] == [KeyError, ZeroDivisionError]


async def test_a_request_that_is_not_a_protobuf_message_is_invalid_argument_not_a_traceback(
    server: tuple[app.Server, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = server
    # A mapped service's method (whose body is never reached) and the health service, which is not mapped.
    for method in (f"/{SERVICE.full_name}/GetJob", "/grpc.health.v1.Health/Check"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(method)(b"\xff\xff\xff\xff")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the request to {method} is not a valid protobuf message" in (caught.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Uploads(Unfinished):
    """Streams answers from an async generator, and reads whole uploads: a message that does not parse ends the
    handler's request iterator."""

    async def WatchJob(self, request, context):  # noqa: N802  # the generated name
        yield jobs_pb2.WatchJobResponse(job=jobs_pb2.Job(id=request.id))

    async def UploadDataset(self, request_iterator, context):  # noqa: N802  # the generated name
        async for _ in request_iterator:
            pass
        return jobs_pb2.UploadDatasetResponse()


async def test_a_message_that_does_not_parse_is_invalid_argument_on_every_kind_of_stream() -> None:
    garbage = b"\xff\xff\xff\xff"
    chunk = jobs_pb2.UploadDatasetRequest(chunk=b"x" * (1 << 20)).SerializeToString()
    async with serving(Uploads()) as (_, channel):
        # A request that opens a stream of answers:
        with pytest.raises(grpc.aio.AioRpcError) as watched:
            async for _ in channel.unary_stream(f"/{SERVICE.full_name}/WatchJob")(garbage):
                pass
        assert watched.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A garbled message early in a long upload: the refusal waits for the client's last message, or the
        # client would see INTERNAL ("Internal error from Core") instead of it.
        for _ in range(8):

            async def upload() -> AsyncIterator[bytes]:
                yield chunk
                yield garbage
                for _ in range(64):
                    yield chunk

            with pytest.raises(grpc.aio.AioRpcError) as uploaded:
                await channel.stream_unary(f"/{SERVICE.full_name}/UploadDataset")(upload())
            assert uploaded.value.code() == grpc.StatusCode.INVALID_ARGUMENT, uploaded.value.details()


async def test_health_follows_a_watched_dependency(server: tuple[app.Server, grpc.aio.Channel]) -> None:
    srv, channel = server
    assert await health_of(channel, SERVICE.full_name) == health_pb2.HealthCheckResponse.SERVING
    down = asyncio.Event()

    async def check() -> None:
        if down.is_set():
            raise ConnectionError("dependency is down")

    srv.watch_dependency("thing", check, interval=0.05)
    down.set()
    await _until(lambda: health_of(channel, SERVICE.full_name), health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await health_of(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    down.clear()
    await _until(lambda: health_of(channel, SERVICE.full_name), health_pb2.HealthCheckResponse.SERVING)


async def test_a_dependency_that_stops_answering_is_logged_with_why(
    server: tuple[app.Server, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    srv, channel = server
    hanging = asyncio.Event()

    async def check() -> None:
        if hanging.is_set():
            await asyncio.sleep(3600)  # a dependency that accepts the connection and never answers

    srv.watch_dependency("thing", check, interval=0.05)
    hanging.set()
    await _until(lambda: health_of(channel, SERVICE.full_name), health_pb2.HealthCheckResponse.NOT_SERVING)
    said = [r.getMessage() for r in caplog.records if "is unreachable" in r.getMessage()]
    assert said == ["dependency thing is unreachable: no answer within the check's timeout"]


async def test_stop_flips_health_and_refuses_new_calls(server: tuple[app.Server, grpc.aio.Channel]) -> None:
    srv, channel = server
    await srv.stop(grace=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_of(channel, "")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_ends_a_probe_whose_check_swallowed_the_cancellation(
    server: tuple[app.Server, grpc.aio.Channel],
) -> None:
    """A check that finishes as it is cancelled (a library absorbing the cancellation, or asyncio.wait_for's race on
    Python 3.11) must not keep its probe, and so the shutdown, running forever."""
    srv, _ = server
    checking = asyncio.Event()
    swallowed: list[bool] = []

    async def check() -> None:
        checking.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(True)  # and returns as if the check had passed

    srv.watch_dependency("absorbing", check, interval=0.05)
    await asyncio.wait_for(checking.wait(), 5)
    await asyncio.wait_for(srv.stop(grace=0.5), 10)
    assert swallowed == [True]


async def _until(probe, expected: int, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while (status := await probe()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"health stayed {status}, expected {expected}"
        await asyncio.sleep(0.02)


async def test_before_stop_hooks_end_endless_streams_before_the_grace_period(
    server: tuple[app.Server, grpc.aio.Channel],
) -> None:
    srv, channel = server
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="liveness"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    seen: list[bool] = []

    async def close_feeds() -> None:
        seen.append(srv.serving)

    srv.before_stop(close_feeds)
    await srv.stop(grace=0.5)
    assert seen == [False]  # the hook ran once, after readiness turned NOT_SERVING


async def test_stop_ends_open_health_watches_after_a_last_not_serving_instead_of_waiting_out_the_grace(
    server: tuple[app.Server, grpc.aio.Channel],
) -> None:
    srv, channel = server
    watches = [
        health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name))
        for name in ("", "liveness", SERVICE.full_name)
    ]
    for watch in watches:
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    started = time.monotonic()
    async with asyncio.timeout(30):  # only so that a regression fails instead of waiting out the grace period
        await srv.stop(grace=60.0)
    assert time.monotonic() - started < 30  # the grace period was not waited out
    for watch in watches:
        statuses = [message.status async for message in _until_end(watch)]
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await watch.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (await watch.details() or "")


async def _until_end(watch):  # type: ignore[no-untyped-def]
    with contextlib.suppress(grpc.aio.AioRpcError):
        while (message := await watch.read()) is not grpc.aio.EOF:
            yield message


async def test_a_drain_keeps_taking_calls_with_readiness_not_serving_before_the_stop(
    server: tuple[app.Server, grpc.aio.Channel],
) -> None:
    srv, channel = server
    stopping = asyncio.ensure_future(srv.stop(grace=1.0, drain=1.0))
    await _until(lambda: health_of(channel, ""), health_pb2.HealthCheckResponse.NOT_SERVING)
    # A call during the drain is still served: what a load balancer sends until it sees NOT_SERVING. Liveness
    # stays SERVING: a liveness probe that failed during a long drain would have the process killed.
    assert await health_of(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING
    assert await health_of(channel, SERVICE.full_name) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not stopping.done()
    await asyncio.wait_for(stopping, 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_of(channel, "")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class LateFailure(jobs_pb2_grpc.JobServiceServicer):
    """GetJob fails just after its caller's deadline passed, before gRPC could cancel it: as a request whose
    deadline a queue saw pass an instant after gRPC did."""

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        time.sleep((context.time_remaining() or 0) + 0.05)  # the loop held: nothing cancels this call meanwhile
        raise DeadlineExceeded("the request waited too long in the queue")


async def test_a_failure_after_the_callers_deadline_ends_the_call_quietly_under_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    server = app.build_server(
        [app.Api(SERVICE, LateFailure(), jobs_pb2_grpc.add_JobServiceServicer_to_server)],
        domain="modelforge.test",
        settings=ServerSettings(),
        metrics=metrics,
    )
    port = server.add_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(), timeout=0.05)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        counted = metrics.registry.get_sample_value
        labels = {"grpc_service": SERVICE.full_name, "grpc_method": "GetJob", "grpc_code": "DEADLINE_EXCEEDED"}
        for _ in range(100):  # the server's handlers end after the clients have their answers
            if counted("modelforge_rpc_requests_total", labels) == 5:
                break
            await asyncio.sleep(0.02)
        assert counted("modelforge_rpc_requests_total", labels) == 5
    finally:
        await server.stop(None)
    # Nothing could reach the client any more: no status was sent, so gRPC logged no failed send.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("use", ["gRPC", "metrics"])
async def test_a_port_taken_after_the_start_up_check_is_refused_by_serve_in_the_same_words(use: str) -> None:
    server = app.build_server(
        [app.Api(SERVICE, Unfinished(), jobs_pb2_grpc.add_JobServiceServicer_to_server)],
        domain="modelforge.test",
        settings=ServerSettings(),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServerSettings(port=port if use == "gRPC" else 0)
        tel = Telemetry("modelforge-test", metrics_port=port if use == "metrics" else 0, provider=None)
        try:
            with pytest.raises(PortInUse) as caught:
                await app.serve(server, settings, telemetry=tel)
        finally:
            await server.stop(None)
    assert str(caught.value).startswith(
        f"port {port} ({use}) is in use by another process (or a connection still closing); stop it"
    )


class Brief(jobs_pb2_grpc.JobServiceServicer):
    """GetJob takes a few milliseconds, as real calls do."""

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        await asyncio.sleep(0.005)
        return jobs_pb2.GetJobResponse()


async def test_calls_arriving_while_the_server_stops_are_refused_unavailable_never_cancelled() -> None:
    """gRPC ends the calls it holds but has not handed to a handler with a bare CANCELLED when it stops, and no
    client retries that; the server refuses them first with UNAVAILABLE REPLICA_STOPPING, which clients retry."""
    outcomes: list[str] = []
    stopping = False

    async with serving(Brief()) as (srv, channel):
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        async def caller() -> None:
            while not stopping:
                try:
                    await stub.GetJob(jobs_pb2.GetJobRequest(), timeout=10)
                    outcomes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(f"{exc.code().name} {reason_of(exc)}")
                    await asyncio.sleep(1.0)  # a client's backoff: no new call before the server has stopped

        callers = [asyncio.create_task(caller()) for _ in range(32)]
        await asyncio.sleep(0.3)
        await srv.stop(grace=3.0)
        stopping = True
        await asyncio.gather(*callers)

    failures = {outcome for outcome in outcomes if outcome != "OK"}
    assert failures <= {"UNAVAILABLE REPLICA_STOPPING"}, failures
    assert outcomes.count("OK") > 32


class Counting(jobs_pb2_grpc.JobServiceServicer):
    """Counts the GetJob calls it answers."""

    def __init__(self) -> None:
        self.calls = 0

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        self.calls += 1
        return jobs_pb2.GetJobResponse()


def _replica(servicer: jobs_pb2_grpc.JobServiceServicer, settings: ServerSettings) -> app.Server:
    return app.build_server(
        [app.Api(SERVICE, servicer, jobs_pb2_grpc.add_JobServiceServicer_to_server)],
        domain="modelforge.test",
        settings=settings,
    )


async def _get_job_on_a_new_connection(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(), timeout=5)


async def test_replicas_sharing_a_port_each_take_connections_and_one_serves_on_when_the_other_stops() -> None:
    shared = ServerSettings(share_port=True)
    counts = Counting(), Counting()
    first, second = _replica(counts[0], shared), _replica(counts[1], shared)
    port = first.add_port("127.0.0.1:0")
    try:
        app.check_ports(dataclasses.replace(shared, port=port))  # a sharing process may join
        with pytest.raises(PortInUse):
            app.check_ports(ServerSettings(port=port))  # one that would not share is refused
        assert second.add_port(f"127.0.0.1:{port}") == port
        await first.start()
        await second.start()
        for _ in range(32):  # the kernel spreads new connections over the replicas by their addresses' hash
            await _get_job_on_a_new_connection(port)
        assert sum(c.calls for c in counts) == 32 and min(c.calls for c in counts) > 0, [c.calls for c in counts]
        await first.stop(None)
        before = counts[1].calls
        for _ in range(8):
            await _get_job_on_a_new_connection(port)
        assert counts[1].calls == before + 8
    finally:
        await first.stop(None)
        await second.stop(None)


async def test_a_replica_that_would_share_its_port_is_refused_one_another_process_holds_alone() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse):
            app.check_ports(ServerSettings(port=port, share_port=True))
        server = _replica(Unfinished(), ServerSettings(share_port=True))
        try:
            with pytest.raises(PortInUse):
                await app.serve(server, ServerSettings(port=port, share_port=True))
        finally:
            await server.stop(None)


@pytest.mark.parametrize("kind", ["unix", "unix-abstract"])
async def test_a_replica_answers_alone_on_its_private_address_and_no_other_process_takes_it(
    tmp_path: Path, kind: str
) -> None:
    """Where `modelforge up` checks each replica's health, and where a call reaches one replica of a shared port.
    gRPC itself would take over a socket file another server listens on: a second process is refused it."""
    name = f"modelforge-test-{os.getpid()}-{kind}"
    private = f"unix:{tmp_path / 'replica.sock'}" if kind == "unix" else f"unix-abstract:{name}"
    settings = ServerSettings(share_port=True, private_address=private)
    counts = Counting(), Counting()
    first, second = _replica(counts[0], settings), _replica(counts[1], settings)
    serving = asyncio.create_task(app.serve(first, settings))
    try:
        async with grpc.aio.insecure_channel(private) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            await stub.GetJob(jobs_pb2.GetJobRequest(), timeout=10, wait_for_ready=True)
            with pytest.raises(AddressInUse) as caught:
                app.check_ports(settings)
            assert str(caught.value) == (
                f"{private} (MODELFORGE_PRIVATE_ADDRESS) is in use by another process; stop it, or choose another "
                "address"
            )
            with pytest.raises(AddressInUse):
                await app.serve(second, settings)
            await stub.GetJob(jobs_pb2.GetJobRequest(), timeout=10)
        async with grpc.aio.insecure_channel(private) as channel:  # a new connection: still the first's
            await jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(), timeout=10)
        assert (counts[0].calls, counts[1].calls) == (3, 0)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await first.stop(None)
        await second.stop(None)


async def test_a_private_path_another_process_is_about_to_bind_is_refused_until_that_process_is_gone(
    tmp_path: Path,
) -> None:
    """Two processes that both found the path free before either bound it: gRPC would let the second take the
    socket file from the first. The first to check holds it from its check on, however long its bind takes."""
    path = tmp_path / "replica.sock"
    settings = ServerSettings(share_port=True, private_address=f"unix:{path}")
    holding = [
        sys.executable,
        "-c",
        "import sys, time; from modelforge_server import ports; held = ports.claim_private(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)",
        settings.private_address,
    ]
    server = _replica(Counting(), settings)
    with subprocess.Popen(holding, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(AddressInUse):
                app.check_ports(settings)
            with pytest.raises(AddressInUse):
                await app.serve(server, settings)
            assert not path.exists()  # refused before gRPC touched the path
        finally:
            holder.kill()  # a holder that dies, even by SIGKILL, lets go
            holder.wait(timeout=30)
            await server.stop(None)
    app.check_ports(settings)


@pytest.mark.parametrize("where", ["no directory", "a file"])
def test_a_private_path_that_cannot_be_a_socket_is_refused_before_anything_starts(tmp_path: Path, where: str) -> None:
    path = tmp_path / "missing" / "replica.sock" if where == "no directory" else tmp_path / "notes.txt"
    if where == "a file":
        path.write_text("not a socket")
    with pytest.raises(SettingsError) as caught:
        app.check_ports(ServerSettings(private_address=f"unix:{path}"))
    assert str(caught.value).startswith(f"MODELFORGE_PRIVATE_ADDRESS='unix:{path}': ")
    assert not isinstance(caught.value, AddressInUse)
    assert path.read_text() == "not a socket" if where == "a file" else not path.parent.exists()

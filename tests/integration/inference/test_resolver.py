"""ModelResolver against a real registry (PostgreSQL, gRPC): caching, invalidation by events, reconnection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_inference.domain import ModelRef
from modelforge_inference.registry_client import RegistryClient, RegistryNotFound, RegistryUnavailable, translate
from modelforge_inference.resolver import ModelEvent, ModelEventType, ModelResolver, ResolveTimeout
from modelforge_registry.__main__ import build as build_registry
from modelforge_registry.settings import RegistrySettings
from modelforge_server import errors, status
from tests.fixtures.onnx_models import build_add_one, model_bytes
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import registry_settings_for
from tests.fixtures.servers import upload_model as upload
from tests.integration.inference.conftest import eventually

# Short reconnect backoff, so that a restarted registry is reached again within a test's patience.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


class CallCounter:
    """Counts the RPCs a channel sends, by method name; ``interceptors`` go to the channel."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.interceptors = [_CountUnary(self), _CountStream(self)]  # grpc.aio files each under one shape only

    def count(self, details: grpc.aio.ClientCallDetails) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1


class _CountUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self._counter = counter

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        self._counter.count(client_call_details)
        return await continuation(client_call_details, request)


class _CountStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self._counter = counter

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        self._counter.count(client_call_details)
        return await continuation(client_call_details, request)


@dataclass
class Registry:
    """An in-process registry server that a test can stop and start again on the same port."""

    settings: RegistrySettings
    port: int = 0
    stack: AsyncExitStack | None = None
    counter: CallCounter = field(default_factory=CallCounter)

    async def start(self) -> None:
        stack = AsyncExitStack()
        server = await build_registry(self.settings, stack)
        self.port = server.add_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.stack = stack

    async def stop(self) -> None:
        stack, self.stack = self.stack, None
        if stack is not None:
            await stack.aclose()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def restartable_registry(clean_db: str, tmp_path: Path) -> AsyncIterator[Registry]:
    """Unlike tests.fixtures.servers' `registry`, one that can stop and start again on its port."""
    registry = Registry(registry_settings_for(clean_db, tmp_path / "registry", grace_seconds=0.5))
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()


@pytest.fixture
async def stub(restartable_registry: Registry) -> AsyncIterator[registry_pb2_grpc.RegistryServiceStub]:
    """A stub for the code under test, on a channel that counts its calls."""
    async with grpc.aio.insecure_channel(
        restartable_registry.address, options=CHANNEL_OPTIONS, interceptors=restartable_registry.counter.interceptors
    ) as channel:
        yield registry_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture
async def admin(restartable_registry: Registry) -> AsyncIterator[registry_pb2_grpc.RegistryServiceStub]:
    """A stub for the test's own changes to the registry, on a channel of its own."""
    async with grpc.aio.insecure_channel(restartable_registry.address, options=CHANNEL_OPTIONS) as channel:
        yield registry_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture
async def resolver(stub: registry_pb2_grpc.RegistryServiceStub) -> AsyncIterator[ModelResolver]:
    async with ModelResolver(stub, min_backoff=0.02, max_backoff=0.2) as resolver:
        await asyncio.wait_for(resolver.wait_connected(), 30)
        yield resolver


def add_one_bytes(width: int) -> bytes:
    return model_bytes(build_add_one(width=width))


class EventLog:
    """A listener that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[ModelEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: ModelEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(
        self, kind: ModelEventType, model: str = "", count: int = 1, timeout: float = 30.0
    ) -> ModelEvent:
        """The count-th event of that kind about model, once it has arrived."""
        async with asyncio.timeout(timeout):
            while True:
                matching = [event for event in self.events if event.type is kind and event.model == model]
                if len(matching) >= count:
                    return matching[count - 1]
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def events(resolver: ModelResolver) -> EventLog:
    """Every event the resolver hears. Wait for the events of a change before asserting what is cached: a
    resolution that an event overtakes is (rightly) not cached."""
    log = EventLog()
    resolver.add_listener(log)
    return log


async def test_resolves_by_number_alias_and_latest(admin, resolver: ModelResolver) -> None:
    first = await upload(admin, "adder", add_one_bytes(4))
    second = await upload(admin, "adder", add_one_bytes(5))
    await admin.SetAlias(registry_pb2.SetAliasRequest(model="adder", alias="production", version=1))

    latest = await resolver.resolve(ModelRef("adder"))
    assert (latest.name, latest.version, latest.sha256) == ("adder", 2, second.sha256)
    assert latest.size_bytes == second.size_bytes

    production = await resolver.resolve(ModelRef("adder", alias="production"))
    assert (production.version, production.sha256) == (1, first.sha256)
    assert production.aliases == ("production",)
    [spec] = production.signature.inputs
    assert spec.dtype == np.dtype(np.float32)
    assert spec.shape[1:] == (4,)

    assert (await resolver.resolve(ModelRef("adder", version=1))).sha256 == first.sha256


async def test_archived_versions_resolve_by_number_marked_archived(admin, resolver: ModelResolver) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    await admin.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(model="adder", version=1))

    resolved = await resolver.resolve(ModelRef("adder", version=1))

    assert resolved.archived
    assert resolved.signature.inputs[0].ort_type == "tensor(float)"


async def test_the_registry_models_are_listed_page_by_page(
    admin, restartable_registry: Registry, stub: registry_pb2_grpc.RegistryServiceStub
) -> None:
    for name in ("e", "a", "c", "b", "d"):
        await upload(admin, name, add_one_bytes(4))
    await admin.CreateModel(registry_pb2.CreateModelRequest(model=registry_pb2.Model(name="f")))

    models = [m async for m in RegistryClient(stub).list_models(page_size=2)]

    assert [(m.name, m.latest_version) for m in models] == [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1), ("f", 0)]
    assert restartable_registry.counter.calls["ListModels"] == 3


async def test_resolutions_are_cached_and_concurrent_ones_share_a_call(
    admin, restartable_registry: Registry, resolver: ModelResolver, events: EventLog
) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    await events.wait_for(ModelEventType.VERSION_CREATED, "adder")
    ref = ModelRef("adder", version=1)
    results = await asyncio.gather(*(resolver.resolve(ref) for _ in range(20)))
    assert all(result == results[0] for result in results)
    assert restartable_registry.counter.calls["ResolveModelRef"] == 1
    assert resolver.cached(ref) == results[0]
    assert await resolver.resolve(ref) is resolver.cached(ref)
    assert restartable_registry.counter.calls["ResolveModelRef"] == 1


async def test_unknown_refs_are_not_found_with_the_registry_reason(admin, resolver: ModelResolver) -> None:
    with pytest.raises(RegistryNotFound) as caught:
        await resolver.resolve(ModelRef("nothing-here"))
    assert status.code_for(caught.value) == grpc.StatusCode.NOT_FOUND
    assert "nothing-here" in str(caught.value)
    assert caught.value.reason == "MODEL_NOT_FOUND"

    await upload(admin, "adder", add_one_bytes(4))
    for ref in (ModelRef("adder", version=7), ModelRef("adder", alias="production")):
        with pytest.raises(RegistryNotFound) as caught:
            await resolver.resolve(ref)
        assert status.code_for(caught.value) == grpc.StatusCode.NOT_FOUND


async def test_a_moved_alias_is_seen_from_the_next_request_on(admin, resolver: ModelResolver, events: EventLog) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    await upload(admin, "adder", add_one_bytes(5))
    await admin.SetAlias(registry_pb2.SetAliasRequest(model="adder", alias="production", version=1))
    await events.wait_for(ModelEventType.ALIAS_SET, "adder")
    ref = ModelRef("adder", alias="production")
    assert (await resolver.resolve(ref)).version == 1
    assert resolver.cached(ref) is not None

    await admin.SetAlias(registry_pb2.SetAliasRequest(model="adder", alias="production", version=2))
    event = await events.wait_for(ModelEventType.ALIAS_SET, "adder", count=2)
    assert (event.version, event.alias) == (2, "production")
    assert resolver.cached(ref) is None
    assert (await resolver.resolve(ref)).version == 2


async def test_a_new_version_becomes_latest(admin, resolver: ModelResolver, events: EventLog) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    await events.wait_for(ModelEventType.VERSION_CREATED, "adder")
    assert (await resolver.resolve(ModelRef("adder"))).version == 1
    assert resolver.cached(ModelRef("adder")) is not None
    await upload(admin, "adder", add_one_bytes(5))
    await events.wait_for(ModelEventType.VERSION_CREATED, "adder", count=2)
    assert (await resolver.resolve(ModelRef("adder"))).version == 2


async def test_listeners_hear_of_archived_and_deleted_versions(admin, resolver: ModelResolver) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    await upload(admin, "adder", add_one_bytes(5))
    log = EventLog()
    remove = resolver.add_listener(log)
    await admin.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(model="adder", version=1))
    archived = await log.wait_for(ModelEventType.VERSION_ARCHIVED, "adder")
    assert archived.version == 1
    await admin.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(model="adder", version=1))
    deleted = await log.wait_for(ModelEventType.VERSION_DELETED, "adder")
    assert deleted.version == 1
    with pytest.raises(RegistryNotFound):
        await resolver.resolve(ModelRef("adder", version=1))
    remove()
    assert log not in resolver._listeners


async def test_a_failing_listener_does_not_stop_the_watch(admin, resolver: ModelResolver) -> None:
    def broken(event: ModelEvent) -> None:
        raise RuntimeError("listener bug")

    resolver.add_listener(broken)
    log = EventLog()
    resolver.add_listener(log)
    await upload(admin, "adder", add_one_bytes(4))
    await log.wait_for(ModelEventType.VERSION_CREATED, "adder")
    await upload(admin, "adder", add_one_bytes(5))
    assert (await log.wait_for(ModelEventType.VERSION_CREATED, "adder", count=2)).version == 2
    assert resolver.connected


async def test_reconnects_after_the_registry_restarts_and_drops_its_cache(
    admin, restartable_registry: Registry, resolver: ModelResolver, events: EventLog
) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    await events.wait_for(ModelEventType.VERSION_CREATED, "adder")
    ref = ModelRef("adder", version=1)
    await resolver.resolve(ref)
    assert resolver.cached(ref) is not None and resolver.reconnects == 1
    log = EventLog()
    resolver.add_listener(log)

    await restartable_registry.stop()
    await eventually(lambda: not resolver.connected, "the resolver to notice the registry is gone")
    assert resolver.cached(ref) is None
    # A ref resolved before is answered as it was last resolved; one never resolved cannot be.
    assert (await resolver.resolve(ref)).version == 1
    assert (await resolver.resolve(ref)).version == 1  # at once: no second wait on the registry
    assert resolver.stale_answers == 2
    with pytest.raises(RegistryUnavailable) as caught:
        await resolver.resolve(ModelRef("adder", alias="production"))
    assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE

    await restartable_registry.start()
    await asyncio.wait_for(resolver.wait_connected(), 30)
    assert resolver.reconnects == 2
    assert [event.type for event in log.events] == [ModelEventType.WATCH_STARTED]
    calls = restartable_registry.counter.calls["ResolveModelRef"]
    assert (await resolver.resolve(ref)).version == 1
    assert restartable_registry.counter.calls["ResolveModelRef"] == calls + 1

    # Events flow again on the new stream.
    await upload(admin, "adder", add_one_bytes(5))
    await log.wait_for(ModelEventType.VERSION_CREATED, "adder")
    assert (await resolver.resolve(ModelRef("adder"))).version == 2


@pytest.fixture
async def proxy(restartable_registry: Registry) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the registry, for the code under test: cut or stalled, the registry is out of its reach."""
    proxy = await TcpProxy.to_address("127.0.0.1", restartable_registry.port)
    yield proxy
    await proxy.close()


@pytest.fixture
async def proxied_resolver(proxy: TcpProxy) -> AsyncIterator[ModelResolver]:
    async with (
        grpc.aio.insecure_channel(proxy.address, options=CHANNEL_OPTIONS) as channel,
        ModelResolver(registry_pb2_grpc.RegistryServiceStub(channel), min_backoff=0.02, max_backoff=0.2) as resolver,
    ):
        await asyncio.wait_for(resolver.wait_connected(), 30)
        yield resolver


@pytest.fixture
def proxied_events(proxied_resolver: ModelResolver) -> EventLog:
    log = EventLog()
    proxied_resolver.add_listener(log)
    return log


async def test_the_last_resolutions_of_aliases_do_not_outlive_a_reconnection_that_may_have_missed_events(
    admin, proxy: TcpProxy, proxied_resolver: ModelResolver, proxied_events: EventLog
) -> None:
    resolver, log = proxied_resolver, proxied_events
    await upload(admin, "adder", add_one_bytes(4))
    await upload(admin, "adder", add_one_bytes(4))
    await admin.SetAlias(registry_pb2.SetAliasRequest(model="adder", alias="production", version=1))
    await log.wait_for(ModelEventType.ALIAS_SET, "adder")  # so that no event overtakes the resolution below
    production, first = ModelRef("adder", alias="production"), ModelRef("adder", version=1)
    assert (await resolver.resolve(production)).version == 1
    assert (await resolver.resolve(first)).version == 1

    await proxy.cut()
    await eventually(lambda: not resolver.connected, "the resolver to lose its event stream")
    await admin.SetAlias(registry_pb2.SetAliasRequest(model="adder", alias="production", version=2))  # unheard of
    reconnects = resolver.reconnects
    await proxy.restore()
    await eventually(lambda: resolver.reconnects > reconnects, "the resolver to watch again")

    await proxy.cut()  # down again, before anything asked for production since the reconnection
    with pytest.raises(RegistryUnavailable):  # rather than version 1, which the registry no longer says
        await resolver.resolve(production, timeout=5)
    # A version number names what it named: it answers as last resolved (the registry back, but not yet able to
    # resolve, used to fail every request for a while).
    assert (await resolver.resolve(first, timeout=5)).version == 1
    reconnects = resolver.reconnects
    await proxy.restore()
    await eventually(lambda: resolver.reconnects > reconnects, "the resolver to watch again")
    assert (await resolver.resolve(production, timeout=30)).version == 2


async def test_while_the_registry_does_not_answer_its_health_check_resolves_do_not_wait_on_it(
    admin, proxy: TcpProxy, proxied_resolver: ModelResolver, proxied_events: EventLog
) -> None:
    resolver, log = proxied_resolver, proxied_events
    await upload(admin, "adder", add_one_bytes(4))
    await log.wait_for(ModelEventType.VERSION_CREATED, "adder")
    known = ModelRef("adder", version=1)
    assert (await resolver.resolve(known)).version == 1

    proxy.stall()  # a hung registry: connected, silent
    resolver.registry_answers(False)  # what the inference service's health check of the registry then finds
    assert (await resolver.resolve(known, timeout=5)).version == 1  # as last resolved, at once
    with pytest.raises(RegistryUnavailable) as caught:  # never resolved: nothing to answer with, said at once
        await resolver.resolve(ModelRef("adder"), timeout=5)
    assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert "has not resolved that ref before" in str(caught.value)

    await proxy.restore()
    resolver.registry_answers(True)
    assert (await resolver.resolve(ModelRef("adder"), timeout=30)).version == 1


async def test_resolves_uncached_without_a_watch(admin, restartable_registry: Registry, stub) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    resolver = ModelResolver(stub)  # never started
    ref = ModelRef("adder", version=1)
    assert (await resolver.resolve(ref)).version == 1
    assert (await resolver.resolve(ref)).version == 1
    assert restartable_registry.counter.calls["ResolveModelRef"] == 2
    assert resolver.cached(ref) is None
    await resolver.aclose()


async def test_a_caller_whose_time_runs_out_gets_deadline_exceeded(admin, resolver: ModelResolver) -> None:
    await upload(admin, "adder", add_one_bytes(4))
    with pytest.raises(ResolveTimeout) as caught:
        await resolver.resolve(ModelRef("adder", version=1), timeout=0)
    assert status.code_for(caught.value) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await resolver.resolve(ModelRef("adder", version=1), timeout=30)).version == 1


def _rpc_error(code: grpc.StatusCode, details: str, reason: str = "") -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata()
    if reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="modelforge.registry", metadata={"model": "m"}))
        packed = status_pb2.Status(code=code.value[0], message=details, details=[info]).SerializeToString()
        trailers.add("grpc-status-details-bin", packed)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)


@pytest.mark.parametrize(
    ("code", "kind", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, RegistryNotFound, grpc.StatusCode.NOT_FOUND),
        (grpc.StatusCode.UNAVAILABLE, RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INTERNAL, RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.CANCELLED, RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        # the registry did not answer within the call's timeout: to the caller, the registry is unavailable
        (grpc.StatusCode.DEADLINE_EXCEEDED, RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_registry_statuses_become_domain_errors(
    code: grpc.StatusCode, kind: type[errors.ServiceError], expected: grpc.StatusCode
) -> None:
    error = translate(_rpc_error(code, "the registry's words", reason="SOME_REASON"), "resolve m")
    assert isinstance(error, kind)
    assert status.code_for(error) == expected
    assert "the registry's words" in str(error)
    assert error.metadata == {"model": "m"}
    if kind is not RegistryUnavailable:
        assert error.reason == "SOME_REASON"
    bare = translate(_rpc_error(code, ""), "resolve m")
    assert isinstance(bare, kind) and str(bare)


class _NewerRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """A registry of a later release, whose watch sends an event type this build does not know."""

    async def WatchModelEvents(self, request, context):
        yield registry_pb2.WatchModelEventsResponse(
            event=registry_pb2.ModelEvent(type=registry_pb2.MODEL_EVENT_TYPE_WATCH_STARTED)
        )
        yield registry_pb2.WatchModelEventsResponse(event=registry_pb2.ModelEvent(type=99, model="mlp", version=2))


async def test_an_event_of_a_type_this_build_does_not_know_still_names_its_model() -> None:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(_NewerRegistry(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = RegistryClient(registry_pb2_grpc.RegistryServiceStub(channel))
            events = [event async for event in client.watch()]
    finally:
        await server.stop(None)
    assert events == [
        ModelEvent(ModelEventType.WATCH_STARTED),
        ModelEvent(ModelEventType.OTHER, "mlp", 2),  # so the resolver drops what it holds of mlp
    ]

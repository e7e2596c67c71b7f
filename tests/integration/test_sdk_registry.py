# ruff: noqa: F811  (pytest fixtures imported from tests/fixtures are parameters here)
"""The SDK's registry clients against a real registry (PostgreSQL, gRPC over localhost).

The sync client blocks, so its scenarios run in a worker thread while the server keeps the test's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import onnx
import pytest

from modelforge import (
    AlreadyExistsError,
    AsyncRegistryClient,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelEventType,
    NotFoundError,
    RegistryClient,
    ResourceExhaustedError,
    UnavailableError,
    UnservedOutputsWarning,
    VersionState,
)
from modelforge._channel import REGISTRY, channel_options
from modelforge.registry.v1 import registry_pb2
from tests.fixtures.onnx_models import (  # noqa: F401
    ModelFile,
    add_one,
    build_tensor_and_sequence_output,
    mlp,
    model_bytes,
    not_onnx,
    onnx_dir,
)
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import tables_locked
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import RunningRegistry, registry, registry_settings  # noqa: F401


@pytest.fixture
async def client(registry: RunningRegistry) -> AsyncRegistryClient:
    async with AsyncRegistryClient(registry.address) as c:
        yield c


async def test_push_bytes_reports_progress_and_sends_the_checksum(client: AsyncRegistryClient, mlp: ModelFile) -> None:
    seen: list[tuple[int, int]] = []
    version = await client.push(mlp.data, name="fraud", chunk_bytes=1000, progress=lambda d, t: seen.append((d, t)))
    assert (version.model, version.version, version.state) == ("fraud", 1, VersionState.READY)
    assert version.sha256 == hashlib.sha256(mlp.data).hexdigest()
    assert version.size_bytes == len(mlp.data)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[0] == (0, len(mlp.data)) and seen[-1] == (len(mlp.data), len(mlp.data))
    assert len(seen) == 1 + -(-len(mlp.data) // 1000)
    graph = onnx.load_model_from_string(mlp.data).graph
    assert [s.name for s in version.signature.inputs] == [i.name for i in graph.input]
    assert version.signature.inputs[0].shape[0] == -1  # the batch dimension is dynamic


async def test_push_file_with_alias_then_resolve_every_ref_form(
    client: AsyncRegistryClient, add_one: ModelFile
) -> None:
    first = await client.push(add_one.path, name="adder", version_label="1.0.0", labels={"team": "core"})
    second = await client.push(add_one.path, name="adder", alias="production")
    assert (first.version, second.version) == (1, 2)
    assert second.aliases == ("production",)
    assert (await client.resolve("adder")).version == 2
    assert (await client.resolve("adder:1")).version_label == "1.0.0"
    assert (await client.resolve("adder@production")).version == 2
    model = await client.get_model("adder")
    assert model.latest_version == 2 and model.aliases == {"production": 2}


async def test_list_models_pages_lazily_over_every_model(client: AsyncRegistryClient) -> None:
    names = [f"m-{i:02d}" for i in range(7)]
    for name in names:
        await client.create_model(name, labels={"kind": "even" if int(name[-2:]) % 2 == 0 else "odd"})
    listed = [m.name async for m in client.list_models(page_size=2)]
    assert listed == names
    evens = [m.name async for m in client.list_models(labels={"kind": "even"}, page_size=3)]
    assert evens == ["m-00", "m-02", "m-04", "m-06"]
    assert [m.name async for m in client.list_models(name_prefix="m-0")] == names


async def test_versions_list_archive_restore_and_delete(client: AsyncRegistryClient, add_one: ModelFile) -> None:
    for _ in range(3):
        await client.push(add_one.data, name="adder")
    archived = await client.archive("adder:3")
    assert archived.state is VersionState.ARCHIVED
    assert (await client.resolve("adder")).version == 2
    assert [v.version async for v in client.list_versions("adder", page_size=1)] == [3, 2, 1]
    assert [v.version async for v in client.list_versions("adder", state="ARCHIVED")] == [3]
    assert (await client.restore("adder:3")).state is VersionState.READY
    await client.set_alias("adder", "canary", 1)
    with pytest.raises(FailedPreconditionError) as caught:
        await client.delete_version("adder@canary")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "VERSION_HAS_ALIASES"
    assert await client.delete_alias("adder", "canary") == 1
    await client.delete_version("adder:1")
    for change in (client.delete_version, client.archive, client.restore, client.update_version):
        with pytest.raises(ValueError, match="'adder' names a model, not one of its versions: give adder:N or adder@"):
            await change("adder")  # not whichever version happens to be newest
    assert [v.version async for v in client.list_versions("adder")] == [3, 2]
    assert [v.state async for v in client.list_versions("adder")] == [VersionState.READY] * 2
    updated = await client.update_version("adder:2", description="second", version_label="2.0")
    assert (updated.description, updated.version_label) == ("second", "2.0")
    with pytest.raises(FailedPreconditionError):
        await client.delete_model("adder")
    assert await client.delete_model("adder", force=True) == 2
    with pytest.raises(NotFoundError):
        await client.get_model("adder")


async def test_download_verifies_and_writes_atomically(
    client: AsyncRegistryClient,
    add_one: ModelFile,
    tmp_path: Path,
) -> None:
    await client.push(add_one.data, name="adder", alias="production")
    out = tmp_path / "downloads"
    out.mkdir()
    seen: list[int] = []
    version = await client.download("adder@production", out / "out.onnx", progress=lambda d, t: seen.append(d))
    assert (out / "out.onnx").read_bytes() == add_one.data
    assert version.version == 1 and seen[-1] == len(add_one.data)
    await client.download("adder", out)
    assert (out / "adder.onnx").read_bytes() == add_one.data
    assert sorted(p.name for p in out.iterdir()) == ["adder.onnx", "out.onnx"]  # no partial files left
    await client.download("adder", f"{tmp_path / 'new-dir'}/")  # a directory to make, as the CLI takes it too
    assert (tmp_path / "new-dir" / "adder.onnx").read_bytes() == add_one.data


async def test_a_download_on_a_connection_gone_quiet_ends_unavailable_rather_than_waiting_for_ever(
    registry: RunningRegistry, add_one: ModelFile, tmp_path: Path
) -> None:
    async with AsyncRegistryClient(registry.address) as client:
        await client.push(add_one.data, name="adder")
    loop = asyncio.get_running_loop()
    async with TcpProxy.in_front_of(registry.address) as proxy:

        async def stalled() -> None:
            proxy.stall()

        def scenario() -> None:
            options = channel_options(REGISTRY, keepalive_seconds=3.0)  # the SDK's own, with a shorter keepalive
            with (
                grpc.insecure_channel(proxy.address, options=options) as channel,
                RegistryClient(channel=channel) as client,
            ):
                assert client.get_model("adder").name == "adder"  # connected
                asyncio.run_coroutine_threadsafe(stalled(), loop).result()
                # The server's host froze (or a network cut): the keepalive ends the call. With gRPC retrying it,
                # the next attempt waited for a new connection's handshake, and the one after it, for minutes.
                with pytest.raises(UnavailableError):
                    client.download("adder", tmp_path / "adder.onnx")

        await asyncio.wait_for(asyncio.to_thread(scenario), 20)
    assert not list(tmp_path.glob("*adder.onnx*"))  # nor a partial file


async def test_failures_are_typed_errors_with_code_and_reason(
    client: AsyncRegistryClient,
    not_onnx: ModelFile,
    add_one: ModelFile,
    tmp_path: Path,
) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.resolve("ghost")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert "'ghost'" in str(caught.value)
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)

    await client.create_model("taken")
    with pytest.raises(AlreadyExistsError) as exists:
        await client.create_model("taken")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS

    with pytest.raises(InvalidArgumentError) as bad:
        await client.push(not_onnx.data, name="broken")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.reason == "INVALID_ONNX"

    with pytest.raises(NotFoundError) as missing:
        await client.push(add_one.data, name="absent", create_model=False)
    assert missing.value.reason == "MODEL_NOT_FOUND"

    out = tmp_path / "downloads"
    with pytest.raises(NotFoundError):
        await client.download("taken:7", out / "deeper" / "x.onnx")
    assert not out.exists()  # the directories to make were not made for a download the registry refused

    with pytest.raises(ValueError, match="invalid model reference"):
        await client.resolve("bad:ref@x")


async def test_push_over_the_limit_is_resource_exhausted(
    registry: RunningRegistry,
) -> None:
    too_big = b"\0" * (registry.settings.max_model_bytes + 1)
    async with AsyncRegistryClient(registry.address) as client:
        # Repeated: the refusal comes while the client is still writing, which once raced with the status.
        for _ in range(10):
            with pytest.raises(ResourceExhaustedError) as caught:
                await client.push(too_big, name="huge")
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.reason == "MODEL_TOO_LARGE"


async def test_watch_sees_changes_after_it_started(client: AsyncRegistryClient, add_one: ModelFile) -> None:
    events = client.watch(model="adder")
    first = await anext(events)
    assert first.type is ModelEventType.WATCH_STARTED
    await client.push(add_one.data, name="adder", alias="production")
    kinds = []
    async for event in events:
        kinds.append(event.type)
        if event.type is ModelEventType.ALIAS_SET:
            assert (event.model, event.version, event.alias) == ("adder", 1, "production")
            break
    await events.aclose()
    assert ModelEventType.VERSION_CREATED in kinds


async def test_raw_stub_is_reachable(client: AsyncRegistryClient) -> None:
    response = await client.registry_stub.CreateModel(
        registry_pb2.CreateModelRequest(model=registry_pb2.Model(name="raw"))
    )
    assert response.model.name == "raw"


def _sync_scenario(address: str, model_file: Path, data: bytes, out_dir: Path) -> None:
    with RegistryClient(address) as registry:
        progress: list[int] = []
        version = registry.push(
            model_file, name="sync-model", alias="production", progress=lambda d, t: progress.append(d)
        )
        assert version.ref.version == 1 and version.aliases == ("production",)
        assert progress[-1] == len(data)
        registry.push(data, name="sync-model")
        assert [m.name for m in registry.list_models(page_size=1)] == ["sync-model"]
        assert [v.version for v in registry.list_versions("sync-model")] == [2, 1]
        assert registry.resolve("sync-model@production").version == 1
        registry.download("sync-model:2", out_dir / "v2.onnx")
        assert (out_dir / "v2.onnx").read_bytes() == data
        registry.set_alias("sync-model", "production", 2)
        assert registry.archive("sync-model:1").state is VersionState.ARCHIVED
        with pytest.raises(ValueError, match="names a model, not one of its versions"):
            registry.delete_version("sync-model")
        try:
            registry.archive("sync-model@production")
        except FailedPreconditionError as exc:
            assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
        else:
            raise AssertionError("archiving the alias target must fail")
        try:
            registry.get_model("nope")
        except NotFoundError as exc:
            assert exc.reason == "MODEL_NOT_FOUND"
        else:
            raise AssertionError("an unknown model must raise NotFoundError")
        events = registry.watch()
        assert next(events).type is ModelEventType.WATCH_STARTED
        events.close()


async def test_sync_client_covers_the_same_ground(
    registry: RunningRegistry,
    add_one: ModelFile,
    tmp_path: Path,
) -> None:
    out = tmp_path / "downloads"
    out.mkdir()
    await asyncio.to_thread(_sync_scenario, registry.address, add_one.path, add_one.data, out)


def _unreachable(address: str) -> None:
    with RegistryClient(address, timeout=5) as registry:
        try:
            registry.get_model("anything")
        except UnavailableError as exc:
            assert exc.code == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("a registry that is not there must raise UnavailableError")


async def test_unreachable_registry_is_unavailable(unused_address: str) -> None:
    await asyncio.to_thread(_unreachable, unused_address)


@pytest.fixture
def unused_address(closed_port: int) -> str:
    return f"127.0.0.1:{closed_port}"


async def test_a_push_whose_alias_cannot_be_set_says_the_version_was_stored(
    registry: RunningRegistry, add_one: ModelFile
) -> None:
    # Writes to the aliases wait on the test's lock until SetAlias's deadline passes; the upload has no deadline.
    says = (
        "pushed adder:1, but whether alias production was set is unknown: Deadline Exceeded: the call did not "
        "finish within its timeout; give it longer with timeout= on the call or the client (None for no limit)"
    )
    async with tables_locked(registry.settings.database_url or "", "registry.aliases"):
        async with AsyncRegistryClient(registry.address, timeout=0.5) as hurried:
            with pytest.raises(DeadlineExceededError) as caught:
                await hurried.push(add_one.data, name="adder", alias="production")
        assert str(caught.value) == says and caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

        def sync_push() -> None:
            with RegistryClient(registry.address, timeout=0.5) as hurried:
                try:
                    hurried.push(add_one.path, name="adder", alias="production")
                except DeadlineExceededError as exc:
                    assert str(exc) == says.replace("adder:1", "adder:2")
                else:
                    raise AssertionError("SetAlias could not write: push must fail")

        await asyncio.to_thread(sync_push)
    async with AsyncRegistryClient(registry.address) as client:  # the registry may have set the alias after the
        assert [v.version async for v in client.list_versions("adder")] == [2, 1]  # caller stopped waiting


async def test_a_progress_callback_that_raises_ends_the_push_with_its_exception_and_stores_nothing(
    client: AsyncRegistryClient, registry: RunningRegistry, add_one: ModelFile
) -> None:
    def refuse(done: int, total: int) -> None:
        if done:
            raise RuntimeError("not now")

    with pytest.raises(RuntimeError, match="^not now$"):  # it was ModelForgeError UNKNOWN, the callback's lost
        await client.push(add_one.data, name="adder", progress=refuse, chunk_bytes=64)

    def sync_pushes() -> None:
        with RegistryClient(registry.address) as blocking:
            with pytest.raises(RuntimeError, match="^not now$"):
                blocking.push(add_one.path, name="adder", progress=refuse, chunk_bytes=64)

            def interrupt(done: int, total: int) -> None:
                if done:
                    raise KeyboardInterrupt  # as Ctrl-C in a callback would: the push waited for ever

            with pytest.raises(KeyboardInterrupt):
                blocking.push(add_one.path, name="adder", progress=interrupt, chunk_bytes=64)

    await asyncio.wait_for(asyncio.to_thread(sync_pushes), 30)
    assert [m.name async for m in client.list_models()] == []  # nothing was stored


async def test_a_push_cut_off_once_its_bytes_were_sent_says_the_version_may_be_stored(
    registry: RunningRegistry, add_one: ModelFile
) -> None:
    async with TcpProxy.in_front_of(registry.address) as proxy:

        def cut_when_sent(done: int, total: int) -> None:
            if done == total:
                asyncio.ensure_future(proxy.cut())

        async with AsyncRegistryClient(proxy.address) as client:
            with pytest.raises(UnavailableError) as caught:
                await client.push(add_one.data, name="adder", progress=cut_when_sent)
    assert "the whole file had been sent: the registry may have stored the version" in str(caught.value)
    assert "`modelforge models ls adder` shows whether it did, before pushing again" in str(caught.value)


async def test_malformed_names_are_value_errors_before_any_call(
    client: AsyncRegistryClient, registry: RunningRegistry, add_one: ModelFile
) -> None:
    await client.push(add_one.data, name="adder")
    calls: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: client.get_model("Bad!"), "invalid model name 'Bad!'"),
        (lambda: client.create_model("Bad!"), "invalid model name 'Bad!'"),
        (lambda: client.update_model("Bad!", description="x"), "invalid model name 'Bad!'"),
        (lambda: client.delete_model("Bad!"), "invalid model name 'Bad!'"),
        (lambda: client.push(add_one.data, name="Demo!"), "invalid model name 'Demo!'"),
        (lambda: client.set_alias("adder", "Bad!", 1), "invalid alias 'Bad!'"),
        (lambda: client.set_alias("adder", "production", 0), "invalid version 0"),
        (lambda: client.set_alias("adder", "production", 2**63), "invalid version 9223372036854775808"),
        (lambda: client.delete_alias("Bad!", "production"), "invalid model name 'Bad!'"),
        (lambda: client.delete_alias("adder", "Bad!"), "invalid alias 'Bad!'"),
        (lambda: anext(client.list_versions("Bad!")), "invalid model name 'Bad!'"),
        (lambda: anext(client.watch(model="Bad!")), "invalid model name 'Bad!'"),
    ]
    for call, says in calls:
        with pytest.raises(ValueError, match=re.escape(says)):
            await call()
    assert [m.name async for m in client.list_models()] == ["adder"]  # nothing was pushed or made

    def sync_calls() -> None:
        with RegistryClient(registry.address) as sync:
            for call, says in [
                (lambda: sync.get_model("Bad!"), "invalid model name 'Bad!'"),
                (lambda: sync.push(add_one.data, name="Demo!"), "invalid model name 'Demo!'"),
                (lambda: sync.set_alias("adder", "Bad!", 1), "invalid alias 'Bad!'"),
                (lambda: next(sync.list_versions("Bad!")), "invalid model name 'Bad!'"),
            ]:
                with pytest.raises(ValueError, match=re.escape(says)):
                    call()

    await asyncio.to_thread(sync_calls)


async def test_a_call_with_a_timeout_of_its_own_has_that_deadline_instead_of_the_clients(
    registry: RunningRegistry, add_one: ModelFile
) -> None:
    async with AsyncRegistryClient(registry.address) as setup:
        await setup.push(add_one.path, name="adder", alias="production")
    async with TcpProxy.in_front_of(registry.address) as proxy:
        proxy.delay = 0.1  # every answer takes longer than the clients' timeout below
        async with AsyncRegistryClient(proxy.address, timeout=0.05) as client:
            with pytest.raises(DeadlineExceededError):
                await client.get_model("adder")  # the client's timeout, by default
            assert (await client.get_model("adder", timeout=30)).name == "adder"
            assert (await client.resolve("adder@production", timeout=None)).version == 1
            assert [m.name async for m in client.list_models(timeout=30)] == ["adder"]

        def blocking() -> None:
            with RegistryClient(proxy.address, timeout=0.05) as client:
                with pytest.raises(DeadlineExceededError):
                    client.resolve("adder:1")
                assert client.resolve("adder:1", timeout=30).version == 1
                assert [v.version for v in client.list_versions("adder", timeout=None)] == [1]
                assert client.set_alias("adder", "staging", 1, timeout=30).version == 1

        await asyncio.to_thread(blocking)


async def test_a_client_keeps_trying_to_reach_its_service_at_least_every_two_seconds_while_it_is_away(
    registry: RunningRegistry,
) -> None:
    """gRPC's own backoff between attempts to connect grows toward two minutes while calls keep failing: a client
    whose service was away for 16 s went on failing its calls UNAVAILABLE for up to 12 s after its return."""
    async with TcpProxy.in_front_of(registry.address) as proxy, AsyncRegistryClient(proxy.address) as client:
        with pytest.raises(NotFoundError):
            await client.get_model("absent")  # connected
        await proxy.cut()
        attempts = 0

        def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal attempts
            attempts += 1
            writer.transport.abort()

        away = await asyncio.start_server(refuse, "127.0.0.1", proxy.port)  # the port answers, the service does not
        loop = asyncio.get_running_loop()
        away_until = loop.time() + 12.0
        while loop.time() < away_until:  # callers keep calling, and failing
            with pytest.raises(UnavailableError):
                await client.get_model("absent")
            await asyncio.sleep(0.5)
        away.close()
        await away.wait_closed()
        # Attempts 0.1 s apart at first, never more than 2 s: 12 in 12 s. gRPC's own backoff (1 s, growing by 1.6
        # times each time) made 5.
        assert attempts >= 8, attempts
        await proxy.restore()

        async def back() -> bool:
            try:
                await client.get_model("absent")
            except UnavailableError:
                return False
            except NotFoundError:
                return True
            return False

        await eventually(back, "the client to reach the registry again")


async def test_a_push_of_a_model_with_outputs_that_are_not_served_warns_which(
    client: AsyncRegistryClient, add_one: ModelFile
) -> None:
    with pytest.warns(UnservedOutputsWarning, match=r"both:1: output 'items' is not a tensor ModelForge serves") as w:
        version = await client.push(model_bytes(build_tensor_and_sequence_output()), name="both")
    assert len(w) == 1 and "options={'zipmap': False}" in str(w[0].message)
    assert str(version.signature) == (
        "inputs x: float32[batch, 2] -> outputs y: float32[batch, 2]; items: not a tensor ModelForge serves (a "
        "sequence, map or optional, or another element type)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model whose outputs are all served: no warning
        await client.push(add_one.data, name="plain")


async def test_a_push_of_a_model_object_says_to_serialize_it(client: AsyncRegistryClient, add_one: ModelFile) -> None:
    with pytest.raises(TypeError, match=r"not ModelProto; for an onnx.ModelProto .* pass model.SerializeToString\(\)"):
        await client.push(onnx.load_from_string(add_one.data), name="object")  # type: ignore[arg-type]

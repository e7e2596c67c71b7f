# ruff: noqa: F811  (pytest fixtures imported from conftest modules are parameters here)
"""The SDK's inference clients against a real inference service and registry (PostgreSQL, Redis, gRPC).

The sync client blocks, so its scenario runs in a worker thread while the servers keep the test's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

import grpc
import numpy as np
import pytest

import modelforge
from modelforge import (
    AsyncInferenceClient,
    AsyncRegistryClient,
    DeadlineExceededError,
    InferenceClient,
    InvalidArgumentError,
    ModelState,
    NotFoundError,
    Prediction,
    ResourceExhaustedError,
)
from modelforge_inference.settings import InferenceSettings
from tests.fixtures.onnx_models import build_constant, model_bytes
from tests.fixtures.proxy import TcpProxy
from tests.integration.inference.conftest import (  # noqa: F401
    ModelFile,
    RunningInference,
    StartInference,
    add_one,
    image_generator,
    inference,
    onnx_dir,
    registry,
    registry_settings,
    start_inference,
    string_model,
)


@pytest.fixture
async def client(inference: RunningInference) -> AsyncInferenceClient:
    async with AsyncInferenceClient(inference.address) as c:
        yield c


async def _push(inference: RunningInference, model: ModelFile, name: str, alias: str | None = None) -> None:
    async with AsyncRegistryClient(inference.registry.address) as registry:
        await registry.push(model.data, name=name, alias=alias)


async def test_predict_returns_numpy_outputs(
    client: AsyncInferenceClient, inference: RunningInference, add_one: ModelFile
) -> None:
    await _push(inference, add_one, "adder", alias="production")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    outputs = await client.predict("adder@production", {"x": x})
    assert list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], x + 1)
    full = await client.predict_full("adder", {"x": x}, cache="bypass")
    assert (full.model, full.version, full.cache_hit) == ("adder", 1, False)
    assert full.sha256 == add_one.sha256
    assert full.timings.total.total_seconds() > 0


async def _requests_per_replica(private: list[str], model: str) -> list[int]:
    counts = []
    for address in private:
        async with AsyncInferenceClient(address) as replica:
            statistics = await replica.statistics()
        counts.append(sum(s.request_count for s in statistics.models if s.model == model))
    return counts


async def test_a_client_with_several_connections_spreads_its_calls_over_replicas_sharing_a_port(
    start_inference: StartInference, add_one: ModelFile
) -> None:
    private = [f"unix-abstract:modelforge-test-{os.getpid()}-sdk-replica-{n}" for n in (1, 2)]
    x = np.ones((1, 4), np.float32)
    async with (
        start_inference(share_port=True, private_address=private[0]) as first,
        start_inference(first.port, share_port=True, private_address=private[1]),
    ):
        await _push(first, add_one, "spread")
        target = f"127.0.0.1:{first.port}"
        async with AsyncInferenceClient(target) as one:  # one connection: one replica
            for _ in range(16):
                await one.predict("spread", {"x": x}, cache="bypass")
        assert sorted(await _requests_per_replica(private, "spread")) == [0, 16]
        before = await _requests_per_replica(private, "spread")
        async with AsyncInferenceClient(target, connections=16) as several:
            for _ in range(32):
                await several.predict("spread", {"x": x}, cache="bypass")
        after = await _requests_per_replica(private, "spread")
        added = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(added) == 32 and min(added) > 0, added  # both replicas: 2 in 65,536 would land all on one

        def blocking() -> list[np.ndarray]:  # the blocking client takes turns too
            with InferenceClient(target, connections=4) as client:
                return [client.predict("spread", {"x": x}, cache="bypass")["y"] for _ in range(8)]

        assert all(np.array_equal(y, x + 1) for y in await asyncio.to_thread(blocking))
        assert sum(await _requests_per_replica(private, "spread")) == sum(after) + 8


async def test_a_listing_over_several_connections_takes_all_its_pages_from_one_replica(
    start_inference: StartInference, add_one: ModelFile
) -> None:
    private = [f"unix-abstract:modelforge-test-{os.getpid()}-sdk-listing-{n}" for n in (1, 2)]
    async with (
        start_inference(share_port=True, private_address=private[0]) as first,
        start_inference(first.port, share_port=True, private_address=private[1]),
    ):
        async with AsyncInferenceClient(private[0]) as replica:  # three versions on one replica, none on the other
            for name in ("ma", "mb", "mc"):
                await _push(first, add_one, name)
                await replica.load(name)
        async with AsyncInferenceClient(f"127.0.0.1:{first.port}", connections=16) as several:
            listings = [[m.model async for m in several.list_loaded(page_size=1)] for _ in range(12)]
        assert {tuple(listing) for listing in listings} <= {("ma", "mb", "mc"), ()}, listings


async def test_a_model_with_no_inputs_is_predicted_with_none(client: AsyncInferenceClient, inference: RunningInference):
    async with AsyncRegistryClient(inference.registry.address) as registry:
        await registry.push(model_bytes(build_constant()), name="constant")
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal((await client.predict("constant", {}))["c"], expected)
    np.testing.assert_array_equal((await client.predict_stream("constant", {})).outputs["c"], expected)
    with pytest.raises(InvalidArgumentError, match="no such input"):
        await client.predict("constant", {"x": expected})


async def test_predict_stream_reassembles_large_outputs_with_progress(
    client: AsyncInferenceClient, inference: RunningInference, image_generator: ModelFile
) -> None:
    await _push(inference, image_generator, "painter")
    feeds = image_generator.sample(2)
    expected = await client.predict("painter", feeds)
    seen: list[tuple[int, int]] = []
    streamed = await client.predict_stream("painter", feeds, progress=lambda d, t: seen.append((d, t)))
    assert list(streamed.outputs) == list(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(streamed.outputs[name], array)
    total = sum(a.nbytes for a in expected.values())
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert len(seen) > 2  # several chunks, each reported
    unverified = await client.predict_stream("painter", feeds, verify=False)
    for name, array in expected.items():
        np.testing.assert_array_equal(unverified.outputs[name], array)


async def test_load_list_statistics_and_unload(
    client: AsyncInferenceClient, inference: RunningInference, add_one: ModelFile
) -> None:
    await _push(inference, add_one, "adder")
    loaded = await client.load("adder:1")
    assert (loaded.model, loaded.version, loaded.state) == ("adder", 1, ModelState.READY)
    assert [(m.model, m.version) async for m in client.list_loaded()] == [("adder", 1)]
    await client.predict("adder:1", {"x": np.zeros((1, 4), np.float32)})
    stats = await client.statistics("adder")
    (entry,) = stats.models
    assert (entry.model, entry.version, entry.request_count, entry.failure_count) == ("adder", 1, 1, 0)
    unloaded = await client.unload("adder")
    assert [(m.model, m.version) for m in unloaded] == [("adder", 1)]
    assert [m async for m in client.list_loaded()] == []


async def test_failures_are_typed_errors(
    client: AsyncInferenceClient, inference: RunningInference, add_one: ModelFile
) -> None:
    with pytest.raises(NotFoundError) as missing:
        await client.predict("ghost", {"x": np.zeros((1, 4), np.float32)})
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    await _push(inference, add_one, "adder")
    with pytest.raises(InvalidArgumentError) as bad:
        await client.predict("adder", {"x": np.zeros((1, 5), np.float32)})
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in str(bad.value)
    with pytest.raises(NotFoundError):
        await client.unload("adder")
    with pytest.raises(InvalidArgumentError, match="'x': missing"):
        await client.predict("adder", {})


async def test_messages_over_the_size_limits_say_what_to_do(
    inference: RunningInference, add_one: ModelFile, image_generator: ModelFile
) -> None:
    await _push(inference, add_one, "adder")
    await _push(inference, image_generator, "painter")
    async with AsyncInferenceClient(inference.address, max_message_bytes=2 * 1024 * 1024) as small:
        with pytest.raises(ResourceExhaustedError) as request:  # refused by the client's channel before sending
            await small.predict("adder", {"x": np.zeros((200_000, 4), np.float32)})  # 3,200,000 bytes
        assert "Sent message larger than max" in str(request.value)
        assert "send fewer items per request" in str(request.value)
        with pytest.raises(ResourceExhaustedError) as answer:  # a 3 MiB image: within the server's limit, not ours
            await small.predict("painter", image_generator.sample(1))
        assert "Received message larger than max" in str(answer.value)
        assert "predict_stream" in str(answer.value)
        streamed = await small.predict_stream("painter", image_generator.sample(1))  # in chunks of 1 MiB
        assert streamed.outputs["image"].shape == (1, 3, 512, 512)


def _sync_scenario(address: str) -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with InferenceClient(address) as inference:
        np.testing.assert_array_equal(inference.predict("adder", {"x": x})["y"], x + 1)
        streamed = inference.predict_stream("adder", {"x": x})
        np.testing.assert_array_equal(streamed.outputs["y"], x + 1)
        assert inference.load("adder").state is ModelState.READY
        assert [m.model for m in inference.list_loaded(model="adder")] == ["adder"]
        assert inference.statistics().models[0].request_count == 2
        assert len(inference.unload("adder:1")) == 1
        try:
            inference.predict("adder", {"nope": x})
        except InvalidArgumentError as exc:
            assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("an unknown input must raise InvalidArgumentError")


async def test_sync_client_covers_the_same_ground(inference: RunningInference, add_one: ModelFile) -> None:
    await _push(inference, add_one, "adder")
    await asyncio.to_thread(_sync_scenario, inference.address)


# A stream's timeout covers the run (until the first message) and each wait for the next, not the whole transfer.
STREAM_TIMEOUT = 0.5


async def test_a_streamed_transfer_longer_than_the_timeout_completes_while_its_chunks_keep_coming_in_time(
    inference: RunningInference, image_generator: ModelFile
) -> None:
    await _push(inference, image_generator, "painter")
    feeds = image_generator.sample(1)  # 3 MiB: three chunks
    # Slower than the timeout on every chunk: the time the caller takes with a chunk is not time waiting for one.
    slow_reader = lambda done, total: time.sleep(STREAM_TIMEOUT * 1.2)  # noqa: E731
    async with AsyncInferenceClient(inference.address, timeout=STREAM_TIMEOUT) as client:
        began = time.monotonic()
        streamed = await client.predict_stream("painter", feeds, progress=slow_reader)
        assert time.monotonic() - began > STREAM_TIMEOUT
    expected = await asyncio.to_thread(_sync_stream, inference.address, feeds, slow_reader)
    for name, array in streamed.outputs.items():
        np.testing.assert_array_equal(array, expected.outputs[name])


def _sync_stream(address: str, feeds: dict[str, np.ndarray], progress: Any) -> Prediction:
    with InferenceClient(address, timeout=STREAM_TIMEOUT) as client:
        began = time.monotonic()
        streamed = client.predict_stream("painter", feeds, progress=progress)
        assert time.monotonic() - began > STREAM_TIMEOUT
        return streamed


async def test_a_stream_that_stops_sending_fails_deadline_exceeded_after_the_timeout(
    inference: RunningInference, image_generator: ModelFile
) -> None:
    await _push(inference, image_generator, "painter")
    feeds = image_generator.sample(2)
    async with TcpProxy.in_front_of(inference.address) as proxy:
        loop = asyncio.get_running_loop()
        async with AsyncInferenceClient(proxy.address, timeout=STREAM_TIMEOUT) as client:
            with pytest.raises(DeadlineExceededError, match=r"PredictStream sent nothing for 0.5 s"):
                await asyncio.wait_for(
                    client.predict_stream("painter", feeds, progress=lambda done, total: proxy.stall()), 10
                )
        await proxy.restore()

        def stall_from_the_thread(done: int, total: int) -> None:
            loop.call_soon_threadsafe(proxy.stall)

        def sync_scenario() -> None:
            stalling = pytest.raises(DeadlineExceededError, match=r"PredictStream sent nothing for 0.5 s")
            with InferenceClient(proxy.address, timeout=STREAM_TIMEOUT) as client, stalling:
                client.predict_stream("painter", feeds, progress=stall_from_the_thread)

        await asyncio.wait_for(asyncio.to_thread(sync_scenario), 10)


async def test_a_call_with_a_timeout_of_its_own_has_that_deadline_instead_of_the_clients(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await _push(inference, add_one, "adder")
    x = np.ones((2, 4), np.float32)
    async with TcpProxy.in_front_of(inference.address) as proxy:
        proxy.delay = 0.1  # every answer takes longer than the clients' timeout below
        async with AsyncInferenceClient(proxy.address, timeout=0.05) as client:
            with pytest.raises(DeadlineExceededError):
                await client.predict("adder", {"x": x})  # the client's timeout, by default
            np.testing.assert_array_equal((await client.predict("adder", {"x": x}, timeout=30))["y"], x + 1)
            assert (await client.predict_full("adder", {"x": x}, timeout=None)).version == 1
            streamed = await client.predict_stream("adder", {"x": x}, timeout=30)
            np.testing.assert_array_equal(streamed.outputs["y"], x + 1)
            assert (await client.load("adder", timeout=None)).state is ModelState.READY
            assert [m.model async for m in client.list_loaded(timeout=30)] == ["adder"]
            assert (await client.statistics("adder", timeout=None)).models[0].model == "adder"
            assert [m.version for m in await client.unload("adder", timeout=30)] == [1]

        def blocking() -> None:
            with InferenceClient(proxy.address, timeout=0.05) as client:
                with pytest.raises(DeadlineExceededError):
                    client.load("adder")
                np.testing.assert_array_equal(client.predict("adder", {"x": x}, timeout=30)["y"], x + 1)
                assert client.predict_full("adder", {"x": x}, timeout=None).version == 1
                assert client.predict_stream("adder", {"x": x}, timeout=30).version == 1
                assert client.load("adder", timeout=None).state is ModelState.READY
                assert [m.model for m in client.list_loaded(timeout=30)] == ["adder"]
                assert client.statistics(timeout=None).models
                assert len(client.unload("adder", timeout=30)) == 1

        await asyncio.to_thread(blocking)
        proxy.delay = 0.0
        proxy.stall()  # now no answer comes at all: a call's own timeout ends it, where the client has none
        async with AsyncInferenceClient(proxy.address, timeout=None) as client:
            for call in (
                client.predict("adder", {"x": x}, timeout=0.05),
                client.predict_stream("adder", {"x": x}, timeout=0.05),
                client.load("adder", timeout=0.05),
                client.unload("adder", timeout=0.05),
                client.statistics(timeout=0.05),
                anext(client.list_loaded(timeout=0.05)),
            ):
                with pytest.raises(DeadlineExceededError):
                    await asyncio.wait_for(call, 10)


async def test_calls_in_flight_when_the_client_closes_end_with_the_sdks_cancelled_error(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await _push(inference, add_one, "adder")
    x = np.ones((1, 4), np.float32)
    async with (
        TcpProxy.in_front_of(inference.address) as proxy,
        TcpProxy.in_front_of(inference.registry.address) as registry_proxy,
    ):
        proxy.stall()  # no call through either can finish
        registry_proxy.stall()
        client = AsyncInferenceClient(proxy.address, timeout=None)
        registry = AsyncRegistryClient(registry_proxy.address, timeout=None)  # the same code, in every async client
        calls = [
            asyncio.create_task(client.predict("adder", {"x": x})),
            asyncio.create_task(client.predict_stream("adder", {"x": x})),
            asyncio.create_task(anext(client.list_loaded())),
            asyncio.create_task(client.load("adder")),
            asyncio.create_task(registry.get_model("adder")),
        ]
        await asyncio.sleep(0)  # each task runs up to its call, which is then in flight
        await client.close()
        await registry.close()
        for call in calls:
            with pytest.raises(modelforge.CancelledError) as caught:
                await call
            assert type(caught.value) is modelforge.CancelledError  # not ClientClosedError: the calls were made
            assert caught.value.code == grpc.StatusCode.CANCELLED
            assert "closed while this call was in flight" in str(caught.value)


async def test_a_cancelled_task_or_an_expired_wait_for_still_ends_with_asyncio_cancellation(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await _push(inference, add_one, "adder")
    x = np.ones((1, 4), np.float32)
    async with TcpProxy.in_front_of(inference.address) as proxy:
        proxy.stall()
        async with AsyncInferenceClient(proxy.address, timeout=None) as client:
            task = asyncio.create_task(client.predict("adder", {"x": x}))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.predict_stream("adder", {"x": x}), 0.05)
            # Cancelled by its caller while the client closes: the caller's cancellation, not the client's.
            task = asyncio.create_task(client.predict("adder", {"x": x}))
            await asyncio.sleep(0)
            task.cancel()
            await client.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()


async def test_a_request_of_as_many_input_bytes_as_the_server_takes_by_default_is_sent(
    start_inference: StartInference, add_one: ModelFile
) -> None:
    defaults = {field.name: field.default for field in dataclasses.fields(InferenceSettings)}
    limit = defaults["max_request_bytes"]
    async with start_inference(max_request_bytes=limit, max_message_bytes=defaults["max_message_bytes"]) as running:
        await _push(running, add_one, "adder")
        x = np.zeros((limit // 16, 4), np.float32)  # exactly the limit
        async with AsyncInferenceClient(running.address) as client:
            streamed = await client.predict_stream("adder", {"x": x}, cache="bypass")  # the answer comes in chunks
            assert streamed.outputs["y"].shape == x.shape
            with pytest.raises(InvalidArgumentError) as larger:  # refused by the server's check, naming the limit
                await client.predict_stream("adder", {"x": np.zeros((x.shape[0] + 1, 4), np.float32)})
            assert larger.value.reason == "REQUEST_TOO_LARGE"


async def test_predicts_numeric_outputs_are_read_only_and_streamed_ones_writable(
    client: AsyncInferenceClient, inference: RunningInference, add_one: ModelFile, string_model: ModelFile
) -> None:
    await _push(inference, add_one, "adder")
    await _push(inference, string_model, "labeller")
    x = np.ones((2, 4), np.float32)
    assert not (await client.predict("adder", {"x": x}))["y"].flags.writeable
    assert (await client.predict_stream("adder", {"x": x})).outputs["y"].flags.writeable
    text = np.array(["cat", "dog"])
    for outputs in (
        await client.predict("labeller", {"text": text}),
        (await client.predict_stream("labeller", {"text": text})).outputs,
    ):
        label = outputs["label"]
        assert label.dtype == object and label.flags.writeable
        assert all(type(item) is bytes for item in label.tolist())

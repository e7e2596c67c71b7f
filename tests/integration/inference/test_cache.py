"""The prediction cache against a real Redis: entries, TTL, size limit, and Redis going away."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio

from modelforge_inference.cache import CacheUnavailable, LocalTier, PredictionCache, PredictionKey
from modelforge_inference.domain import ResolvedModel, Signature
from modelforge_server import embedded, status
from tests.fixtures.proxy import TcpProxy
from tests.integration.inference.conftest import eventually

MODEL = ResolvedModel("mlp", 2, "0f" * 32, 1234, Signature((), ()))
INPUTS = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
OUTPUTS = {"y": np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32), "label": np.array([1, 0], dtype=np.int64)}


@pytest.fixture
async def cache(client: redis.asyncio.Redis) -> AsyncIterator[PredictionCache]:
    async with PredictionCache(client) as cache:
        yield cache


def key(inputs: dict[str, np.ndarray] = INPUTS, outputs: tuple[str, ...] = ()) -> PredictionKey:
    return PredictionKey.of(MODEL, inputs, outputs)


async def test_miss_then_hit_returns_the_stored_outputs(cache: PredictionCache) -> None:
    assert await cache.get(key()) is None
    assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
    hit = await cache.get(key())
    assert hit is not None and list(hit) == ["y", "label"]
    np.testing.assert_array_equal(hit["y"], OUTPUTS["y"])
    np.testing.assert_array_equal(hit["label"], OUTPUTS["label"])
    assert hit["label"].dtype == np.int64
    counts = cache.counts("mlp", 2)
    assert (counts.hits, counts.misses, counts.stores, counts.errors) == (1, 1, 1, 0)
    assert cache.statistics() == {("mlp", 2): counts}
    assert not cache.degraded


async def test_other_inputs_or_outputs_miss(cache: PredictionCache) -> None:
    await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
    assert await cache.get(key({"x": INPUTS["x"] + 1})) is None
    assert await cache.get(key(outputs=("y",))) is None


async def test_entries_carry_the_ttl_and_expire(cache: PredictionCache, client: redis.asyncio.Redis) -> None:
    await cache.put(key(), OUTPUTS, ttl_seconds=30, max_entry_bytes=1 << 20)
    assert 0 < await client.pttl("modelforge:pred:" + key().hex) <= 30_000

    short = key(outputs=("y",))
    assert await cache.put(short, OUTPUTS, ttl_seconds=0.05, max_entry_bytes=1 << 20)
    await eventually(lambda: absent(client, "modelforge:pred:" + short.hex), "the entry to expire")
    assert await cache.get(short) is None
    assert await cache.get(key()) is not None


async def absent(client: redis.asyncio.Redis, name: str) -> bool:
    return not await client.exists(name)


async def test_entries_over_the_size_limit_are_not_stored(cache: PredictionCache, client: redis.asyncio.Redis) -> None:
    big = {"y": np.zeros(4096, np.float32)}  # 16 KiB
    assert not await cache.put(key(), big, ttl_seconds=60, max_entry_bytes=16 * 1024)
    assert await client.dbsize() == 0
    assert await cache.get(key()) is None
    assert cache.counts("mlp", 2).oversized == 1
    assert await cache.put(key(), big, ttl_seconds=60, max_entry_bytes=17 * 1024)


async def test_undecodable_entry_is_a_miss_and_is_removed(cache: PredictionCache, client: redis.asyncio.Redis) -> None:
    await client.set("modelforge:pred:" + key().hex, b"garbage")
    assert await cache.get(key()) is None
    assert cache.counts("mlp", 2).errors == 1
    assert not await client.exists("modelforge:pred:" + key().hex)


async def test_key_prefix_separates_caches(client: redis.asyncio.Redis) -> None:
    async with PredictionCache(client, key_prefix="a:") as first, PredictionCache(client, key_prefix="b:") as second:
        await first.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
        assert await second.get(key()) is None
        assert await client.exists("a:" + key().hex)


async def test_redis_stopped_and_restarted(tmp_path: Path) -> None:
    """Predictions never see Redis errors: the cache degrades to a no-op, then recovers by itself."""
    port = embedded.free_port()
    url, stop = embedded.start_redis(tmp_path, port)
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        async with PredictionCache(client, operation_timeout=0.5, max_probe_interval=0.2) as cache:
            assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
            assert await cache.get(key()) is not None
            await cache.check()

            await asyncio.to_thread(stop)
            assert await cache.get(key()) is None  # the failing call itself answers a miss
            assert cache.degraded
            assert cache.degraded_reason
            assert await cache.get(key()) is None  # and later ones do not touch Redis
            assert not await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
            with pytest.raises(CacheUnavailable) as caught:
                await cache.check()
            assert status.code_for(caught.value) == grpc.StatusCode.UNAVAILABLE
            counts = cache.counts("mlp", 2)
            assert counts.errors == 1 and counts.skipped == 2

            _, stop = await asyncio.to_thread(embedded.start_redis, tmp_path, port)
            await asyncio.wait_for(cache.wait_recovered(), 30)
            assert not cache.degraded and cache.degraded_reason is None
            await cache.check()
            assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
            hit = await cache.get(key())
            assert hit is not None
            np.testing.assert_array_equal(hit["y"], OUTPUTS["y"])
    finally:
        await client.aclose()
        await asyncio.to_thread(stop)


async def test_after_a_redis_restart_the_cache_keeps_working_and_deletes_what_refreshes_replaced(
    tmp_path: Path,
) -> None:
    port = embedded.free_port()
    url, stop = embedded.start_redis(tmp_path, port)
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    entry = "modelforge:pred:" + key().hex
    try:
        async with PredictionCache(client, operation_timeout=0.5, max_probe_interval=0.2) as cache:
            assert await cache.put(key(), OUTPUTS, ttl_seconds=600, max_entry_bytes=1 << 20)
            others = [key({"x": INPUTS["x"] + i}) for i in range(1, 21)]
            await asyncio.gather(*(cache.get(k) for k in others))  # the pool holds a connection for each

            await asyncio.to_thread(stop)  # Redis restarts, with its data
            assert await cache.get(key()) is None and cache.degraded
            # A refresh while Redis is away stores nothing: the entry it replaces goes once Redis answers.
            cache.put_later(key(), OUTPUTS, ttl_seconds=600, max_entry_bytes=1 << 20, replacing=True)
            _, stop = await asyncio.to_thread(embedded.start_redis, tmp_path, port)
            await asyncio.wait_for(cache.wait_recovered(), 30)
            await cache.flush()
            assert not await client.exists(entry)

            errors = cache.counts("mlp", 2).errors
            await asyncio.gather(*(cache.get(k) for k in others))  # no connection made to the old Redis is used
            assert not cache.degraded
            assert cache.counts("mlp", 2).errors == errors
    finally:
        await client.aclose()
        await asyncio.to_thread(stop)


async def test_cache_starts_degraded_when_redis_is_down_and_recovers(tmp_path: Path) -> None:
    port = embedded.free_port()
    client = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    stop = None
    try:
        async with PredictionCache(client, max_probe_interval=0.2) as cache:
            assert cache.degraded
            assert await cache.get(key()) is None
            _, stop = await asyncio.to_thread(embedded.start_redis, tmp_path, port)
            await asyncio.wait_for(cache.wait_recovered(), 30)
            assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
    finally:
        await client.aclose()
        if stop is not None:
            await asyncio.to_thread(stop)


async def test_a_burst_past_the_connection_pool_skips_the_cache_but_leaves_it_up(redis_url: str) -> None:
    """Every connection of this process's pool in use is no sign of Redis being down: those calls go uncached."""
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=2)
    try:
        async with PredictionCache(client) as cache:
            assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
            answers = await asyncio.gather(*(cache.get(key()) for _ in range(12)))
            assert any(answer is not None for answer in answers) and any(answer is None for answer in answers)
            assert not cache.degraded, cache.degraded_reason
            assert await cache.get(key()) is not None
    finally:
        await client.aclose()


async def test_a_distant_redis_is_used_once_a_probe_has_made_a_connection(redis_url: str) -> None:
    """150 ms each way: a new connection's handshake, several round trips, outlasts a call's 0.5 s, but a call on
    a connection already made does not. The probe makes one (and the pool keeps it), so the cache comes back."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = await TcpProxy.to_address(host, int(port))
    proxy.stall()
    client = redis.asyncio.Redis.from_url(f"redis://{proxy.address}/0", socket_connect_timeout=0.5, socket_timeout=2.0)
    try:
        async with PredictionCache(client, operation_timeout=0.5, max_probe_interval=0.2) as cache:
            assert await cache.get(key()) is None and cache.degraded  # stalled: degraded
            proxy.delay = 0.15
            await proxy.restore()
            await asyncio.wait_for(cache.wait_recovered(), 20)
            assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
            assert await cache.get(key()) is not None
            assert not cache.degraded, cache.degraded_reason
    finally:
        await client.aclose()
        await proxy.close()


@pytest.fixture
async def paused_writes(client: redis.asyncio.Redis) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Makes Redis hold every write command (reads still answer) until the returned function is awaited."""
    await client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")

    async def resume() -> None:
        await client.execute_command("CLIENT", "UNPAUSE")

    try:
        yield resume
    finally:
        await resume()


async def test_background_writes_do_not_wait_for_redis_and_answer_meanwhile(
    cache: PredictionCache, client: redis.asyncio.Redis, paused_writes: Callable[[], Awaitable[None]]
) -> None:
    cache.put_later(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)  # returns at once: nothing awaited

    hit = await cache.get(key())  # the write is held by Redis; the entry answers from memory
    assert hit is not None
    np.testing.assert_array_equal(hit["y"], OUTPUTS["y"])
    assert not await client.exists("modelforge:pred:" + key().hex)

    await paused_writes()
    await cache.flush()
    assert await client.exists("modelforge:pred:" + key().hex)
    assert (cache.counts("mlp", 2).hits, cache.counts("mlp", 2).stores) == (1, 1)
    assert not cache.degraded


async def test_a_lookup_that_misses_in_redis_after_the_same_prediction_was_stored_here_is_a_hit(
    cache: PredictionCache, client: redis.asyncio.Redis
) -> None:
    # Single flight for a request that asked Redis while the run was under way, too late to share it: the run
    # ends and stores its outputs before Redis answers the request's lookup with a miss.
    await client.execute_command("CLIENT", "PAUSE", "300", "ALL")  # every command held for 0.3 s
    late = asyncio.ensure_future(cache.get(key()))
    await asyncio.sleep(0.05)  # its GET is held by Redis
    cache.put_later(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)  # the run's outputs, stored
    hit = await late
    assert hit is not None
    np.testing.assert_array_equal(hit["y"], OUTPUTS["y"])
    assert (cache.counts("mlp", 2).hits, cache.counts("mlp", 2).misses) == (1, 0)
    await cache.flush()


async def test_background_writes_skip_oversized_entries(cache: PredictionCache) -> None:
    cache.put_later(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=16)
    await cache.flush()
    assert await cache.get(key()) is None
    assert cache.counts("mlp", 2).oversized == 1


# -- the in-process tier ----------------------------------------------------------------------------------------


@pytest.fixture
async def tiered(client: redis.asyncio.Redis) -> AsyncIterator[PredictionCache]:
    async with PredictionCache(client, local_bytes=1 << 20) as cache:
        yield cache


async def test_the_local_tier_answers_repeats_without_asking_redis(
    tiered: PredictionCache, client: redis.asyncio.Redis
) -> None:
    await tiered.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
    await client.delete("modelforge:pred:" + key().hex)  # Redis no longer has it; this process still does

    hit = await tiered.get(key())
    assert hit is not None
    np.testing.assert_array_equal(hit["y"], OUTPUTS["y"])
    np.testing.assert_array_equal(hit["label"], OUTPUTS["label"])
    counts = tiered.counts("mlp", 2)
    assert (counts.hits, counts.local_hits, counts.misses) == (1, 1, 0)


async def test_a_redis_hit_is_kept_locally_until_its_redis_entry_expires(client: redis.asyncio.Redis) -> None:
    async with PredictionCache(client) as writer, PredictionCache(client, local_bytes=1 << 20) as reader:
        await writer.put(key(), OUTPUTS, ttl_seconds=0.6, max_entry_bytes=1 << 20)
        assert await reader.get(key()) is not None  # from Redis, with its remaining TTL
        assert await reader.get(key()) is not None  # from the local tier
        assert (reader.counts("mlp", 2).hits, reader.counts("mlp", 2).local_hits) == (2, 1)

        await eventually(lambda: absent(client, "modelforge:pred:" + key().hex), "the Redis entry to expire")
        await asyncio.sleep(0.05)
        assert await reader.get(key()) is None  # expired locally too, and missed in Redis
        assert reader.counts("mlp", 2).misses == 1


async def test_entries_without_expiry_are_kept_locally_without_expiry(
    tiered: PredictionCache, client: redis.asyncio.Redis
) -> None:
    async with PredictionCache(client) as writer:
        await writer.put(key(), OUTPUTS, ttl_seconds=None, max_entry_bytes=1 << 20)
    assert await tiered.get(key()) is not None
    await client.delete("modelforge:pred:" + key().hex)
    assert await tiered.get(key()) is not None
    assert tiered.counts("mlp", 2).local_hits == 1


async def test_the_local_tier_is_off_while_the_cache_is_degraded(tmp_path: Path) -> None:
    port = embedded.free_port()
    url, stop = embedded.start_redis(tmp_path, port)
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        async with PredictionCache(client, max_probe_interval=0.2, local_bytes=1 << 20) as cache:
            assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
            await asyncio.to_thread(stop)
            with pytest.raises(CacheUnavailable):
                await cache.check()
            assert await cache.get(key()) is None  # degraded: the whole cache is off, the local tier included
            assert cache.counts("mlp", 2).local_hits == 0

            _, stop = await asyncio.to_thread(embedded.start_redis, tmp_path, port)
            await asyncio.wait_for(cache.wait_recovered(), 30)
            assert await cache.get(key()) is not None  # the local copy is still valid once Redis answers
            assert cache.counts("mlp", 2).local_hits == 1
    finally:
        await client.aclose()
        await asyncio.to_thread(stop)


def test_the_local_tier_evicts_the_least_recently_used_and_honours_expiry() -> None:
    outputs = {"y": np.zeros(4, np.float32)}
    probe = LocalTier(1 << 20)
    probe.put(b"x", outputs, ttl_seconds=10, size=1000)
    cost = probe.size  # what an entry of 1000 encoded bytes costs, its Python objects included
    assert cost > 1000
    now = [100.0]
    tier = LocalTier(4 * cost, clock=lambda: now[0])
    for name in (b"a", b"b", b"c"):
        tier.put(name, outputs, ttl_seconds=10, size=1000)
    assert tier.get(b"a") is not None  # a is now the most recent; b the least
    tier.put(b"d", outputs, ttl_seconds=10, size=1000)
    tier.put(b"e", outputs, ttl_seconds=10, size=1000)
    assert (tier.get(b"b"), len(tier), tier.size) == (None, 4, 4 * cost)
    assert all(tier.get(name) is not None for name in (b"a", b"c", b"d", b"e"))

    tier.put(b"big", outputs, ttl_seconds=10, size=1001)  # over a quarter of the capacity: not kept
    assert tier.get(b"big") is None
    tier.put(b"gone", outputs, ttl_seconds=0, size=10)  # already expired: not kept
    assert tier.get(b"gone") is None

    now[0] += 10
    assert tier.get(b"a") is None  # expired at its deadline
    assert tier.size == 3 * cost


def test_expired_entries_no_one_asks_for_again_give_their_room_back() -> None:
    now = [0.0]
    tier = LocalTier(1 << 20, clock=lambda: now[0])
    outputs = {"y": np.zeros(4, np.float32)}
    for i in range(100):
        tier.put(b"old%d" % i, outputs, ttl_seconds=10, size=100)
    now[0] = 20.0  # all expired, never read again
    for i in range(100):
        tier.put(b"new%d" % i, outputs, ttl_seconds=10, size=100)
    assert len(tier) == 100  # each put gave back a few of the expired ones at the old end


def _float_entry(i: int) -> tuple[dict[str, np.ndarray], int]:
    """An entry as a Redis hit decodes it: a small array over the entry's bytes."""
    encoded = np.arange(8, dtype=np.float32).tobytes()
    return {"y": np.frombuffer(encoded, np.float32).reshape(1, 8)}, 80


def _string_entry(i: int) -> tuple[dict[str, np.ndarray], int]:
    """Labels as ONNX Runtime returns them: an object array of short str."""
    labels = np.array([f"label-{i}-{j}" for j in range(16)], dtype=object)
    return {"label": labels}, sum(4 + len(s) for s in labels)


def _wide_string_entry(i: int) -> tuple[dict[str, np.ndarray], int]:
    """Text with one character beyond Latin-1: Python stores each of its characters in 4 bytes, not 1."""
    text = np.array([f"{i}-{j}-" + "a" * 1000 + "\N{GRINNING FACE}" for j in range(4)], dtype=object)
    return {"text": text}, sum(4 + len(s.encode()) for s in text)


@pytest.mark.parametrize(
    ("entry", "count"), [(_float_entry, 40_000), (_string_entry, 4_000), (_wide_string_entry, 1_000)]
)
def test_the_local_tier_holds_no_more_memory_than_its_capacity(
    entry: Callable[[int], tuple[dict[str, np.ndarray], int]], count: int
) -> None:
    capacity = 2 << 20
    tier = LocalTier(capacity)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(count):
            outputs, size = entry(i)
            tier.put(i.to_bytes(32, "little"), outputs, 300.0, size)
        held = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert tier.size <= capacity
    assert held <= capacity * 1.1, f"{held} bytes held for a capacity of {capacity}"


async def test_the_in_process_tier_keeps_only_an_entrys_own_rows_of_a_merged_run(client: redis.asyncio.Redis) -> None:
    async with PredictionCache(client, local_bytes=1 << 20) as cache:
        batch = np.arange(64 * 256, dtype=np.float32).reshape(64, 256).copy()  # a merged run's output, 64 KiB
        gone = weakref.ref(batch)
        cache.put_later(key(), {"y": batch[5:6]}, ttl_seconds=60, max_entry_bytes=1 << 20)  # one caller's row
        del batch
        gc.collect()
        assert gone() is None  # the entry holds a copy of its row, not the batch
        hit = await cache.get(key())
        assert hit is not None
        np.testing.assert_array_equal(hit["y"], np.arange(5 * 256, 6 * 256, dtype=np.float32).reshape(1, 256))
        await cache.flush()


async def test_a_refresh_redis_refuses_to_store_removes_the_entry_it_replaces(client: redis.asyncio.Redis) -> None:
    async with PredictionCache(client) as cache:
        assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
        await client.config_set("maxmemory", "1")  # Redis refuses writes (OOM); deletes still go through
        try:
            fresh = {"y": OUTPUTS["y"] * 2, "label": OUTPUTS["label"]}
            cache.put_later(key(), fresh, ttl_seconds=60, max_entry_bytes=1 << 20, replacing=True)
            await cache.flush()
            await cache.flush()  # the removal the failed write started
        finally:
            await client.config_set("maxmemory", "0")
        assert await cache.get(key()) is None  # not the outputs it was to replace


async def test_a_refresh_too_large_to_store_removes_the_entry_it_replaces(client: redis.asyncio.Redis) -> None:
    async with PredictionCache(client, local_bytes=1 << 20) as cache:
        assert await cache.put(key(), OUTPUTS, ttl_seconds=60, max_entry_bytes=1 << 20)
        bigger = {"y": np.zeros((2, 4096), np.float32), "label": OUTPUTS["label"]}

        cache.put_later(key(), bigger, ttl_seconds=60, max_entry_bytes=16 * 1024)  # a miss's answer: kept as it was
        await cache.flush()
        assert await cache.get(key()) is not None

        cache.put_later(key(), bigger, ttl_seconds=60, max_entry_bytes=16 * 1024, replacing=True)  # a refresh
        await cache.flush()
        assert await client.exists("modelforge:pred:" + key().hex) == 0
        assert await cache.get(key()) is None  # not from memory either
        assert cache.counts("mlp", 2).oversized == 2

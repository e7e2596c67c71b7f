"""Health of the inference service: a registry or Redis outage degrades it (each under its own health name) and
leaves it ready: versions already resolved serve on, predictions run uncached."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.oip.v2 import grpc_service_pb2 as oip_pb
from modelforge.oip.v2 import grpc_service_pb2_grpc
from modelforge_inference.__main__ import CACHE_HEALTH_NAME, SERVICE
from modelforge_inference.__main__ import build as build_inference
from modelforge_server import app, embedded
from tests.fixtures.servers import registry_settings_for
from tests.integration.inference.conftest import inference_settings_for
from tests.integration.inference.test_resolver import Registry

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def watch_until(health: health_pb2_grpc.HealthStub, name: str, status: int) -> None:
    """Returns once Health.Watch reports `status` for `name` (the first message is the current status)."""
    call = health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30)
    try:
        async for update in call:
            if update.status == status:
                return
    finally:
        call.cancel()


async def check(health: health_pb2_grpc.HealthStub, name: str) -> int:
    return (await health.Check(health_pb2.HealthCheckRequest(service=name))).status


async def test_readiness_survives_a_registry_or_redis_outage_each_reported_under_its_own_name(
    clean_db: str, tmp_path: Path
):
    redis_port = embedded.free_port()
    _, stop_redis = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis", redis_port)
    registry = Registry(registry_settings_for(clean_db, tmp_path / "registry", grace_seconds=0.5))
    await registry.start()
    settings = inference_settings_for(
        registry.address, tmp_path / "inference", f"redis://127.0.0.1:{redis_port}/0", health_check_seconds=0.1
    )
    try:
        async with AsyncExitStack() as stack:
            server = await build_inference(settings, stack)
            port = server.add_port("127.0.0.1:0")
            await server.start()
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
            health = health_pb2_grpc.HealthStub(channel)
            v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await watch_until(health, "", SERVING)
            assert await check(health, CACHE_HEALTH_NAME) == SERVING
            assert await check(health, "dependency/registry") == SERVING

            await asyncio.to_thread(stop_redis)
            await watch_until(health, CACHE_HEALTH_NAME, NOT_SERVING)
            assert await check(health, "") == SERVING  # the service runs on, uncached
            assert await check(health, SERVICE.full_name) == SERVING
            assert (await v2.ServerReady(oip_pb.ServerReadyRequest())).ready

            await registry.stop()
            await watch_until(health, "dependency/registry", NOT_SERVING)
            # Versions already resolved serve on (tests/integration/inference/test_registry_outage.py).
            assert await check(health, "") == SERVING
            assert await check(health, SERVICE.full_name) == SERVING
            assert await check(health, app.LIVENESS) == SERVING
            assert (await v2.ServerReady(oip_pb.ServerReadyRequest())).ready

            await registry.start()
            _, stop_redis = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis", redis_port)
            await watch_until(health, "dependency/registry", SERVING)
            await watch_until(health, CACHE_HEALTH_NAME, SERVING)
            assert (await v2.ServerReady(oip_pb.ServerReadyRequest())).ready
            exposition = server.metrics.exposition().decode()
            assert 'modelforge_dependency_up{dependency="registry"} 1.0' in exposition
    finally:
        await registry.stop()
        await asyncio.to_thread(stop_redis)

"""The jobs API's readiness follows PostgreSQL, Redis and the inference service; liveness does not."""

from __future__ import annotations

from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge_server import embedded

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
JOBS = "modelforge.jobs.v1.JobService"


async def watch_until(health: health_pb2_grpc.HealthStub, service: str, status: int) -> None:
    """Returns once Health.Watch reports `status` for `service` (the stream's first message is the current one)."""
    call = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
    try:
        async for update in call:
            if update.status == status:
                return
    finally:
        call.cancel()


async def check(health: health_pb2_grpc.HealthStub, service: str) -> int:
    return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_ready_while_every_dependency_answers(jobs_api) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{jobs_api.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("dependency/inference", "dependency/postgresql", "dependency/redis", "", JOBS, "liveness"):
            await watch_until(health, name, SERVING)


async def test_not_ready_without_the_inference_service_but_alive(jobs_settings, start_jobs_api) -> None:
    nowhere = replace(jobs_settings, inference_address=f"127.0.0.1:{embedded.free_port()}")
    async with (
        start_jobs_api(nowhere) as api,
        grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        await watch_until(health, "dependency/inference", NOT_SERVING)
        assert await check(health, "") == NOT_SERVING
        assert await check(health, JOBS) == NOT_SERVING
        assert await check(health, "liveness") == SERVING
        assert await check(health, "dependency/postgresql") == SERVING
        up = api.server.metrics.registry.get_sample_value
        assert up("modelforge_dependency_up", {"dependency": "inference"}) == 0
        assert up("modelforge_dependency_up", {"dependency": "redis"}) == 1

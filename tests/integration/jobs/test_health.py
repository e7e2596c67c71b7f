"""The jobs API's readiness follows PostgreSQL and Redis; the registry and inference are reported beside it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.jobs.v1 import jobs_pb2
from tests.fixtures.proxy import TcpProxy
from tests.integration.jobs.conftest import error_reason, inline_request

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
        names = ("dependency/inference", "dependency/registry", "dependency/postgresql", "dependency/redis")
        for name in (*names, "", JOBS, "liveness"):
            await watch_until(health, name, SERVING)


async def test_ready_without_the_inference_service_it_never_calls(jobs_settings, start_jobs_api, closed_port) -> None:
    # The workers call the inference service; the API only reports it. It used to turn NOT_SERVING and take a
    # replica that could take jobs out of service.
    nowhere = replace(jobs_settings, inference_address=f"127.0.0.1:{closed_port}")
    async with (
        start_jobs_api(nowhere) as api,
        grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        await watch_until(health, "dependency/inference", NOT_SERVING)
        assert await check(health, "") == SERVING
        assert await check(health, JOBS) == SERVING
        assert await check(health, "liveness") == SERVING
        up = api.server.metrics.registry.get_sample_value
        assert up("modelforge_dependency_up", {"dependency": "inference"}) == 0
        assert up("modelforge_dependency_up", {"dependency": "redis"}) == 1


async def test_without_the_registry_submits_fail_and_the_rest_is_served(
    jobs_settings, start_jobs_api, jobs_api, closed_port
) -> None:
    nowhere = replace(jobs_settings, registry_address=f"127.0.0.1:{closed_port}")
    async with (
        start_jobs_api(nowhere) as api,
        grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        await watch_until(health, "dependency/registry", NOT_SERVING)  # it was not watched: SERVING throughout
        assert await check(health, "") == SERVING
        x = np.ones((2, 4), np.float32)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await api.stub.CreateJob(inline_request("add-one", {"x": x}))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(failed.value) == "REGISTRY_UNAVAILABLE"
        assert list((await api.stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs) == []


async def test_a_postgresql_that_stops_answering_makes_calls_unavailable_within_the_database_timeout(
    jobs_settings, start_jobs_api
) -> None:
    # A stalled proxy is PostgreSQL stopped, stuck on its disk or behind a network partition: connections stay
    # open and nothing answers. Calls without a deadline used to wait for as long as it lasted.
    proxy = await TcpProxy.to_postgres(jobs_settings.database_url or "")
    settings = replace(jobs_settings, database_url=proxy.url, database_timeout=1.0)
    try:
        async with (
            start_jobs_api(settings) as api,
            grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            await watch_until(health, "dependency/postgresql", SERVING)
            proxy.stall()
            async with asyncio.timeout(30):  # only so that a regression fails instead of hanging
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await api.stub.ListJobs(jobs_pb2.ListJobsRequest())
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_reason(failed.value) == "DEPENDENCY_UNAVAILABLE"
                assert "database is unavailable" in (failed.value.details() or "")
                await watch_until(health, "dependency/postgresql", NOT_SERVING)
                assert await check(health, "") == NOT_SERVING
            await proxy.restore()
            await watch_until(health, "", SERVING)
            assert list((await api.stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs) == []
    finally:
        await proxy.close()

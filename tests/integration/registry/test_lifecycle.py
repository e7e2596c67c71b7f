"""A restarted registry keeps everything; health follows PostgreSQL; reflection lists the service."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelforge.registry.v1 import registry_pb2 as pb
from tests.fixtures.polling import eventually
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import registry_settings_for, running_registry, upload_model
from tests.integration.registry import pgcontrol
from tests.integration.registry.calls import failure

SERVICE = "modelforge.registry.v1.RegistryService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_restarted_registry_keeps_everything(registry_settings, mlp, add_one) -> None:
    async with running_registry(registry_settings) as first:
        await first.stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="keep", labels={"a": "b"})))
        await upload_model(first.stub, "keep", mlp.data, version_label="1.0")
        await upload_model(first.stub, "keep", add_one.data)
        await first.stub.SetAlias(pb.SetAliasRequest(model="keep", alias="production", version=1))
        await first.stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model="keep", version=2))
        await first.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model="keep", version=2))
        before = (await first.stub.GetModel(pb.GetModelRequest(name="keep"))).model

    async with running_registry(registry_settings) as second:
        after = (await second.stub.GetModel(pb.GetModelRequest(name="keep"))).model
        assert after == before
        resolved = (
            await second.stub.ResolveModelRef(
                pb.ResolveModelRefRequest(ref=pb.ModelRef(name="keep", alias="production"))
            )
        ).model_version
        assert (resolved.version, resolved.version_label, resolved.sha256) == (1, "1.0", mlp.sha256)
        data = b""
        async for message in second.stub.DownloadModelVersion(
            pb.DownloadModelVersionRequest(ref=pb.ModelRef(name="keep", version=1))
        ):
            data += message.chunk
        assert hashlib.sha256(data).hexdigest() == mlp.sha256
        again = await upload_model(second.stub, "keep", add_one.data)
        assert again.version == 3  # version 2 was deleted before the restart; its number stays used


async def test_migrations_apply_once_when_replicas_start_together(registry_settings) -> None:
    async with running_registry(registry_settings) as a, running_registry(registry_settings) as b:
        await a.stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="shared")))
        assert (await b.stub.GetModel(pb.GetModelRequest(name="shared"))).model.name == "shared"


async def test_reflection_lists_the_registry_and_health(registry) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(registry.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in responses:
        names |= {service.name for service in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def next_status(stream) -> int:
    return (await asyncio.wait_for(stream.read(), 60)).status


async def events_until_failure(watch) -> None:
    """Reads a watch stream to its end. Changes committed just before the watch began may still arrive first."""
    while True:
        message = await asyncio.wait_for(watch.read(), 60)
        if message is grpc.aio.EOF:
            return
        assert message.event.model == "durable"


async def test_stopping_ends_open_watches_at_once_rather_than_after_the_grace_period(registry_settings) -> None:
    settings = replace(registry_settings, grace_seconds=600.0)
    async with running_registry(settings) as registry:
        watch = registry.stub.WatchModelEvents(pb.WatchModelEventsRequest())
        assert (await asyncio.wait_for(watch.read(), 30)).event.type == pb.MODEL_EVENT_TYPE_WATCH_STARTED
        metrics = registry.server.metrics.registry
        labels = {"grpc_service": SERVICE, "grpc_method": "WatchModelEvents"}
        assert metrics.get_sample_value("modelforge_rpc_in_flight", labels) == 1

        async with asyncio.timeout(60):  # only so that a regression fails instead of waiting out the grace period
            await registry.server.stop(settings.grace_seconds)
        # stop() returned long before the grace period ended: the watch ended on its own, with UNAVAILABLE, not cut
        # off at the end of the grace period (that would count as CANCELLED). The core may report the call done
        # (and so let stop() return) a moment before the handler's own bookkeeping has run.
        await eventually(lambda: metrics.get_sample_value("modelforge_rpc_in_flight", labels) == 0, "the watch to end")
        assert metrics.get_sample_value("modelforge_rpc_requests_total", {**labels, "grpc_code": "UNAVAILABLE"}) == 1
        assert await watch.code() == grpc.StatusCode.UNAVAILABLE
        code, reason, details = await failure(events_until_failure(watch))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REPLICA_STOPPING")
        assert "watch again" in details
    # Leaving the block stops the server and closes the event hub a second time: both are no-ops now.


async def test_while_postgresql_is_down_health_is_not_serving_and_requests_answer_unavailable_at_once(
    tmp_path: Path, add_one, mlp
) -> None:
    own_pg = tmp_path / "own-pg"
    url = await pgcontrol.run("start", own_pg)
    try:
        settings = registry_settings_for(url, tmp_path / "registry")
        async with running_registry(settings) as registry:
            await upload_model(registry.stub, "durable", add_one.data)
            health = health_pb2_grpc.HealthStub(registry.channel)
            statuses = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert await next_status(statuses) == SERVING
            watch = registry.stub.WatchModelEvents(pb.WatchModelEventsRequest())
            assert (await asyncio.wait_for(watch.read(), 30)).event.type == pb.MODEL_EVENT_TYPE_WATCH_STARTED

            await pgcontrol.run("stop", own_pg)
            assert await next_status(statuses) == NOT_SERVING
            code, _, _ = await failure(events_until_failure(watch))  # events may be missed now: it is told so
            assert code == grpc.StatusCode.UNAVAILABLE
            # Within one health check of the outage the pool knows PostgreSQL is gone: requests answer within a
            # second instead of waiting the pool's 10 s for a connection (a deadline of 5 s would expire first).
            for _ in range(3):
                code, reason, _ = await failure(registry.stub.GetModel(pb.GetModelRequest(name="durable"), timeout=5))
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            files = sorted(p for p in settings.blob_root.rglob("*") if p.is_file())
            code, reason, _ = await failure(upload_model(registry.stub, "durable", mlp.data))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")

            assert await pgcontrol.run("start", own_pg) == url
            assert await next_status(statuses) == SERVING  # without a restart of the registry
            got = await registry.stub.GetModel(pb.GetModelRequest(name="durable"))
            assert got.model.latest_version == 1  # the upload refused during the outage left no version
            assert sorted(p for p in settings.blob_root.rglob("*") if p.is_file()) == files  # nor a file
            statuses.cancel()
    finally:
        await pgcontrol.run("stop", own_pg)


async def test_a_postgresql_that_stops_answering_is_unavailable_within_the_database_timeout(
    clean_db: str, tmp_path: Path, add_one
) -> None:
    # A stalled proxy is PostgreSQL stopped (SIGSTOP), stuck on its disk or behind a network partition: the
    # connections stay open and nothing answers. Calls without a deadline used to wait for as long as it lasted.
    proxy = await TcpProxy.to_postgres(clean_db)
    try:
        settings = registry_settings_for(proxy.url, tmp_path / "registry", database_timeout=1.0)
        async with running_registry(settings) as registry:
            await upload_model(registry.stub, "durable", add_one.data)
            health = health_pb2_grpc.HealthStub(registry.channel)
            statuses = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert await next_status(statuses) == SERVING

            proxy.stall()
            async with asyncio.timeout(30):  # only so that a regression fails instead of hanging
                code, reason, details = await failure(registry.stub.GetModel(pb.GetModelRequest(name="durable")))
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                assert "cannot reach PostgreSQL" in details
                assert await next_status(statuses) == NOT_SERVING
                code, reason, _ = await failure(registry.stub.ListModels(pb.ListModelsRequest()))
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")

            await proxy.restore()
            assert await next_status(statuses) == SERVING
            got = await registry.stub.GetModel(pb.GetModelRequest(name="durable"))
            assert got.model.latest_version == 1
            statuses.cancel()
    finally:
        await proxy.close()


async def test_an_upload_whose_postgresql_stops_answering_mid_transaction_is_unavailable_and_stores_nothing(
    clean_db: str, tmp_path: Path, add_one
) -> None:
    # Storing a version is one transaction around the file's placement, which used to be bounded by nothing: an
    # upload held open by a stalled PostgreSQL waited for as long as the stall lasted.
    proxy = await TcpProxy.to_postgres(clean_db)
    lock = f"modelforge.blob.{add_one.sha256}"
    try:
        settings = registry_settings_for(proxy.url, tmp_path / "registry", database_timeout=1.0)
        async with (
            running_registry(settings) as registry,
            await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as holder,
        ):
            # The file's lock, held beside the registry, keeps the upload's transaction open at a known point.
            await holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock,))
            upload = asyncio.ensure_future(upload_model(registry.stub, "stalled", add_one.data))

            async def waiting() -> bool:
                cursor = await holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return (await cursor.fetchone() or [0])[0] == 1

            await eventually(waiting, "the upload to wait for the file's lock")
            proxy.stall()
            await holder.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock,))
            async with asyncio.timeout(30):  # only so that a regression fails instead of hanging
                code, reason, details = await failure(upload)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert "did not answer within 1 s" in details
            await proxy.restore()
            code, _, _ = await failure(registry.stub.GetModel(pb.GetModelRequest(name="stalled")))
            assert code == grpc.StatusCode.NOT_FOUND  # the transaction was undone, the model's creation with it
            assert [p for p in settings.blob_root.rglob("*") if p.is_file()] == []
    finally:
        await proxy.close()


async def test_database_schema_is_registry(registry, add_one, clean_db) -> None:
    await upload_model(registry.stub, "schema", add_one.data)
    with psycopg.connect(clean_db) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'registry'")}
    assert {"models", "versions", "aliases", "blobs", "schema_migrations"} <= tables

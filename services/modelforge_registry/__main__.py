"""The registry's composition root: `python -m modelforge_registry` serves RegistryService on port 50051."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_registry.blobs import STALE_SECONDS, BlobStore
from modelforge_registry.events import EventHub
from modelforge_registry.registry import ModelRegistry
from modelforge_registry.servicer import RegistryServicer
from modelforge_registry.settings import RegistrySettings
from modelforge_registry.store import RegistryStore
from modelforge_server import app, db, embedded, logs, ports, tasks, telemetry
from modelforge_server.metrics import Metrics
from modelforge_server.settings import command_line, from_env, reported

SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
SERVICE_NAME = "modelforge-registry"
METRICS_PORT = ports.REGISTRY_METRICS_PORT


async def build(settings: RegistrySettings, stack: AsyncExitStack) -> app.Server:
    """Opens what the registry needs on `stack`, migrates its schema and returns its server, not yet bound."""
    if settings.database_url is not None:
        url = settings.database_url
    else:  # the embedded default: a real PostgreSQL from the pgserver wheel, data under data_dir
        url, stop_postgres = await asyncio.to_thread(embedded.start_postgres, settings.data_dir)
        stack.callback(stop_postgres)
    pool = await stack.enter_async_context(db.open_pool(url, operation_timeout=settings.database_timeout))
    await db.migrate(pool, schema="registry", package="modelforge_registry.migrations")
    blobs = BlobStore(settings.blob_root)
    await asyncio.to_thread(blobs.open)
    events = EventHub(url)
    metrics = Metrics()
    registry = ModelRegistry(
        RegistryStore(pool),
        blobs,
        events,
        max_model_bytes=settings.max_model_bytes,
        chunk_bytes=settings.chunk_bytes,
        metrics=metrics,
        runtime_check=settings.runtime_check,
    )
    await registry.sweep_orphans()  # files left by a replica that died mid-upload
    sweeps = asyncio.create_task(registry.sweep_orphans_every(STALE_SECONDS), name="blob-sweeps")
    stack.push_async_callback(tasks.stop, sweeps)
    server = app.build_server(
        [
            app.Api(
                SERVICE,
                RegistryServicer(registry, max_message_bytes=settings.max_message_bytes),
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
            )
        ],
        domain="modelforge.registry",
        settings=settings,
        metrics=metrics,
        text_checked=True,
    )
    server.watch_dependency("postgresql", registry.ping)
    stack.push_async_callback(server.stop, settings.grace_seconds)
    await events.start()
    stack.push_async_callback(events.aclose)
    # On stop, once readiness is NOT_SERVING: open watch streams end at once with UNAVAILABLE (their clients watch
    # another replica) instead of holding the server up for the whole grace period.
    server.before_stop(events.aclose)
    return server


async def run(settings: RegistrySettings, tel: telemetry.Telemetry | None = None) -> None:
    async with AsyncExitStack() as stack:
        server = await build(settings, stack)
        await app.serve(server, settings, telemetry=tel)


def main() -> None:
    command_line(
        "modelforge_registry",
        "The ModelForge registry service: models, versions, aliases and their files.",
        RegistrySettings,
    )
    with reported(SERVICE_NAME):
        settings = from_env(RegistrySettings)
        logs.configure(SERVICE_NAME, settings.log_level)
        # Before the pool and the server exist: tracing, when on, instruments both.
        tel = telemetry.setup(SERVICE_NAME, settings, metrics_port=METRICS_PORT)
        # Before anything opens or logs: a port in use is then the one line the process prints. One taken
        # after this check fails the bind in serve() with the same line, once what was opened is closed.
        app.check_ports(settings, tel)
        app.run(run(settings, tel), settings.event_loop)


if __name__ == "__main__":
    main()

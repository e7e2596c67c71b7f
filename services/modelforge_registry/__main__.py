"""The registry's composition root: `python -m modelforge_registry` serves RegistryService on port 50051."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_registry.blobs import BlobStore
from modelforge_registry.events import EventHub
from modelforge_registry.registry import ModelRegistry
from modelforge_registry.servicer import RegistryServicer
from modelforge_registry.settings import RegistrySettings
from modelforge_registry.store import RegistryStore
from modelforge_server import app, db, embedded
from modelforge_server.settings import from_env

SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]


async def build(settings: RegistrySettings, stack: AsyncExitStack) -> app.Server:
    """Opens what the registry needs on `stack`, migrates its schema and returns its server, not yet bound."""
    if settings.database_url is not None:
        url = settings.database_url
    else:  # the embedded default: a real PostgreSQL from the pgserver wheel, data under data_dir
        url, stop_postgres = await asyncio.to_thread(embedded.start_postgres, settings.data_dir)
        stack.callback(stop_postgres)
    pool = await stack.enter_async_context(db.open_pool(url))
    await db.migrate(pool, schema="registry", package="modelforge_registry.migrations")
    blobs = BlobStore(settings.blob_root)
    await asyncio.to_thread(blobs.open)
    events = EventHub(url)
    registry = ModelRegistry(
        RegistryStore(pool),
        blobs,
        events,
        max_model_bytes=settings.max_model_bytes,
        chunk_bytes=settings.chunk_bytes,
    )
    server = app.build_server(
        [app.Api(SERVICE, RegistryServicer(registry), registry_pb2_grpc.add_RegistryServiceServicer_to_server)],
        domain="modelforge.registry",
        settings=settings,
    )
    server.watch_dependency("postgresql", registry.ping)
    stack.push_async_callback(server.stop, settings.grace_seconds)
    # Closed before the server stops: open watch streams end with UNAVAILABLE rather than holding up shutdown.
    await events.start()
    stack.push_async_callback(events.aclose)
    return server


async def run(settings: RegistrySettings) -> None:
    async with AsyncExitStack() as stack:
        server = await build(settings, stack)
        await app.serve(server, settings)


def main() -> None:
    settings = from_env(RegistrySettings)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()

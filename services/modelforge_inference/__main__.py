"""The inference service's composition root: `python -m modelforge_inference` serves InferenceService and the
Open Inference Protocol (V2) on port 50052."""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import AsyncExitStack

import grpc
import redis.asyncio

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_inference import allocator
from modelforge_inference.cache import PredictionCache
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.files import ModelFileCache
from modelforge_inference.oip import SERVICE as OIP_SERVICE
from modelforge_inference.oip import OipServicer, add_oip_servicer_to_server
from modelforge_inference.registry_client import RegistryClient, RegistryUnavailable
from modelforge_inference.resolver import ModelResolver
from modelforge_inference.servicer import SERVICE, InferenceServicer, add_inference_servicer_to_server
from modelforge_inference.settings import InferenceSettings
from modelforge_inference.shm import SharedMemoryRegions
from modelforge_server import app, embedded, logs, ports, telemetry
from modelforge_server.channels import service_channel
from modelforge_server.metrics import Metrics
from modelforge_server.probes import ServingProbe
from modelforge_server.settings import MiB, command_line, from_env, reported

SERVICE_NAME = "modelforge-inference"
METRICS_PORT = ports.INFERENCE_METRICS_PORT
# Health names of the dependencies (``dependency/<name>``). Neither gates readiness: without the registry, versions
# already resolved keep serving; without Redis, predictions run uncached.
REGISTRY_DEPENDENCY = "registry"
CACHE_DEPENDENCY = "redis"
CACHE_HEALTH_NAME = app.DEPENDENCY_PREFIX + CACHE_DEPENDENCY

log = logging.getLogger("modelforge.inference")


def max_receive_bytes(settings: InferenceSettings) -> int:
    """The server's receive limit: room for a request whose inputs reach MODELFORGE_MAX_REQUEST_BYTES, plus its
    other fields (names, shapes, the ref), so that a request just over that limit gets the engine's
    INVALID_ARGUMENT naming the limit rather than gRPC's RESOURCE_EXHAUSTED. Never below max_message_bytes."""
    headroom = max(1 * MiB, settings.max_request_bytes // 16)
    return max(settings.max_message_bytes, settings.max_request_bytes + headroom)


def registry_channel(settings: InferenceSettings, *, keepalive_seconds: float = 10.0) -> grpc.aio.Channel:
    """The channel to the registry, whose event stream is quiet for long stretches: keepalive notices one that broke
    (``channels.service_channel``)."""
    return service_channel(
        settings.registry_address, max_message_bytes=settings.max_message_bytes, keepalive_seconds=keepalive_seconds
    )


async def build(settings: InferenceSettings, stack: AsyncExitStack) -> app.Server:
    """Opens what the inference service needs on `stack` and returns its server, not yet bound."""
    channel = registry_channel(settings)
    stack.push_async_callback(channel.close)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)

    resolver = ModelResolver(registry)
    await resolver.start()
    stack.push_async_callback(resolver.aclose)
    files = await asyncio.to_thread(ModelFileCache, registry, settings.model_directory, settings.model_cache_bytes)
    stack.callback(files.close)

    redis_url = settings.redis_url
    if redis_url is None:
        embedded_url, stop_redis = await asyncio.to_thread(embedded.start_redis, settings.data_dir)
        stack.callback(stop_redis)
        redis_url = embedded_url
    client = redis.asyncio.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=1.0)
    stack.push_async_callback(client.aclose)
    cache = PredictionCache(client, local_bytes=settings.cache_local_bytes)
    await cache.start()
    stack.push_async_callback(cache.aclose)

    metrics = Metrics()
    engine = InferenceEngine(
        settings, resolver=resolver, files=files, cache=cache, catalog=RegistryClient(registry), metrics=metrics
    )
    await engine.start()
    stack.push_async_callback(engine.aclose)

    regions = SharedMemoryRegions(enabled=settings.allow_client_shm)
    stack.callback(regions.close)
    holder: list[app.Server] = []
    server = app.build_server(
        [
            app.Api(
                SERVICE,
                InferenceServicer(
                    engine, chunk_bytes=settings.chunk_bytes, max_message_bytes=settings.max_message_bytes
                ),
                add_inference_servicer_to_server,
            ),
            app.Api(
                OIP_SERVICE,
                OipServicer(
                    engine,
                    ready=lambda: bool(holder) and holder[0].serving,
                    stream_max_in_flight=settings.stream_max_in_flight,
                    max_message_bytes=settings.max_message_bytes,
                    regions=regions,
                ),
                add_oip_servicer_to_server,
            ),
        ],
        domain="modelforge.inference",
        settings=settings,
        metrics=metrics,
        max_receive_bytes=max_receive_bytes(settings),
    )
    holder.append(server)
    stack.push_async_callback(server.stop, settings.grace_seconds)
    # Both are optional, each with a health name of its own: without the registry, the versions already resolved
    # keep serving (only new refs and new loads fail), and without Redis, predictions run uncached. Readiness
    # stays SERVING through either outage, so that a registry restart does not take every replica out of service.
    interval = settings.health_check_seconds
    registry_health = ServingProbe(
        channel,
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
        functools.partial(RegistryUnavailable, "serve"),
        observer=resolver.registry_answers,
    )
    server.watch_dependency(REGISTRY_DEPENDENCY, registry_health, interval, required=False)
    # The cache logs its own outage and recovery, with what they mean for predictions.
    server.watch_dependency(CACHE_DEPENDENCY, cache.check, interval, required=False, logged=False)
    return server


async def run(settings: InferenceSettings, tel: telemetry.Telemetry | None = None) -> None:
    async with AsyncExitStack() as stack:
        server = await build(settings, stack)
        await app.serve(server, settings, telemetry=tel)


def main() -> None:
    command_line(
        "modelforge_inference",
        "The ModelForge inference service: ONNX Runtime behind ModelForge's API and the Open Inference Protocol.",
        InferenceSettings,
    )
    with reported(SERVICE_NAME):
        settings = from_env(InferenceSettings)
        logs.configure(SERVICE_NAME, settings.log_level)
        allocator.keep_freed_memory()  # before the first large buffer
        # Before anything opens a channel or builds the server: tracing, when on, instruments both.
        tel = telemetry.setup(SERVICE_NAME, settings, metrics_port=METRICS_PORT)
        # Before anything opens or logs: a port in use is then the one line the process prints. One taken
        # after this check fails the bind in serve() with the same line, once what was opened is closed.
        app.check_ports(settings, tel)
        app.run(run(settings, tel), settings.event_loop)


if __name__ == "__main__":
    main()

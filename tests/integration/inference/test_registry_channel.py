"""The inference service's channel to the registry notices a registry that stopped answering, within seconds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_inference.__main__ import registry_channel
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import RunningRegistry
from tests.integration.inference.conftest import inference_settings_for


async def test_a_watch_on_a_registry_that_went_silent_fails_within_its_keepalive(
    registry: RunningRegistry, tmp_path: Path, redis_url: str
) -> None:
    """A registry host gone, or a network cut, answers nothing and closes nothing. The keepalive pings every 10 s
    and gives up 5 s after an unanswered one; gRPC used to wait a minute for the answer, whatever the timeout said."""
    proxy = await TcpProxy.to_address("127.0.0.1", registry.port)
    settings = inference_settings_for(proxy.address, tmp_path, redis_url)
    channel = registry_channel(settings)
    try:
        events = registry_pb2_grpc.RegistryServiceStub(channel).WatchModelEvents(registry_pb2.WatchModelEventsRequest())
        await channel.channel_ready()
        await asyncio.sleep(0.2)  # the stream is open
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            async with asyncio.timeout(40):
                async for _ in events:
                    pass
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 25  # 10 s of quiet, then 5 s for the answer, and some slack
    finally:
        await channel.close()
        await proxy.close()

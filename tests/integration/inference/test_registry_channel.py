"""The inference service's channel to the registry notices a registry that stopped answering, within seconds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_inference.__main__ import registry_channel
from modelforge_registry.settings import RegistrySettings
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import running_registry
from tests.integration.inference.conftest import inference_settings_for


async def test_a_quiet_watch_on_a_registry_that_went_silent_fails_within_its_keepalive(
    registry_settings: RegistrySettings, tmp_path: Path, redis_url: str
) -> None:
    """A registry host gone, or a network cut, answers nothing and closes nothing. The channel pings every
    `keepalive_seconds` of quiet and gives up half as long after an unanswered ping. gRPC used to wait a minute for
    the answer whatever the timeout said, to stop pinging a quiet stream after two pings, and the registry to end
    a connection pinged that often ("too many pings")."""
    async with running_registry(replace(registry_settings, keepalive_seconds=0.5)) as registry:
        proxy = await TcpProxy.to_address("127.0.0.1", registry.port)
        channel = registry_channel(inference_settings_for(proxy.address, tmp_path, redis_url), keepalive_seconds=0.5)
        try:
            events = registry_pb2_grpc.RegistryServiceStub(channel).WatchModelEvents(
                registry_pb2.WatchModelEventsRequest()
            )
            first = await events.read()
            assert first.event.type == registry_pb2.MODEL_EVENT_TYPE_WATCH_STARTED
            quiet = asyncio.ensure_future(events.read())
            done, _ = await asyncio.wait({quiet}, timeout=3.0)  # six pings' worth of quiet, answered
            assert not done, "a quiet watch whose registry answers its pings must stay open"
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                async with asyncio.timeout(30):
                    await quiet
            assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 10  # a ping within 0.5 s, given up on 0.25 s later, and slack
        finally:
            await channel.close()
            await proxy.close()

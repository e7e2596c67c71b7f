"""Fixtures of the inference tests: a registry and an inference server, both built by their production `build`
functions on port 0 and reached over real localhost channels, with real PostgreSQL and Redis.

    inference                    a running inference server (default settings below) with its registry
    start_inference(**settings)  an async context manager for a server with other settings
    upload(running, name, model_file, labels=...)   uploads a fixture model through the registry's API
    eventually(condition, what)  polls a condition until it holds (from tests.fixtures.polling)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio
from google.rpc import error_details_pb2, status_pb2

from modelforge import tensors
from modelforge.inference.v1 import inference_pb2, inference_pb2_grpc
from modelforge.oip.v2 import grpc_service_pb2_grpc
from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_inference.__main__ import build as build_inference
from modelforge_inference.settings import InferenceSettings
from modelforge_server import app
from tests.fixtures.onnx_models import (  # noqa: F401
    ModelFile,
    add_one,
    cnn,
    fixed_shape,
    heavy,
    image_generator,
    mlp,
    multi_io,
    onnx_dir,
    string_model,
)
from tests.fixtures.polling import eventually  # noqa: F401
from tests.fixtures.servers import (  # noqa: F401
    RunningRegistry,
    registry,
    registry_settings,
    registry_stub,
    upload_model,
)

MiB = 1024 * 1024


@dataclass
class RunningInference:
    """An inference server on a free localhost port, its registry, and stubs on real channels to both."""

    settings: InferenceSettings
    server: app.Server
    port: int
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceStub
    oip: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    registry: RunningRegistry

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def registry_stub(self) -> registry_pb2_grpc.RegistryServiceStub:
        return self.registry.stub


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the Redis that the test servers cache in."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def inference_settings_for(
    registry_address: str, data_dir: Path, redis_url: str, **overrides: Any
) -> InferenceSettings:
    """Settings for a test server: two compute threads, small limits, a short grace period."""
    settings = InferenceSettings(
        registry_address=registry_address,
        data_dir=data_dir,
        redis_url=redis_url,
        grace_seconds=1.0,
        compute_threads=2,
        intra_op_threads=1,
        max_request_bytes=16 * MiB,
        max_message_bytes=64 * MiB,
    )
    return replace(settings, **overrides)


@asynccontextmanager
async def running_inference(
    settings: InferenceSettings, registry_server: RunningRegistry, port: int = 0
) -> AsyncIterator[RunningInference]:
    """Builds the service as `python -m modelforge_inference` does, on `port` (0: a free one) and on its private
    address when it has one; stops it on exit."""
    async with AsyncExitStack() as stack:
        server = await build_inference(settings, stack)
        port = server.add_port(f"127.0.0.1:{port}")
        if settings.private_address is not None:
            server.add_port(settings.private_address)
        await server.start()
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_receive_message_length", settings.max_message_bytes)],
            )
        )
        yield RunningInference(
            settings=settings,
            server=server,
            port=port,
            channel=channel,
            stub=inference_pb2_grpc.InferenceServiceStub(channel),
            oip=grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel),
            registry=registry_server,
        )


StartInference = Callable[..., AbstractAsyncContextManager[RunningInference]]


@pytest.fixture
def start_inference(registry: RunningRegistry, redis_url: str, tmp_path: Path) -> StartInference:  # noqa: F811
    """`async with start_inference(max_loaded_models=1) as running:` a server with those settings; `listen_port`
    puts it on a port a first one shares (`share_port=True` for both)."""
    counter = iter(range(1000))

    def start(listen_port: int = 0, **overrides: Any) -> AbstractAsyncContextManager[RunningInference]:
        directory = tmp_path / f"inference-{next(counter)}"
        address = overrides.pop("registry_address", registry.address)
        settings = inference_settings_for(address, directory, redis_url, **overrides)
        return running_inference(settings, registry, listen_port)

    return start


@pytest.fixture
async def inference(start_inference: StartInference) -> AsyncIterator[RunningInference]:
    """A running inference server with the test defaults, and its registry."""
    async with start_inference() as running:
        yield running


# -- helpers -------------------------------------------------------------------------------------------------


async def upload(
    running: RunningInference | RunningRegistry,
    name: str,
    model: ModelFile | bytes,
    *,
    labels: Mapping[str, str] | None = None,
) -> registry_pb2.ModelVersion:
    """Uploads a fixture model (or raw ONNX bytes) as a new version of `name`, creating the model if needed."""
    stub = running.registry_stub if isinstance(running, RunningInference) else running.stub
    data = model.data if isinstance(model, ModelFile) else model
    return await upload_model(stub, name, data, labels=dict(labels or {}))


def ref(name: str, *, version: int | None = None, alias: str | None = None) -> registry_pb2.ModelRef:
    if version is not None:
        return registry_pb2.ModelRef(name=name, version=version)
    if alias is not None:
        return registry_pb2.ModelRef(name=name, alias=alias)
    return registry_pb2.ModelRef(name=name)


def predict_request(
    model: str | registry_pb2.ModelRef, inputs: Mapping[str, np.ndarray], **fields: Any
) -> inference_pb2.PredictRequest:
    target = ref(model) if isinstance(model, str) else model
    return inference_pb2.PredictRequest(
        ref=target, inputs=[tensors.to_tensor(array, name) for name, array in inputs.items()], **fields
    )


def outputs(response: inference_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {tensor.name: tensors.to_numpy(tensor) for tensor in response.outputs}


async def failure(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """Awaits a call that must fail; returns its status code, ErrorInfo reason and details."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), error_reason(exc), exc.details() or ""
    raise AssertionError("the call succeeded but was expected to fail")


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call's google.rpc.Status; an empty one when it has none."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return error_details_pb2.ErrorInfo()


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    return error_info(exc).reason

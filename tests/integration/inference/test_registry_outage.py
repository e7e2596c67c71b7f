"""The inference service with its registry gone or hung: versions it has resolved keep serving, as they were last
resolved; what it never resolved fails UNAVAILABLE, at once; and it is ready for traffic throughout."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge.inference.v1 import inference_pb2
from modelforge.registry.v1 import registry_pb2
from tests.fixtures.polling import eventually
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import upload_model as upload
from tests.integration.inference import test_resolver as harness
from tests.integration.inference.conftest import (  # noqa: F401
    RunningInference,
    StartInference,
    failure,
    outputs,
    predict_request,
    ref,
    start_inference,
)
from tests.integration.inference.test_resolver import Registry, add_one_bytes

restartable_registry = harness.restartable_registry
admin = harness.admin

REFS = (ref("adder"), ref("adder", version=1))
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def health(channel: grpc.aio.Channel, name: str) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))).status


async def is_(channel: grpc.aio.Channel, name: str, status: int) -> bool:
    return await health(channel, name) == status


async def until_watching(running: RunningInference, admin, probe: str = "probe") -> None:
    """Returns once the inference service hears the registry's events, so that what it resolves from then on is
    remembered (a resolution that raced the event stream's start is not: events may have been missed before it),
    and has heard every event before (they come in order). The proof: a version archived in the registry is
    unloaded, which only its event does. `probe`: a model name not used before."""
    await upload(admin, probe, add_one_bytes(4))
    await running.stub.LoadModel(inference_pb2.LoadModelRequest(ref=ref(probe, version=1)))
    await admin.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(model=probe, version=1))

    async def unloaded() -> bool:
        listed = await running.stub.ListLoadedModels(inference_pb2.ListLoadedModelsRequest(model=probe))
        return not listed.loaded_models

    await eventually(unloaded, "the inference service to hear the registry's events")


X = {"x": np.ones((2, 4), np.float32)}


async def adds_one(running: RunningInference, name: registry_pb2.ModelRef | str, timeout: float = 30) -> bool:
    response = await running.stub.Predict(predict_request(name, X), timeout=timeout)
    return outputs(response)["y"].tolist() == [[2.0] * 4] * 2


@contextlib.asynccontextmanager
async def serving_adder(admin, address: str, start_inference: StartInference) -> AsyncIterator[RunningInference]:
    """An inference service on the registry at `address` that hears its events and has resolved and run both REFS
    of "adder"."""
    await upload(admin, "adder", add_one_bytes(4))
    async with start_inference(registry_address=address, health_check_seconds=0.05) as running:
        await until_watching(running, admin)
        for name in REFS:
            assert await adds_one(running, name)
        yield running


async def test_resolved_versions_keep_serving_while_the_registry_is_down(
    admin, restartable_registry: Registry, start_inference: StartInference
) -> None:
    async with serving_adder(admin, restartable_registry.address, start_inference) as running:
        await restartable_registry.stop()
        await eventually(lambda: is_(running.channel, "dependency/registry", NOT_SERVING), "the registry seen down")
        for name in REFS:  # as last resolved
            assert await adds_one(running, name)
        code, reason, _ = await failure(running.stub.Predict(predict_request(ref("adder", alias="production"), X)))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REGISTRY_UNAVAILABLE")  # never resolved
        assert await health(running.channel, "") == SERVING  # still worth sending traffic to

        await restartable_registry.start()
        await eventually(lambda: is_(running.channel, "dependency/registry", SERVING), "the registry seen back")
        assert await adds_one(running, "adder")


async def test_a_version_keeps_serving_as_last_resolved_after_its_model_changed_and_the_registry_went_down(
    admin, restartable_registry: Registry, start_inference: StartInference
) -> None:
    async with serving_adder(admin, restartable_registry.address, start_inference) as running:
        # A change that leaves version 1 what it was: it used to drop the version's last resolution too.
        described = registry_pb2.Model(name="adder", description="adds one")
        await admin.UpdateModel(
            registry_pb2.UpdateModelRequest(
                model=described, update_mask=field_mask_pb2.FieldMask(paths=["description"])
            )
        )
        await until_watching(running, admin, probe="probe-2")  # the update's event came before this one

        await restartable_registry.stop()
        await eventually(lambda: is_(running.channel, "dependency/registry", NOT_SERVING), "the registry seen down")
        assert await adds_one(running, ref("adder", version=1))
        # The newest version may have changed with the model: not answered from what was.
        code, reason, _ = await failure(running.stub.Predict(predict_request("adder", X)))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REGISTRY_UNAVAILABLE")
        await restartable_registry.start()


async def test_with_the_registry_hung_refs_never_resolved_fail_unavailable_at_once(
    admin, restartable_registry: Registry, start_inference: StartInference
) -> None:
    proxy = await TcpProxy.to_address("127.0.0.1", restartable_registry.port)
    try:
        async with serving_adder(admin, proxy.address, start_inference) as running:
            proxy.stall()  # connected, silent: a registry that hangs, where one that is down refuses at once
            await eventually(lambda: is_(running.channel, "dependency/registry", NOT_SERVING), "the registry seen hung")
            for name in REFS:  # as last resolved, without waiting on the registry first
                assert await adds_one(running, name, timeout=5)
            # Never resolved: said at once, where it waited out the caller's deadline for DEADLINE_EXCEEDED.
            never = predict_request(ref("adder", alias="production"), X)
            code, reason, details = await failure(running.stub.Predict(never, timeout=5))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REGISTRY_UNAVAILABLE"), details

            await proxy.restore()
            await eventually(lambda: is_(running.channel, "dependency/registry", SERVING), "the registry seen back")
            await admin.SetAlias(registry_pb2.SetAliasRequest(model="adder", alias="production", version=1))
            assert await adds_one(running, ref("adder", alias="production"))
    finally:
        await proxy.close()

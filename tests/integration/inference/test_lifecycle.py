"""Sessions over real gRPC: single-flight lazy loading, LoadModel/UnloadModel, LRU eviction by count and by memory
budget, requests in flight during unloads, versions ONNX Runtime cannot load, ListLoadedModels paging, reloads when
a version's serving labels change, and an alias moved while traffic flows."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import field_mask_pb2

from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.oip.v2 import grpc_service_pb2 as oip_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_registry.settings import RegistrySettings
from modelforge_server import logs, paging
from tests.fixtures.onnx_models import (
    ModelFile,
    build_custom_op,
    build_heavy,
    build_identity,
    build_slow_load,
    model_bytes,
)
from tests.fixtures.polling import eventually
from tests.fixtures.servers import registry_settings_for
from tests.integration.inference.conftest import (
    RunningInference,
    StartInference,
    failure,
    outputs,
    predict_request,
    ref,
    upload,
)

SLOW = model_bytes(build_heavy(depth=32))
BLOCKER = {"x": np.ones((4096, 512), dtype=np.float32)}
# Four times SLOW's work per request: a request in flight that outlasts a few management calls by seconds.
SLOWER = model_bytes(build_heavy(depth=128))
READY = pb.LOADED_MODEL_STATE_READY
LOADING = pb.LOADED_MODEL_STATE_LOADING
SLOW_LOAD = model_bytes(build_slow_load())  # its load takes most of a second: the tests act while it is LOADING
SLOW_LOAD_INPUT = {"x": np.ones((512, 512), dtype=np.float32)}


def custom_op_model() -> bytes:
    return model_bytes(build_custom_op())


@pytest.fixture
def registry_settings(clean_db: str, tmp_path: Path) -> RegistrySettings:
    """These tests' registry takes models that ONNX Runtime cannot load (MODELFORGE_RUNTIME_CHECK=false), as one
    meant for custom operators: what an inference replica does with such a version is under test here."""
    return registry_settings_for(clean_db, tmp_path / "registry", runtime_check=False)


def counted(running: RunningInference, name: str, **labels: str) -> float:
    return running.server.metrics.registry.get_sample_value(name, labels) or 0.0


async def loaded(running: RunningInference) -> list[tuple[str, int, int]]:
    response = await running.stub.ListLoadedModels(pb.ListLoadedModelsRequest())
    return [(m.model, m.version, m.state) for m in response.loaded_models]


async def relabel(running: RunningInference, model: str, version: int, labels: dict[str, str]) -> None:
    """Replaces the labels of model:version in the registry."""
    await running.registry_stub.UpdateModelVersion(
        registry_pb2.UpdateModelVersionRequest(
            model_version=registry_pb2.ModelVersion(model=model, version=version, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
        )
    )


async def wait_loaded(running: RunningInference, expected: list[tuple[str, int, int]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while (current := await loaded(running)) != expected:
            await asyncio.sleep(0.005)
    assert current == expected


async def test_concurrent_first_requests_load_one_session(
    inference: RunningInference, mlp: ModelFile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelforge.inference.engine")
    await upload(inference, "mlp", mlp)
    feeds = mlp.sample(batch=1)

    responses = await asyncio.gather(*(inference.stub.Predict(predict_request("mlp", feeds)) for _ in range(16)))

    assert {r.version for r in responses} == {1}
    assert [r.getMessage() for r in caplog.records].count(f"loaded mlp:1 in {0:.3f} s") <= 1
    assert sum(1 for r in caplog.records if r.getMessage().startswith("loaded mlp:1 ")) == 1
    assert await loaded(inference) == [("mlp", 1, pb.LOADED_MODEL_STATE_READY)]


async def test_load_model_then_list_and_statistics(inference: RunningInference, add_one: ModelFile) -> None:
    await upload(inference, "add-one", add_one)

    response = await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))

    model = response.loaded_model
    assert (model.model, model.version, model.state) == ("add-one", 1, pb.LOADED_MODEL_STATE_READY)
    assert model.sha256 == add_one.sha256 and model.memory_bytes > 0 and model.in_flight == 0
    await inference.stub.Predict(predict_request("add-one", add_one.sample(batch=3)))
    stats = await inference.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    (entry,) = stats.model_statistics
    assert (entry.model, entry.version, entry.request_count, entry.inference_count) == ("add-one", 1, 1, 3)
    assert stats.cache_status == pb.CACHE_STATUS_OK


async def test_an_unload_is_logged_with_its_reason(
    inference: RunningInference, add_one: ModelFile, caplog: pytest.LogCaptureFixture
) -> None:
    await upload(inference, "add-one", add_one)
    await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))
    with caplog.at_level(logging.INFO, logger="modelforge.inference.engine"):
        await inference.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("add-one")))
    assert "unloaded add-one:1 (requested)" in [r.getMessage() for r in caplog.records]


async def test_unload_of_a_model_not_loaded_is_not_found(inference: RunningInference, add_one: ModelFile) -> None:
    await upload(inference, "add-one", add_one)

    code, reason, _ = await failure(inference.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("add-one"))))

    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_LOADED")


async def test_least_recently_used_version_is_evicted(start_inference: StartInference, add_one: ModelFile) -> None:
    async with start_inference(max_loaded_models=2) as running:
        for name in ("a", "b", "c"):
            await upload(running, name, add_one)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("a")))
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("b")))
        await running.stub.Predict(predict_request("a", add_one.sample()))  # a is now the most recent

        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("c")))

        ready = pb.LOADED_MODEL_STATE_READY
        await wait_loaded(running, [("a", 1, ready), ("c", 1, ready)])


async def test_lifecycle_log_lines_name_their_version_in_the_model_field(
    start_inference: StartInference, add_one: ModelFile
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("modelforge-inference", "INFO", stream=stream)
    try:
        async with start_inference(max_loaded_models=1) as running:
            for name in ("a", "b"):
                await upload(running, name, add_one)
            await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("a")))
            await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("b")))  # evicts a
            await wait_loaded(running, [("b", 1, pb.LOADED_MODEL_STATE_READY)])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    named = {(line["message"].split(" ", 2)[0], line.get("model")) for line in lines if "model" in line}
    # The eviction is logged during b's load, and names a.
    assert {("loaded", "a:1"), ("loaded", "b:1"), ("evicting", "a:1"), ("unloaded", "a:1")} <= named


async def unloading_under_a_request(
    running: RunningInference, model: bytes
) -> tuple[asyncio.Future[pb.PredictResponse], asyncio.Future[pb.UnloadModelResponse]]:
    """Loads `model` as "slow", starts a Predict on it, then an UnloadModel; returns both calls once the version is
    UNLOADING with the Predict still in flight."""
    await upload(running, "slow", model)
    await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("slow")))
    blocker = asyncio.ensure_future(running.stub.Predict(predict_request("slow", BLOCKER)))
    await wait_in_flight(running, "slow", 1)
    unload = asyncio.ensure_future(running.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("slow"))))
    await wait_loaded(running, [("slow", 1, pb.LOADED_MODEL_STATE_UNLOADING)])
    return blocker, unload


async def test_unload_waits_for_requests_in_flight(start_inference: StartInference) -> None:
    async with start_inference(compute_threads=1) as running:
        blocker, unload = await unloading_under_a_request(running, SLOW)
        assert not unload.done()
        result = await blocker  # finishes on the session being unloaded
        assert outputs(result)["y"].shape == (4096, 512)
        response = await unload
        assert [(m.model, m.version) for m in response.unloaded_models] == [("slow", 1)]
        await wait_loaded(running, [])


async def test_a_second_unload_of_a_version_being_unloaded_waits_for_the_same_drain(
    start_inference: StartInference,
) -> None:
    async with start_inference(compute_threads=1) as running:
        blocker, first = await unloading_under_a_request(running, SLOW)
        by_number = asyncio.ensure_future(running.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("slow", version=1))))
        by_name = asyncio.ensure_future(running.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("slow"))))
        assert outputs(await blocker)["y"].shape == (4096, 512)
        for unload in (first, by_number, by_name):
            assert [(m.model, m.version) for m in (await unload).unloaded_models] == [("slow", 1)]
        await wait_loaded(running, [])
        code, reason, _ = await failure(running.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("slow"))))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_LOADED")  # gone now


async def test_an_unload_whose_caller_leaves_still_drains_and_releases_the_version(
    start_inference: StartInference,
) -> None:
    async with start_inference(compute_threads=1) as running:
        blocker, unload = await unloading_under_a_request(running, SLOWER)

        unload.cancel()  # the UnloadModel caller goes away (a deadline, a disconnect)
        with contextlib.suppress(asyncio.CancelledError):
            await unload

        # The drain goes on without it: the version is listed UNLOADING until its request finishes, then goes.
        listed = await loaded(running)
        assert blocker.done() or listed == [("slow", 1, pb.LOADED_MODEL_STATE_UNLOADING)], listed
        assert outputs(await blocker)["y"].shape == (4096, 512)
        await wait_loaded(running, [])


async def test_eviction_waits_for_requests_in_flight(start_inference: StartInference, add_one: ModelFile) -> None:
    async with start_inference(compute_threads=1, max_loaded_models=1) as running:
        await upload(running, "slow", SLOW)
        await upload(running, "add-one", add_one)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("slow")))
        blocker = asyncio.ensure_future(running.stub.Predict(predict_request("slow", BLOCKER)))
        await wait_in_flight(running, "slow", 1)

        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))

        states = await loaded(running)
        assert ("slow", 1, pb.LOADED_MODEL_STATE_UNLOADING) in states or blocker.done()
        assert outputs(await blocker)["y"].shape == (4096, 512)
        await wait_loaded(running, [("add-one", 1, pb.LOADED_MODEL_STATE_READY)])


async def test_eviction_takes_an_idle_version_before_a_busy_one(start_inference: StartInference, add_one: ModelFile):
    async with start_inference(compute_threads=1, max_loaded_models=2) as running:
        await upload(running, "slow", SLOW)
        await upload(running, "idle", add_one)
        await upload(running, "new", add_one)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("slow")))
        blocker = asyncio.ensure_future(running.stub.Predict(predict_request("slow", BLOCKER)))
        await wait_in_flight(running, "slow", 1)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("idle")))  # used after slow, but idle

        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("new")))

        ready = pb.LOADED_MODEL_STATE_READY
        async with asyncio.timeout(20):
            while sorted(await loaded(running)) != [("new", 1, ready), ("slow", 1, ready)]:
                await asyncio.sleep(0.01)
        assert outputs(await blocker)["y"].shape == (4096, 512)


async def test_alias_moved_mid_traffic_serves_the_new_version_from_then_on(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await upload(inference, "flip", add_one)  # version 1: y = x + 1
    await upload(inference, "flip", model_bytes(build_identity()))  # version 2: y = x
    registry = inference.registry_stub
    await registry.SetAlias(registry_pb2.SetAliasRequest(model="flip", alias="production", version=1))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = {1: x + 1, 2: x}
    seen: list[tuple[float, int]] = []  # (when the request started, version that answered)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def traffic() -> None:
        while not stop.is_set():
            started = loop.time()
            response = await inference.stub.Predict(predict_request(ref("flip", alias="production"), {"x": x}))
            np.testing.assert_array_equal(outputs(response)["y"], expected[response.version])
            seen.append((started, response.version))

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    async with asyncio.timeout(20):
        while len(seen) < 20:
            await asyncio.sleep(0.005)
        await registry.SetAlias(registry_pb2.SetAliasRequest(model="flip", alias="production", version=2))
        while not any(version == 2 for _, version in seen):
            await asyncio.sleep(0.005)
        switched = min(started for started, version in seen if version == 2)
        count = len(seen)
        while len(seen) < count + 20:
            await asyncio.sleep(0.005)
    stop.set()
    await asyncio.gather(*workers)

    assert seen[0][1] == 1
    later = [version for started, version in seen if started > switched]
    assert later and set(later) == {2}


async def wait_in_flight(running: RunningInference, model: str, count: int) -> None:
    async with asyncio.timeout(20):
        while True:
            response = await running.stub.ListLoadedModels(pb.ListLoadedModelsRequest(model=model))
            if sum(m.in_flight for m in response.loaded_models) == count:
                return
            await asyncio.sleep(0.005)


async def test_a_memory_budget_smaller_than_two_versions_evicts_the_least_recently_used(
    start_inference: StartInference, mlp: ModelFile
) -> None:
    # A loaded version counts at least its file's size (engine._open), so two never fit in one and a half files;
    # the count limit is far away: only the memory budget can evict.
    async with start_inference(memory_budget_bytes=mlp.size * 3 // 2, max_loaded_models=100) as running:
        await upload(running, "a", mlp)
        await upload(running, "b", mlp)
        first = (await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("a")))).loaded_model
        assert (first.model, first.state) == ("a", READY) and first.memory_bytes >= mlp.size

        second = (await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("b")))).loaded_model

        assert (second.model, second.state) == ("b", READY) and second.memory_bytes >= mlp.size
        await wait_loaded(running, [("b", 1, READY)])
        unloads = "modelforge_inference_model_unloads_total"
        assert counted(running, unloads, model="a", version="1", reason="evicted") == 1
        response = await running.stub.Predict(predict_request("a", mlp.sample(batch=2)))  # loads a again
        assert response.version == 1 and outputs(response)["output"].shape == (2, 8)
        await wait_loaded(running, [("a", 1, READY)])  # and b made room for it
        assert counted(running, unloads, model="b", version="1", reason="evicted") == 1
        loads = "modelforge_inference_model_loads_total"
        assert counted(running, loads, model="a", version="1", result="ok") == 2


async def test_a_version_larger_than_the_whole_memory_budget_is_refused_and_evicts_nothing(
    start_inference: StartInference, mlp: ModelFile, add_one: ModelFile
) -> None:
    async with start_inference(memory_budget_bytes=mlp.size // 2) as running:
        await upload(running, "small", add_one)
        await upload(running, "mlp", mlp)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("small")))

        for call in (
            running.stub.Predict(predict_request("mlp", mlp.sample(batch=1))),
            running.stub.LoadModel(pb.LoadModelRequest(ref=ref("mlp"))),
        ):
            code, reason, details = await failure(call)
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_OVER_MEMORY_BUDGET")
            assert f"mlp:1 is {mlp.size} bytes, more than the memory budget" in details
            assert "MODELFORGE_MEMORY_BUDGET_BYTES" in details
        await wait_loaded(running, [("small", 1, READY)])


async def test_a_version_onnx_runtime_cannot_build_fails_its_load_and_is_listed_as_failed(
    inference: RunningInference, add_one: ModelFile
) -> None:
    version = await upload(inference, "custom-op", custom_op_model())  # accepted: see registry_settings
    assert version.version == 1

    code, reason, details = await failure(inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("custom-op"))))

    # FAILED_PRECONDITION: the request is fine, the stored version cannot run here; retrying it unchanged fails.
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
    prefix = "custom-op:1 could not be loaded: "
    assert details.startswith(prefix + "Fatal error: com.example.custom:FancyOp")
    assert details.endswith("is not a registered function/op")
    assert str(inference.settings.data_dir) not in details  # where the server keeps its files is its own business
    (entry,) = (await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())).loaded_models
    assert (entry.model, entry.version, entry.state) == ("custom-op", 1, pb.LOADED_MODEL_STATE_FAILED)
    assert entry.reason == details.removeprefix(prefix)
    # Within MODELFORGE_LOAD_RETRY_SECONDS (30 s here) predictions fail the same way at once, without a new load.
    loads = "modelforge_inference_model_loads_total"
    for _ in range(3):
        again = await failure(inference.stub.Predict(predict_request("custom-op", add_one.sample())))
        assert again == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED", details)
    assert counted(inference, loads, model="custom-op", version="1", result="failed") == 1
    # LoadModel always tries again.
    retried = await failure(inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("custom-op"))))
    assert retried == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED", details)
    assert counted(inference, loads, model="custom-op", version="1", result="failed") == 2
    assert await loaded(inference) == [("custom-op", 1, pb.LOADED_MODEL_STATE_FAILED)]
    # New labels are a new serving config: the next prediction tries the load under them.
    await relabel(inference, "custom-op", 1, {"modelforge.io/intra-op-threads": "2"})  # the test server runs 1
    # The server hears of the change on the registry's event stream; the first request after that loads again.
    async with asyncio.timeout(30):
        while counted(inference, loads, model="custom-op", version="1", result="failed") < 3:
            relabelled = await failure(inference.stub.Predict(predict_request("custom-op", add_one.sample())))
            assert relabelled == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED", details)
            await asyncio.sleep(0.01)
    await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())  # a round trip for a stray load to count
    assert counted(inference, loads, model="custom-op", version="1", result="failed") == 3  # then held off again


async def test_with_no_retry_delay_every_prediction_tries_a_failed_load_again(
    start_inference: StartInference, add_one: ModelFile
) -> None:
    async with start_inference(load_retry_seconds=0.0) as running:
        await upload(running, "custom-op", custom_op_model())
        for attempt in range(1, 4):
            code, reason, _ = await failure(running.stub.Predict(predict_request("custom-op", add_one.sample())))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED")
            loads = "modelforge_inference_model_loads_total"
            assert counted(running, loads, model="custom-op", version="1", result="failed") == attempt


async def walk(running: RunningInference, page_size: int, model: str = "") -> list[tuple[str, int, int]]:
    """Every entry of ListLoadedModels, page by page."""
    seen: list[tuple[str, int, int]] = []
    token = ""
    while True:
        request = pb.ListLoadedModelsRequest(model=model, page_size=page_size, page_token=token)
        response = await running.stub.ListLoadedModels(request)
        assert len(response.loaded_models) <= page_size
        seen += [(m.model, m.version, m.state) for m in response.loaded_models]
        if not (token := response.next_page_token):
            return seen


async def test_list_loaded_models_pages_walk_every_version_once(
    inference: RunningInference, add_one: ModelFile
) -> None:
    for name in ("p-a", "p-b", "p-c", "p-d"):
        await upload(inference, name, add_one)
    await upload(inference, "p-b", add_one)
    targets = [ref("p-a"), ref("p-b", version=1), ref("p-b", version=2), ref("p-c"), ref("p-d")]
    for target in targets:
        await inference.stub.LoadModel(pb.LoadModelRequest(ref=target))
    expected = [("p-a", 1, READY), ("p-b", 1, READY), ("p-b", 2, READY), ("p-c", 1, READY), ("p-d", 1, READY)]

    everything = await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())

    assert [(m.model, m.version, m.state) for m in everything.loaded_models] == expected
    assert everything.next_page_token == ""
    for size in (1, 2, 4, 5):
        assert await walk(inference, size) == expected
    assert await walk(inference, 1, model="p-b") == expected[1:3]


async def test_a_page_token_the_server_did_not_issue_is_invalid_argument(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await upload(inference, "add-one", add_one)
    await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))  # something to compare tokens with
    tokens = {
        "not base64": "%%%",
        "not a list": base64.urlsafe_b64encode(b'"a string"').decode(),
        "a list of other types": paging.encode([7, "x"], pb.ListLoadedModelsRequest()),
        "a list of nulls": paging.encode([None, None], pb.ListLoadedModelsRequest()),
    }

    answers = {}
    for what, token in tokens.items():
        code, _, details = await failure(inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest(page_token=token)))
        answers[what] = (code, "page_token" in details)

    assert answers == {what: (grpc.StatusCode.INVALID_ARGUMENT, True) for what in tokens}
    code, _, details = await failure(inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest(page_size=-1)))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative, got -1")


async def test_pages_list_a_version_being_unloaded_beside_its_reload(start_inference: StartInference) -> None:
    async with start_inference(compute_threads=1) as running:
        blocker, unload = await unloading_under_a_request(running, SLOWER)
        await running.stub.LoadModel(pb.LoadModelRequest(ref=ref("slow")))  # a new session beside the old one
        both = [("slow", 1, READY), ("slow", 1, pb.LOADED_MODEL_STATE_UNLOADING)]

        before = await loaded(running)
        walked = await walk(running, 1)
        after = await loaded(running)

        assert before == after == both  # the request in flight held the old session all along
        assert walked == both
        # The V2 repository index lists a version once, as Triton does: in the state of its new load.
        index = await running.oip.RepositoryIndex(oip_pb2.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("slow", "1", "READY")]
        assert outputs(await blocker)["y"].shape == (4096, 512)
        await unload


async def test_last_use_time_moves_forward_with_each_prediction(
    inference: RunningInference, add_one: ModelFile
) -> None:
    await upload(inference, "add-one", add_one)
    await inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("add-one")))

    async def last_use() -> int:
        (entry,) = (await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())).loaded_models
        return int(entry.last_use_time.ToNanoseconds())

    stamps = [await last_use()]
    for _ in range(2):
        await inference.stub.Predict(predict_request("add-one", add_one.sample()))
        stamps.append(await last_use())

    assert stamps == sorted(set(stamps)) and len(stamps) == 3
    assert await last_use() == stamps[-1]  # listing is not a use


async def test_changed_session_labels_reload_the_version_with_the_new_options(
    inference: RunningInference, add_one: ModelFile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelforge.inference")
    missing = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())
    await upload(inference, "tuned", add_one, labels={"modelforge.io/intra-op-threads": "1"})
    x = add_one.sample(batch=1)
    await inference.stub.Predict(predict_request("tuned", x))
    loads = "modelforge_inference_model_loads_total"
    assert counted(inference, loads, model="tuned", version="1", result="ok") == 1
    labels = {
        "modelforge.io/intra-op-threads": "2",
        "modelforge.io/graph-optimization-level": "basic",
        "modelforge.io/execution-providers": f"{missing},CPUExecutionProvider",
    }

    await relabel(inference, "tuned", 1, labels)

    # The server hears of the change on the registry's event stream; the first request after that reloads.
    async with asyncio.timeout(30):
        while counted(inference, loads, model="tuned", version="1", result="ok") < 2:
            response = await inference.stub.Predict(predict_request("tuned", x))
            np.testing.assert_array_equal(outputs(response)["y"], x["x"] + 1)
            await asyncio.sleep(0.01)
    await wait_loaded(inference, [("tuned", 1, READY)])
    reloads = "modelforge_inference_model_unloads_total"
    assert counted(inference, reloads, model="tuned", version="1", reason="reconfigured") == 1
    # The new session was built from the new labels: its missing provider was asked for, and fell back.
    listed = await inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest())
    assert [list(m.execution_providers) for m in listed.loaded_models] == [["CPUExecutionProvider"]]  # not missing
    warned = [r.getMessage() for r in caplog.records if r.name == "modelforge.inference.sessions"]
    assert len(warned) == 1 and warned[0].startswith(f"execution provider {missing} is not available")
    assert warned[0].endswith("tuned:1 runs on the CPU instead")
    await inference.stub.Predict(predict_request("tuned", x))  # later requests keep the new session
    assert counted(inference, loads, model="tuned", version="1", result="ok") == 2


async def until_loading(running: RunningInference, model: str) -> None:
    await wait_loaded(running, [(model, 1, LOADING)])


async def test_a_version_deleted_while_its_first_request_loads_it_is_not_loaded_again(
    inference: RunningInference,
) -> None:
    await upload(inference, "gone", SLOW_LOAD)
    first = asyncio.ensure_future(inference.stub.Predict(predict_request("gone", SLOW_LOAD_INPUT)))
    await until_loading(inference, "gone")
    # Deleted while ONNX Runtime builds the session, once the file is here: a delete that reaches the registry
    # before the load's download fails that download, and the request, NOT_FOUND.
    downloaded = inference.settings.model_directory / hashlib.sha256(SLOW_LOAD).hexdigest()
    await eventually(downloaded.exists, "the model file in the inference service's file cache")
    await inference.registry_stub.DeleteModel(registry_pb2.DeleteModelRequest(name="gone", force=True))

    # The delete stands: the request waiting for the load is told to retry, and the retry finds nothing.
    assert (await failure(first))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_UNLOADING")
    await wait_loaded(inference, [])
    retried = await failure(inference.stub.Predict(predict_request("gone", SLOW_LOAD_INPUT)))
    assert retried[:2] == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert await loaded(inference) == []


@pytest.mark.parametrize("unload", ["native", "v2"])
@pytest.mark.parametrize("first", ["Predict", "LoadModel"])
async def test_an_unload_while_a_version_loads_stands_and_the_request_waiting_for_the_load_is_told_to_retry(
    inference: RunningInference, first: str, unload: str
) -> None:
    await upload(inference, "s", SLOW_LOAD)
    if first == "Predict":  # the call whose load it is: waiting for it once the version is listed LOADING
        waiting = asyncio.ensure_future(inference.stub.Predict(predict_request("s", SLOW_LOAD_INPUT)))
    else:
        waiting = asyncio.ensure_future(inference.stub.LoadModel(pb.LoadModelRequest(ref=ref("s"))))
    await until_loading(inference, "s")
    if unload == "native":
        await inference.stub.UnloadModel(pb.UnloadModelRequest(ref=ref("s")))  # answers once the load is let go
    else:
        await inference.oip.RepositoryModelUnload(oip_pb2.RepositoryModelUnloadRequest(model_name="s"))
    assert (await failure(waiting))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_UNLOADING")
    await wait_loaded(inference, [])  # not READY again behind the unload's back
    response = await inference.stub.Predict(predict_request("s", SLOW_LOAD_INPUT))  # a new request loads it anew
    assert response.version == 1
    assert await loaded(inference) == [("s", 1, READY)]

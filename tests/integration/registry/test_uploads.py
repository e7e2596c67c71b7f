"""UploadModelVersion: validation, limits, all-or-nothing storage, cancellation and concurrent uploads."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import pytest

from modelforge.common.v1 import tensor_pb2
from modelforge.registry.v1 import registry_pb2 as pb
from modelforge.registry.v1 import registry_pb2_grpc as pb_grpc
from tests.fixtures.onnx_models import build_add_one, build_custom_op, build_sequence_input, model_bytes
from tests.fixtures.polling import eventually
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import MiB, registry_settings_for, running_registry, upload_model, upload_requests
from tests.integration.registry.calls import failure


def blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts]


def staged_files(root: Path) -> list[Path]:
    incoming = root / ".incoming"
    return list(incoming.iterdir()) if incoming.exists() else []


async def assert_nothing_stored(registry, model: str) -> None:
    code, _, _ = await failure(registry.stub.GetModel(pb.GetModelRequest(name=model)))
    assert code == grpc.StatusCode.NOT_FOUND, "the model row was left behind"
    assert blob_files(registry.settings.blob_root) == [], "a blob was left behind"
    assert staged_files(registry.settings.blob_root) == [], "a temporary file was left behind"


async def send(stub, requests):
    async def stream():
        for request in requests:
            yield request

    return await stub.UploadModelVersion(stream())


async def test_upload_stores_the_version_with_signature_and_facts(registry, multi_io) -> None:
    version = await upload_model(
        registry.stub,
        "multi",
        multi_io.data,
        description="two in, two out",
        labels={"stage": "test"},
        version_label="1.0.0",
    )
    assert (version.model, version.version, version.state) == ("multi", 1, pb.VERSION_STATE_READY)
    assert (version.sha256, version.size_bytes) == (multi_io.sha256, multi_io.size)
    assert (version.description, dict(version.labels), version.version_label) == (
        "two in, two out",
        {"stage": "test"},
        "1.0.0",
    )
    inputs = {spec.name: spec for spec in version.signature.inputs}
    assert set(inputs) == {"features", "ids"}
    assert inputs["features"].dtype == tensor_pb2.DATA_TYPE_FLOAT32
    assert list(inputs["features"].shape) == [-1, 4]
    assert list(inputs["features"].dim_names) == ["batch", ""]
    assert inputs["ids"].dtype == tensor_pb2.DATA_TYPE_INT64
    assert [o.name for o in version.signature.outputs] == ["scores", "id_sum"]
    assert version.onnx.ir_version == 8
    assert [(o.domain, o.version) for o in version.onnx.opset_imports] == [("", 17)]
    assert version.onnx.producer_name == "modelforge-tests"
    assert version.onnx.graph_name
    stored = registry.settings.blob_root / multi_io.sha256[:2] / multi_io.sha256
    assert stored.read_bytes() == multi_io.data
    assert staged_files(registry.settings.blob_root) == []
    got = await registry.stub.GetModelVersion(pb.GetModelVersionRequest(model="multi", version=1))
    assert got.model_version == version


async def test_upload_reads_metadata_props(registry_stub) -> None:
    import onnx

    model = build_add_one(width=3)
    onnx.helper.set_model_props(model, {"author": "ml-team", "license": "apache-2.0"})
    version = await upload_model(registry_stub, "props", model_bytes(model))
    assert dict(version.onnx.metadata_props) == {"author": "ml-team", "license": "apache-2.0"}
    assert version.onnx.doc_string == "Adds one."


async def test_same_bytes_are_stored_once(registry, add_one) -> None:
    first = await upload_model(registry.stub, "one", add_one.data)
    second = await upload_model(registry.stub, "two", add_one.data)
    third = await upload_model(registry.stub, "one", add_one.data)
    assert first.sha256 == second.sha256 == third.sha256
    assert third.version == 2
    assert len(blob_files(registry.settings.blob_root)) == 1


async def test_upload_to_unknown_model_without_create_is_not_found(registry, add_one) -> None:
    code, reason, _ = await failure(send(registry.stub, upload_requests("ghost", add_one.data, create_model=False)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    await assert_nothing_stored(registry, "ghost")


@pytest.mark.parametrize(
    ("fixture", "reason"),
    [("not_onnx", "INVALID_ONNX"), ("truncated_onnx", "INVALID_ONNX"), ("external_data_escape", "EXTERNAL_DATA")],
)
async def test_bad_files_are_refused_and_leave_nothing(registry, request, fixture: str, reason: str) -> None:
    bad = request.getfixturevalue(fixture)
    code, got_reason, details = await failure(send(registry.stub, upload_requests("bad", bad.data)))
    assert (code, got_reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert details
    await assert_nothing_stored(registry, "bad")


async def test_a_model_onnx_runtime_cannot_load_is_refused_saying_so_and_leaves_nothing(registry) -> None:
    custom = model_bytes(build_custom_op())  # onnx.checker lets an operator of an unknown domain through
    code, reason, details = await failure(send(registry.stub, upload_requests("custom", custom)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ONNX")
    assert "cannot load it: Fatal error: com.example.custom:FancyOp(-1) is not a registered function/op" in details
    assert "MODELFORGE_RUNTIME_CHECK=false" in details
    assert str(registry.settings.data_dir) not in details  # ONNX Runtime's message names the file; ours does not
    await assert_nothing_stored(registry, "custom")


async def test_a_model_no_request_could_be_served_on_is_refused_saying_so_and_leaves_nothing(registry) -> None:
    code, reason, details = await failure(
        send(registry.stub, upload_requests("seq", model_bytes(build_sequence_input())))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NOT_SERVABLE")
    assert details.startswith("ModelForge cannot serve this model: its input 'items' is no tensor of a type it serves")
    assert "MODELFORGE_RUNTIME_CHECK=false" in details
    await assert_nothing_stored(registry, "seq")


async def test_a_registry_without_the_runtime_check_takes_a_model_meant_for_custom_operators(
    clean_db: str, tmp_path: Path
) -> None:
    async with running_registry(registry_settings_for(clean_db, tmp_path / "registry", runtime_check=False)) as running:
        version = await upload_model(running.stub, "custom", model_bytes(build_custom_op()))
    assert (version.version, version.signature.inputs[0].name) == (1, "x")


async def test_external_data_escaping_the_directory_is_named_as_such(registry_stub, external_data_escape) -> None:
    _, _, details = await failure(send(registry_stub, upload_requests("bad", external_data_escape.data)))
    assert "outside the model's directory" in details
    assert "../../etc/passwd" in details


async def test_external_data_beside_the_model_is_refused(registry, external_data_model) -> None:
    code, reason, details = await failure(send(registry.stub, upload_requests("ext", external_data_model.data)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EXTERNAL_DATA")
    assert "weights.bin" in details
    await assert_nothing_stored(registry, "ext")


async def test_external_data_in_a_models_training_info_is_refused_too(registry) -> None:
    model = build_add_one()
    training = model.training_info.add()
    weights = training.initialization.initializer.add()
    weights.CopyFrom(onnx.numpy_helper.from_array(np.zeros(4, np.float32), "w"))
    onnx.external_data_helper.set_external_data(weights, location="/etc/passwd")
    weights.ClearField("raw_data")
    code, reason, details = await failure(send(registry.stub, upload_requests("trained", model_bytes(model))))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EXTERNAL_DATA")
    assert "/etc/passwd" in details
    await assert_nothing_stored(registry, "trained")


async def test_checksum_mismatch_leaves_no_version(registry, add_one) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    code, reason, _ = await failure(send(registry.stub, upload_requests("sum", add_one.data, sha256=wrong)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH")
    await assert_nothing_stored(registry, "sum")


async def test_size_mismatch_leaves_no_version(registry, add_one) -> None:
    for size in (add_one.size + 1, add_one.size - 1):
        code, reason, _ = await failure(send(registry.stub, upload_requests("size", add_one.data, size_bytes=size)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH")
    await assert_nothing_stored(registry, "size")


async def test_malformed_headers_are_invalid(registry, add_one) -> None:
    stub = registry.stub
    cases = [
        upload_requests("BadName", add_one.data),
        upload_requests("ok", add_one.data, sha256="ABC"),
        upload_requests("ok", add_one.data, size_bytes=0),
        upload_requests("", add_one.data),
        upload_requests("ok", add_one.data)[1:],  # no header
        [*upload_requests("ok", add_one.data), upload_requests("ok", add_one.data)[0]],  # a second header
        [],
    ]
    for requests in cases:
        code, _, _ = await failure(send(stub, requests))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await assert_nothing_stored(registry, "ok")

    code, _, details = await failure(send(stub, upload_requests("ok", b"")))  # an empty file, truthfully announced
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "the file is empty" in details


async def test_announced_size_over_the_limit_is_refused_at_once(registry, add_one) -> None:
    limit = registry.settings.max_model_bytes
    code, reason, details = await failure(
        send(registry.stub, upload_requests("big", add_one.data, size_bytes=limit + 1))
    )
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_TOO_LARGE")
    assert "MODELFORGE_MAX_MODEL_BYTES" in details


async def test_bytes_beyond_the_announced_size_are_refused_before_the_rest_is_read(registry) -> None:
    # The announced size is at most MODELFORGE_MAX_MODEL_BYTES (refused at once otherwise), so this also keeps an
    # upload that understates its size from writing more than the limit.
    chunk = b"\0" * MiB
    header = upload_requests("big", b"x", sha256="0" * 64, size_bytes=MiB)[0]  # understates the size
    assert 2 * MiB < registry.settings.max_model_bytes
    never = asyncio.Event()

    async def stream():
        yield header
        for _ in range(2):
            yield pb.UploadModelVersionRequest(chunk=chunk)
        await never.wait()  # the rest of the file: never sent, so the answer must come without it
        yield pb.UploadModelVersionRequest(chunk=chunk)

    code, reason, details = await failure(asyncio.wait_for(registry.stub.UploadModelVersion(stream()), 30))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH")
    assert f"the header announced {MiB} bytes but {2 * MiB} arrived" in details
    await assert_nothing_stored(registry, "big")


async def test_client_cancelling_mid_upload_leaves_nothing(registry, mlp) -> None:
    requests = upload_requests("cancelled", mlp.data, chunk_bytes=16 * 1024)
    half = len(requests) // 2
    stalled = asyncio.Event()

    async def stream():
        for request in requests[:half]:
            yield request
        await stalled.wait()  # the client stops sending and then cancels
        for request in requests[half:]:
            yield request

    call = registry.stub.UploadModelVersion(stream())
    root = registry.settings.blob_root

    async def staged_bytes_arrived() -> None:
        while not any(p.stat().st_size > 0 for p in staged_files(root)):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(staged_bytes_arrived(), 30)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def staging_emptied() -> None:
        while staged_files(root):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(staging_emptied(), 30)
    await assert_nothing_stored(registry, "cancelled")
    uploads = registry.server.metrics.registry.get_sample_value
    assert uploads("modelforge_registry_uploads_total", {"result": "cancelled"}) == 1
    assert uploads("modelforge_registry_uploads_total", {"result": "ok"}) == 0


async def test_parallel_uploads_get_distinct_consecutive_versions(registry) -> None:
    files = [model_bytes(build_add_one(width=w)) for w in range(1, 9)]
    await registry.stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="par")))
    versions = await asyncio.gather(*(upload_model(registry.stub, "par", data, create_model=False) for data in files))
    assert sorted(v.version for v in versions) == list(range(1, 9))
    by_sha = {v.sha256: v.version for v in versions}
    assert len(by_sha) == 8
    for data in files:  # each number belongs to the file that was uploaded with it
        sha = hashlib.sha256(data).hexdigest()
        got = await registry.stub.GetModelVersion(pb.GetModelVersionRequest(model="par", version=by_sha[sha]))
        assert got.model_version.sha256 == sha


async def test_parallel_uploads_of_the_same_bytes_creating_the_model(registry, add_one) -> None:
    versions = await asyncio.gather(*(upload_model(registry.stub, "same", add_one.data) for _ in range(8)))
    assert sorted(v.version for v in versions) == list(range(1, 9))
    assert len(blob_files(registry.settings.blob_root)) == 1
    model = (await registry.stub.GetModel(pb.GetModelRequest(name="same"))).model
    assert model.latest_version == 8


async def test_a_blob_store_that_cannot_be_written_is_unavailable_and_leaves_nothing(registry, add_one) -> None:
    blobs = registry.settings.blob_root
    shutil.rmtree(blobs / ".incoming")
    (blobs / ".incoming").write_bytes(b"")  # no directory to stage uploads in, as on a broken or read-only disk
    code, reason, details = await failure(send(registry.stub, upload_requests("m", add_one.data)))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "BLOB_STORE_FAILED")
    assert "MODELFORGE_BLOB_DIR" in details
    (blobs / ".incoming").unlink()
    (blobs / ".incoming").mkdir()

    shard = blobs / add_one.sha256[:2]
    shard.write_bytes(b"")  # the file's place in the store cannot be made
    code, reason, _ = await failure(send(registry.stub, upload_requests("m", add_one.data)))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "BLOB_STORE_FAILED")
    shard.unlink()
    await assert_nothing_stored(registry, "m")
    assert (await upload_model(registry.stub, "m", add_one.data)).version == 1  # the disk mended, uploads work


async def test_uploads_that_create_their_model_never_find_it_missing_while_it_is_deleted(registry, add_one) -> None:
    """An upload asking for its model to be created, racing deletes of that model, creates it again: it used to
    fail NOT_FOUND when the model was deleted between its creation and its version number being taken."""

    async def upload_a_few() -> list[grpc.StatusCode]:
        codes = []
        for _ in range(8):
            try:
                await upload_model(registry.stub, "churn", add_one.data)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        return codes

    async def delete_until(done: asyncio.Event) -> int:
        deletes = 0
        while not done.is_set():
            try:
                await registry.stub.DeleteModel(pb.DeleteModelRequest(name="churn", force=True))
                deletes += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # nothing to delete at that moment
            await asyncio.sleep(0)
        return deletes

    done = asyncio.Event()
    deleter = asyncio.ensure_future(delete_until(done))
    try:
        uploads = await asyncio.gather(*(upload_a_few() for _ in range(6)))
    finally:
        done.set()
        deletes = await deleter
    codes = [code for codes in uploads for code in codes]
    assert deletes > 0
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}, codes  # ABORTED: says to retry
    assert codes.count(grpc.StatusCode.OK) >= len(codes) // 2


async def test_an_upload_from_a_client_that_vanished_is_let_go_once_its_connection_stays_silent(
    clean_db: str, tmp_path: Path, add_one
) -> None:
    """A client whose host or network went away without closing its connection: the server's keepalive pings go
    unanswered and the connection is closed, which ends the upload and removes its staged file. It used to hold
    them for as long as the connection seemed open."""
    settings = registry_settings_for(clean_db, tmp_path / "registry", keepalive_seconds=0.5)
    async with running_registry(settings) as registry:
        proxy = await TcpProxy.to_address("127.0.0.1", registry.port)
        stop_sending = asyncio.Event()

        async def requests():
            header, first, *_ = upload_requests("vanished", add_one.data, chunk_bytes=len(add_one.data) // 2)
            yield header
            yield first
            await stop_sending.wait()

        try:
            async with grpc.aio.insecure_channel(proxy.address) as channel:
                upload = pb_grpc.RegistryServiceStub(channel).UploadModelVersion(requests())
                await eventually(lambda: staged_files(settings.blob_root) != [], "the upload to be staged")
                await asyncio.sleep(2.0)  # quiet for four pings
                assert staged_files(settings.blob_root) != []  # a quiet client that answers is kept
                proxy.stall()  # nothing passes any more, either way, and nothing closes
                await eventually(lambda: staged_files(settings.blob_root) == [], "the upload to be let go", 20)
                upload.cancel()
        finally:
            stop_sending.set()
            await proxy.close()
        code, _, _ = await failure(registry.stub.GetModel(pb.GetModelRequest(name="vanished")))
        assert code == grpc.StatusCode.NOT_FOUND

"""Labels of models and versions are checked on every RPC that sets them; a bad one is named in the error."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from modelforge.registry.v1 import registry_pb2 as pb
from tests.fixtures.servers import upload_model
from tests.integration.registry.calls import failure, reason_of, violated_fields

SERVING = {"modelforge.io/max-batch-size": "8", "modelforge.io/cache": "true", "team": "vision"}
LABELS_MASK = field_mask_pb2.FieldMask(paths=["labels"])


async def refused(call, key: str, field: str) -> None:
    """The call fails with INVALID_ARGUMENT and reason INVALID_LABEL, naming the label and the request field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    exc = caught.value
    assert (exc.code(), reason_of(exc)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_LABEL")
    assert repr(key) in (exc.details() or "")
    assert violated_fields(exc) == [field]


async def test_models_take_kubernetes_style_labels_and_refuse_others(registry_stub) -> None:
    labels = {"team": "vision", "modelforge.io/owner": "vision-team"}  # under the prefix, but no serving label
    created = await registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="labelled", labels=labels)))
    assert dict(created.model.labels) == labels
    for key in ("-starts-with-dash", "Upper.IO/name", "x" * 64, "a/b/c", "/empty-prefix"):
        await refused(
            registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="refused", labels={key: "v"}))),
            key,
            "model.labels",
        )
        await refused(
            registry_stub.UpdateModel(
                pb.UpdateModelRequest(model=pb.Model(name="labelled", labels={key: "v"}), update_mask=LABELS_MASK)
            ),
            key,
            "model.labels",
        )
    await refused(
        registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="refused", labels={"long": "v" * 257}))),
        "long",
        "model.labels",
    )
    code, _, _ = await failure(registry_stub.GetModel(pb.GetModelRequest(name="refused")))
    assert code == grpc.StatusCode.NOT_FOUND
    unchanged = await registry_stub.GetModel(pb.GetModelRequest(name="labelled"))
    assert dict(unchanged.model.labels) == labels


async def test_serving_labels_belong_to_versions_and_a_model_refuses_them(registry_stub) -> None:
    # The inference service reads a version's labels only: on a model they would be stored and do nothing.
    for key, value in SERVING.items():
        if not key.startswith("modelforge.io/"):
            continue
        create = pb.CreateModelRequest(model=pb.Model(name="refused", labels={key: value}))
        await refused(registry_stub.CreateModel(create), key, "model.labels")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry_stub.CreateModel(create)
        assert "set per version: set it on a version (NAME:VERSION or NAME@ALIAS)" in (caught.value.details() or "")
    await registry_stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="plain")))
    update = pb.UpdateModelRequest(
        model=pb.Model(name="plain", labels={"modelforge.io/cache": "true"}), update_mask=LABELS_MASK
    )
    await refused(registry_stub.UpdateModel(update), "modelforge.io/cache", "model.labels")
    assert dict((await registry_stub.GetModel(pb.GetModelRequest(name="plain"))).model.labels) == {}


async def test_versions_take_valid_labels_and_refuse_others(registry, add_one) -> None:
    stub = registry.stub
    version = await upload_model(stub, "versioned", add_one.data, labels=SERVING)
    assert dict(version.labels) == SERVING
    await refused(upload_model(stub, "versioned", add_one.data, labels={"bad key": "v"}), "bad key", "header.labels")
    await refused(
        upload_model(stub, "versioned", add_one.data, labels={"modelforge.io/note": "v" * 300}),
        "modelforge.io/note",
        "header.labels",
    )
    await refused(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(model="versioned", version=1, labels={"ok": "1", "_hidden": "2"}),
                update_mask=LABELS_MASK,
            )
        ),
        "_hidden",
        "model_version.labels",
    )
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="versioned"))
    assert [(v.version, dict(v.labels)) for v in listed.model_versions] == [(1, SERVING)]
    incoming = Path(registry.settings.blob_root) / ".incoming"
    assert list(incoming.iterdir()) == []  # refused before a byte was staged


async def test_serving_labels_take_only_values_the_inference_service_can_serve(registry, add_one) -> None:
    stub = registry.stub
    await upload_model(stub, "served", add_one.data, labels=SERVING)
    bad = {"modelforge.io/max-batch-size": "lots"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload_model(stub, "served", add_one.data, labels=bad)
    assert "takes an integer from 0 to 2147483647, not 'lots'" in (caught.value.details() or "")
    await refused(
        upload_model(stub, "served", add_one.data, labels=bad), "modelforge.io/max-batch-size", "header.labels"
    )
    await refused(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(
                    model="served", version=1, labels={"modelforge.io/graph-optimization-level": "ORT_ENABLE_ALL"}
                ),
                update_mask=LABELS_MASK,
            )
        ),
        "modelforge.io/graph-optimization-level",
        "model_version.labels",
    )
    # Keys under the prefix that are not serving labels belong to other tools and take any value.
    other = {"modelforge.io/owner": "vision-team"}
    version = await upload_model(stub, "served", add_one.data, labels=other)
    assert dict(version.labels) == other
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="served"))
    assert [(v.version, dict(v.labels)) for v in listed.model_versions] == [(2, other), (1, SERVING)]

"""Translates between registry protobuf messages and the registry's domain dataclasses."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from google.protobuf import field_mask_pb2, timestamp_pb2

from modelforge.common.v1 import tensor_pb2
from modelforge.registry.v1 import registry_pb2
from modelforge_registry.domain import (
    Model,
    ModelChanges,
    ModelEvent,
    ModelVersion,
    OnnxInfo,
    Signature,
    TensorSpec,
    UploadHeader,
    VersionChanges,
    VersionState,
)
from modelforge_registry.errors import InvalidUpdateMask
from modelforge_server.errors import InvalidArgument
from modelforge_server.refs import ModelRef

MODEL_MUTABLE = ("description", "labels")
VERSION_MUTABLE = ("description", "labels", "version_label")


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def model_to_proto(model: Model) -> registry_pb2.Model:
    return registry_pb2.Model(
        name=model.name,
        description=model.description,
        labels=model.labels,
        aliases=model.aliases,
        latest_version=model.latest_version,
        create_time=_timestamp(model.create_time),
        update_time=_timestamp(model.update_time),
    )


def _spec_to_proto(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name,
        dtype=tensor_pb2.DataType.Value(f"DATA_TYPE_{spec.dtype}"),
        shape=spec.shape,
        dim_names=spec.dim_names,
    )


def signature_to_proto(signature: Signature) -> registry_pb2.Signature:
    return registry_pb2.Signature(
        inputs=[_spec_to_proto(s) for s in signature.inputs],
        outputs=[_spec_to_proto(s) for s in signature.outputs],
    )


def onnx_to_proto(info: OnnxInfo) -> registry_pb2.OnnxInfo:
    return registry_pb2.OnnxInfo(
        ir_version=info.ir_version,
        opset_imports=[registry_pb2.OperatorSetId(domain=o.domain, version=o.version) for o in info.opset_imports],
        producer_name=info.producer_name,
        producer_version=info.producer_version,
        graph_name=info.graph_name,
        doc_string=info.doc_string,
        metadata_props=info.metadata_props,
    )


def state_to_proto(state: VersionState) -> registry_pb2.VersionState.ValueType:
    return registry_pb2.VersionState.Value(f"VERSION_STATE_{state.value}")


def state_from_proto(state: registry_pb2.VersionState.ValueType) -> VersionState | None:
    """None for UNSPECIFIED (no filter); InvalidArgument for a number that names no state."""
    if state == registry_pb2.VERSION_STATE_UNSPECIFIED:
        return None
    if state not in registry_pb2.VersionState.values():
        known = ", ".join(name for name, number in registry_pb2.VersionState.items() if number)
        raise InvalidArgument(f"state {state} is not a VersionState; use one of {known}", field="state")
    return VersionState(registry_pb2.VersionState.Name(state).removeprefix("VERSION_STATE_"))


def version_to_proto(version: ModelVersion) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        model=version.model,
        version=version.version,
        state=state_to_proto(version.state),
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        signature=signature_to_proto(version.signature),
        onnx=onnx_to_proto(version.onnx),
        description=version.description,
        labels=version.labels,
        version_label=version.version_label,
        aliases=version.aliases,
        create_time=_timestamp(version.create_time),
    )


def ref_from_proto(ref: registry_pb2.ModelRef) -> ModelRef:
    selector = ref.WhichOneof("selector")
    return ModelRef(
        name=ref.name,
        version=ref.version if selector == "version" else None,
        alias=ref.alias if selector == "alias" else None,
    )


def header_from_proto(header: registry_pb2.UploadModelVersionHeader) -> UploadHeader:
    return UploadHeader(
        model=header.model,
        create_model=header.create_model,
        description=header.description,
        labels=dict(header.labels),
        version_label=header.version_label,
        sha256=header.sha256,
        size_bytes=header.size_bytes,
    )


def _mask_paths(mask: field_mask_pb2.FieldMask, allowed: Iterable[str]) -> set[str]:
    allowed = tuple(allowed)
    paths = set(mask.paths)
    if not paths:
        raise InvalidUpdateMask("", allowed)
    if "*" in paths:
        return set(allowed)
    for path in sorted(paths):
        if path not in allowed:
            raise InvalidUpdateMask(path, allowed)
    return paths


def model_changes(model: registry_pb2.Model, mask: field_mask_pb2.FieldMask) -> ModelChanges:
    paths = _mask_paths(mask, MODEL_MUTABLE)
    return ModelChanges(
        description=model.description if "description" in paths else None,
        labels=dict(model.labels) if "labels" in paths else None,
    )


def version_changes(version: registry_pb2.ModelVersion, mask: field_mask_pb2.FieldMask) -> VersionChanges:
    paths = _mask_paths(mask, VERSION_MUTABLE)
    return VersionChanges(
        description=version.description if "description" in paths else None,
        labels=dict(version.labels) if "labels" in paths else None,
        version_label=version.version_label if "version_label" in paths else None,
    )


def event_to_proto(event: ModelEvent) -> registry_pb2.ModelEvent:
    return registry_pb2.ModelEvent(
        type=registry_pb2.ModelEventType.Value(f"MODEL_EVENT_TYPE_{event.type.value}"),
        model=event.model,
        version=event.version,
        alias=event.alias,
        event_time=_timestamp(event.event_time) if event.event_time else None,
    )

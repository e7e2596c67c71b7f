"""Pins the Open Inference Protocol wire contract: names, numbers and types that tritonclient relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from modelforge.oip.v2 import grpc_service_pb2, model_config_pb2

SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]

# (method, request, response, client streaming, server streaming), in declaration order.
METHODS = [
    ("ServerLive", "ServerLiveRequest", "ServerLiveResponse", False, False),
    ("ServerReady", "ServerReadyRequest", "ServerReadyResponse", False, False),
    ("ModelReady", "ModelReadyRequest", "ModelReadyResponse", False, False),
    ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse", False, False),
    ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse", False, False),
    ("ModelInfer", "ModelInferRequest", "ModelInferResponse", False, False),
    ("ModelStreamInfer", "ModelInferRequest", "ModelStreamInferResponse", True, True),
    ("ModelConfig", "ModelConfigRequest", "ModelConfigResponse", False, False),
    ("ModelStatistics", "ModelStatisticsRequest", "ModelStatisticsResponse", False, False),
    ("RepositoryIndex", "RepositoryIndexRequest", "RepositoryIndexResponse", False, False),
    ("RepositoryModelLoad", "RepositoryModelLoadRequest", "RepositoryModelLoadResponse", False, False),
    ("RepositoryModelUnload", "RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse", False, False),
    ("SystemSharedMemoryStatus", "SystemSharedMemoryStatusRequest", "SystemSharedMemoryStatusResponse", False, False),
    (
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryRegisterRequest",
        "SystemSharedMemoryRegisterResponse",
        False,
        False,
    ),
    (
        "SystemSharedMemoryUnregister",
        "SystemSharedMemoryUnregisterRequest",
        "SystemSharedMemoryUnregisterResponse",
        False,
        False,
    ),
    ("CudaSharedMemoryStatus", "CudaSharedMemoryStatusRequest", "CudaSharedMemoryStatusResponse", False, False),
    ("CudaSharedMemoryRegister", "CudaSharedMemoryRegisterRequest", "CudaSharedMemoryRegisterResponse", False, False),
    (
        "CudaSharedMemoryUnregister",
        "CudaSharedMemoryUnregisterRequest",
        "CudaSharedMemoryUnregisterResponse",
        False,
        False,
    ),
    ("TraceSetting", "TraceSettingRequest", "TraceSettingResponse", False, False),
    ("LogSettings", "LogSettingsRequest", "LogSettingsResponse", False, False),
]

# Message full name -> {field: (number, type, repeated, oneof or None)}.
# T_* are FieldDescriptor type constants; maps are repeated messages.
_S, _B, _I64, _U64, _BY, _M = (
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_BYTES,
    FieldDescriptor.TYPE_MESSAGE,
)
FIELDS: dict[str, dict[str, tuple[int, int, bool, str | None]]] = {
    "inference.InferParameter": {
        "bool_param": (1, _B, False, "parameter_choice"),
        "int64_param": (2, _I64, False, "parameter_choice"),
        "string_param": (3, _S, False, "parameter_choice"),
        "double_param": (4, FieldDescriptor.TYPE_DOUBLE, False, "parameter_choice"),
        "uint64_param": (5, _U64, False, "parameter_choice"),
    },
    "inference.InferTensorContents": {
        "bool_contents": (1, _B, True, None),
        "int_contents": (2, FieldDescriptor.TYPE_INT32, True, None),
        "int64_contents": (3, _I64, True, None),
        "uint_contents": (4, FieldDescriptor.TYPE_UINT32, True, None),
        "uint64_contents": (5, _U64, True, None),
        "fp32_contents": (6, FieldDescriptor.TYPE_FLOAT, True, None),
        "fp64_contents": (7, FieldDescriptor.TYPE_DOUBLE, True, None),
        "bytes_contents": (8, _BY, True, None),
    },
    "inference.ModelInferRequest": {
        "model_name": (1, _S, False, None),
        "model_version": (2, _S, False, None),
        "id": (3, _S, False, None),
        "parameters": (4, _M, True, None),
        "inputs": (5, _M, True, None),
        "outputs": (6, _M, True, None),
        "raw_input_contents": (7, _BY, True, None),
    },
    "inference.ModelInferRequest.InferInputTensor": {
        "name": (1, _S, False, None),
        "datatype": (2, _S, False, None),
        "shape": (3, _I64, True, None),
        "parameters": (4, _M, True, None),
        "contents": (5, _M, False, None),
    },
    "inference.ModelInferRequest.InferRequestedOutputTensor": {
        "name": (1, _S, False, None),
        "parameters": (2, _M, True, None),
    },
    "inference.ModelInferResponse": {
        "model_name": (1, _S, False, None),
        "model_version": (2, _S, False, None),
        "id": (3, _S, False, None),
        "parameters": (4, _M, True, None),
        "outputs": (5, _M, True, None),
        "raw_output_contents": (6, _BY, True, None),
    },
    "inference.ModelInferResponse.InferOutputTensor": {
        "name": (1, _S, False, None),
        "datatype": (2, _S, False, None),
        "shape": (3, _I64, True, None),
        "parameters": (4, _M, True, None),
        "contents": (5, _M, False, None),
    },
    "inference.ModelStreamInferResponse": {
        "error_message": (1, _S, False, None),
        "infer_response": (2, _M, False, None),
    },
    "inference.ModelMetadataResponse": {
        "name": (1, _S, False, None),
        "versions": (2, _S, True, None),
        "platform": (3, _S, False, None),
        "inputs": (4, _M, True, None),
        "outputs": (5, _M, True, None),
    },
    "inference.ModelMetadataResponse.TensorMetadata": {
        "name": (1, _S, False, None),
        "datatype": (2, _S, False, None),
        "shape": (3, _I64, True, None),
    },
    "inference.ServerMetadataResponse": {
        "name": (1, _S, False, None),
        "version": (2, _S, False, None),
        "extensions": (3, _S, True, None),
    },
    "inference.StatisticDuration": {"count": (1, _U64, False, None), "ns": (2, _U64, False, None)},
    "inference.ModelStatistics": {
        "name": (1, _S, False, None),
        "version": (2, _S, False, None),
        "last_inference": (3, _U64, False, None),
        "inference_count": (4, _U64, False, None),
        "execution_count": (5, _U64, False, None),
        "inference_stats": (6, _M, False, None),
        "batch_stats": (7, _M, True, None),
        "memory_usage": (8, _M, True, None),
        "response_stats": (9, _M, True, None),
    },
    "inference.RepositoryIndexResponse.ModelIndex": {
        "name": (1, _S, False, None),
        "version": (2, _S, False, None),
        "state": (3, _S, False, None),
        "reason": (4, _S, False, None),
    },
    "inference.RepositoryModelLoadRequest": {
        "repository_name": (1, _S, False, None),
        "model_name": (2, _S, False, None),
        "parameters": (3, _M, True, None),
    },
    "inference.ModelConfig": {
        "name": (1, _S, False, None),
        "platform": (2, _S, False, None),
        "backend": (17, _S, False, None),
        "runtime": (25, _S, False, None),
        "version_policy": (3, _M, False, None),
        "max_batch_size": (4, FieldDescriptor.TYPE_INT32, False, None),
        "input": (5, _M, True, None),
        "output": (6, _M, True, None),
        "dynamic_batching": (11, _M, False, "scheduling_choice"),
        "instance_group": (7, _M, True, None),
        "default_model_filename": (8, _S, False, None),
        "parameters": (14, _M, True, None),
        "model_transaction_policy": (19, _M, False, None),
        "response_cache": (24, _M, False, None),
    },
    "inference.ModelInput": {
        "name": (1, _S, False, None),
        "data_type": (2, FieldDescriptor.TYPE_ENUM, False, None),
        "format": (3, FieldDescriptor.TYPE_ENUM, False, None),
        "dims": (4, _I64, True, None),
        "reshape": (5, _M, False, None),
        "is_shape_tensor": (6, _B, False, None),
        "allow_ragged_batch": (7, _B, False, None),
        "optional": (8, _B, False, None),
        "is_non_linear_format_io": (9, _B, False, None),
    },
    "inference.ModelOutput": {
        "name": (1, _S, False, None),
        "data_type": (2, FieldDescriptor.TYPE_ENUM, False, None),
        "dims": (3, _I64, True, None),
        "reshape": (5, _M, False, None),
        "label_filename": (4, _S, False, None),
        "is_shape_tensor": (6, _B, False, None),
        "is_non_linear_format_io": (7, _B, False, None),
    },
    "inference.ModelDynamicBatching": {
        "preferred_batch_size": (1, FieldDescriptor.TYPE_INT32, True, None),
        "max_queue_delay_microseconds": (2, _U64, False, None),
        "preserve_ordering": (3, _B, False, None),
        "priority_levels": (4, _U64, False, None),
        "default_priority_level": (5, _U64, False, None),
        "default_queue_policy": (6, _M, False, None),
        "priority_queue_policy": (7, _M, True, None),
    },
    "inference.ModelQueuePolicy": {
        "timeout_action": (1, FieldDescriptor.TYPE_ENUM, False, None),
        "default_timeout_microseconds": (2, _U64, False, None),
        "allow_timeout_override": (3, _B, False, None),
        "max_queue_size": (4, FieldDescriptor.TYPE_UINT32, False, None),
    },
    "inference.ModelInstanceGroup": {
        "name": (1, _S, False, None),
        "kind": (4, FieldDescriptor.TYPE_ENUM, False, None),
        "count": (2, FieldDescriptor.TYPE_INT32, False, None),
        "gpus": (3, FieldDescriptor.TYPE_INT32, True, None),
        "profile": (5, _S, True, None),
        "passive": (7, _B, False, None),
        "host_policy": (9, _S, False, None),
    },
}

DATA_TYPES = {
    "TYPE_INVALID": 0,
    "TYPE_BOOL": 1,
    "TYPE_UINT8": 2,
    "TYPE_UINT16": 3,
    "TYPE_UINT32": 4,
    "TYPE_UINT64": 5,
    "TYPE_INT8": 6,
    "TYPE_INT16": 7,
    "TYPE_INT32": 8,
    "TYPE_INT64": 9,
    "TYPE_FP16": 10,
    "TYPE_FP32": 11,
    "TYPE_FP64": 12,
    "TYPE_STRING": 13,
    "TYPE_BF16": 14,
}


def _message(full_name: str) -> Descriptor:
    for file in (grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
        try:
            return file.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise AssertionError(f"{full_name} is missing")


def test_service_full_name_is_the_protocols() -> None:
    assert SERVICE.full_name == "inference.GRPCInferenceService"
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert model_config_pb2.DESCRIPTOR.package == "inference"


def test_service_declares_every_protocol_method_with_its_messages_and_streaming() -> None:
    declared = []
    for method in SERVICE.methods:
        proto = descriptor_pb2.MethodDescriptorProto()
        method.CopyToProto(proto)
        declared.append(
            (
                method.name,
                method.input_type.name,
                method.output_type.name,
                proto.client_streaming,
                proto.server_streaming,
            )
        )
    assert declared == METHODS


@pytest.mark.parametrize("full_name", sorted(FIELDS))
def test_message_fields_keep_their_numbers_and_types(full_name: str) -> None:
    message = _message(full_name)
    declared = {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in message.fields
    }
    assert declared == FIELDS[full_name]


def test_data_type_enum_values_are_the_protocols() -> None:
    values = {v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert values == DATA_TYPES


def test_stream_response_nests_the_unary_response() -> None:
    field = grpc_service_pb2.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"]
    assert field.message_type.full_name == "inference.ModelInferResponse"
    config = grpc_service_pb2.ModelConfigResponse.DESCRIPTOR.fields_by_name["config"]
    assert config.message_type.full_name == "inference.ModelConfig"


# Dumps tritonclient's generated messages as {full name: {field: [number, type, repeated, oneof]}} per module.
# It runs in its own interpreter: tritonclient and ModelForge both register `inference.*` symbols.
_DUMP_TRITON = """
import json
from tritonclient.grpc import model_config_pb2, service_pb2

def walk(message, out):
    out[message.full_name] = {
        f.name: [f.number, f.type, f.is_repeated, f.containing_oneof.name if f.containing_oneof else None]
        for f in message.fields
    }
    for nested in message.nested_types:
        walk(nested, out)

out = {"service": {}, "config": {}}
for key, module in (("service", service_pb2), ("config", model_config_pb2)):
    for message in module.DESCRIPTOR.message_types_by_name.values():
        walk(message, out[key])
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["methods"] = [[m.name, m.input_type.full_name, m.output_type.full_name] for m in service.methods]
print(json.dumps(out))
"""


def _walk(message: Descriptor, out: dict[str, Any]) -> None:
    out[message.full_name] = {
        f.name: [f.number, f.type, f.is_repeated, f.containing_oneof.name if f.containing_oneof else None]
        for f in message.fields
    }
    for nested in message.nested_types:
        _walk(nested, out)


def test_every_declared_field_matches_tritonclients_own_descriptors() -> None:
    # tritonclient is a dev dependency: without it this fails (the child cannot import it) rather than skips.
    dumped = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _DUMP_TRITON], check=True, capture_output=True, text=True, timeout=120
    )
    triton = json.loads(dumped.stdout)
    service: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for out, file in ((service, grpc_service_pb2.DESCRIPTOR), (config, model_config_pb2.DESCRIPTOR)):
        for message in file.message_types_by_name.values():
            _walk(message, out)

    assert [[m.name, m.input_type.full_name, m.output_type.full_name] for m in SERVICE.methods] == triton["methods"]
    # The service file is complete: every message and field, exactly.
    assert service == triton["service"]
    # The model configuration may leave messages and fields out, but what it declares must match.
    for name, fields in config.items():
        assert name in triton["config"], f"{name} is not a protocol message"
        for field, spec in fields.items():
            expected = triton["config"][name].get(field)
            assert spec == expected, f"{name}.{field}: declared {spec}, protocol {expected}"

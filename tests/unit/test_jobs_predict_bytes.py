"""The bytes of the jobs worker's Predict calls: made and read without building whole messages, yet exactly what
protobuf makes and reads."""

from __future__ import annotations

import pytest

from modelforge.common.v1.tensor_pb2 import DataType, Tensor
from modelforge.inference.v1 import inference_pb2
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge.registry.v1 import registry_pb2
from modelforge_jobs import errors
from modelforge_jobs.domain import Priority
from modelforge_jobs.inference_client import outputs_record, predict_request, request_around

F32 = DataType.DATA_TYPE_FLOAT32
TENSORS = [
    Tensor(name="x", dtype=F32, shape=[256, 64], raw_data=bytes(range(256)) * 256),
    Tensor(name="s", dtype=DataType.DATA_TYPE_STRING, shape=[2], string_data=[b"a", b""]),
    Tensor(name="empty", dtype=F32, shape=[0, 3]),
]


@pytest.mark.parametrize("inputs", [TENSORS, TENSORS[:1], []])
@pytest.mark.parametrize("priority", list(Priority))
def test_a_request_is_the_bytes_protobuf_makes(inputs: list[Tensor], priority: Priority) -> None:
    expected = inference_pb2.PredictRequest(
        ref=registry_pb2.ModelRef(name="mlp", version=300),
        inputs=inputs,
        priority={Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}[priority],
        cache_mode=inference_pb2.CACHE_MODE_BYPASS,
    )
    assert predict_request(request_around("mlp", 300, priority), inputs) == expected.SerializeToString()


@pytest.mark.parametrize("outputs", [TENSORS, TENSORS[1:2], []])
def test_a_response_becomes_the_record_of_its_outputs(outputs: list[Tensor]) -> None:
    response = inference_pb2.PredictResponse(
        model="mlp",
        version=2**40,
        sha256="ab" * 32,
        outputs=outputs,
        timings=inference_pb2.Timings(),
        cache_hit=True,
    )
    expected = DatasetRecord(tensors=outputs).SerializeToString()
    record, rows = outputs_record(response.SerializeToString())
    assert record == expected
    assert rows == [(t.name, t.shape[0]) for t in outputs]


def test_the_first_dimension_of_each_output_is_read_from_its_bytes() -> None:
    outputs = [
        Tensor(name="scalar", dtype=F32, raw_data=b"\0" * 4),
        Tensor(name="big", dtype=F32, shape=[300, 2], raw_data=b"\0" * 2400),  # a two-byte varint
        Tensor(name="ü", dtype=F32, shape=[0]),
    ]
    response = inference_pb2.PredictResponse(model="m", outputs=outputs).SerializeToString()
    assert outputs_record(response)[1] == [("scalar", None), ("big", 300), ("ü", 0)]


@pytest.mark.parametrize("cut", [1, 5, 100])
def test_a_truncated_response_is_a_remote_internal_error(cut: int) -> None:
    response = inference_pb2.PredictResponse(model="mlp", outputs=TENSORS).SerializeToString()
    with pytest.raises(errors.RemoteInternal):
        outputs_record(response[:-cut])

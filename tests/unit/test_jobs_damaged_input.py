"""A job's stored input that no longer is what its upload or submit checked raises InputDamaged (DATA_LOSS), naming
the dataset and record, whichever way it is damaged; a dataset file's faults stay InvalidDataset."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from modelforge import tensors
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.datasets import DatasetItems, Items, summarize, write_records
from modelforge_jobs.domain import InputRecord
from modelforge_jobs.errors import DatasetRecordDamaged, InlineInputDamaged, InputDamaged, InvalidDataset
from modelforge_server.status import code_for

X = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)


def body(name: str = "x", start: int = 0, stop: int = 3, dtype: type = np.float32) -> bytes:
    return DatasetRecord(tensors=[tensors.to_tensor(X[start:stop].astype(dtype), name)]).SerializeToString()


async def read_second(second: InputRecord) -> list[object]:
    rows = [InputRecord(0, 0, 3, body()), second]

    async def fetch(start: int, stop: int) -> list[InputRecord]:
        return rows

    infos = summarize(write_records([DatasetRecord.FromString(body())])).tensors  # as the upload found them
    return list(await DatasetItems(fetch, dataset_id="d-1", tensors=infos).read(0, 6))


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (InputRecord(1, 3, 3, body(start=3, stop=6)[:-5]), "its bytes do not parse as a DatasetRecord"),
        (InputRecord(1, 3, 3, body(start=3, stop=5)), "it holds 2 items where its row says 3"),
        (InputRecord(1, 3, 3, body("y", 3, 6)), "its tensors' names, dtypes or item shapes are not the dataset's"),
        (InputRecord(1, 3, 3, body("x", 3, 6, np.float64)), "its tensors' names, dtypes or item shapes are not"),
    ],
    ids=["cut", "item-count", "name", "dtype"],
)
async def test_a_damaged_dataset_record_is_data_loss_naming_the_record(second: InputRecord, why: str) -> None:
    with pytest.raises(DatasetRecordDamaged, match=f"^record 1 of dataset d-1 is damaged .*: {why}") as caught:
        await read_second(second)
    assert caught.value.reason == "INPUT_DAMAGED"
    assert caught.value.metadata == {"dataset": "d-1", "record": "1"}
    assert code_for(caught.value) == grpc.StatusCode.DATA_LOSS
    assert "upload the dataset again" in str(caught.value)


def test_a_damaged_inline_input_is_data_loss_and_a_bad_file_stays_invalid() -> None:
    bad_shape = DatasetRecord.FromString(body())
    bad_shape.tensors[0].shape[0] = 4
    for data in (body()[:-5], bad_shape.SerializeToString()):
        with pytest.raises(InlineInputDamaged, match="inline input is damaged .*; submit the job again") as caught:
            Items.from_bytes(data, delimited=False)
        assert isinstance(caught.value, InputDamaged) and code_for(caught.value) == grpc.StatusCode.DATA_LOSS
    with pytest.raises(InvalidDataset):  # a file being uploaded: the request is at fault
        Items.from_bytes(write_records([DatasetRecord.FromString(body())])[:-5], delimited=True)

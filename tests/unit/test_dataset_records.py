"""The dataset record format: varint-length-prefixed DatasetRecord messages (see DatasetRecord in jobs.proto), checked
in memory and in upload files, stored as rows and read back by item range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import wrappers_pb2

from modelforge import _convert, tensors
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.datasets import (
    DatasetItems,
    DatasetSummary,
    Items,
    describe_record,
    encode_varint,
    file_records,
    read_records,
    scan_file,
    summarize,
    write_records,
)
from modelforge_jobs.domain import InputRecord, TensorInfo
from modelforge_jobs.errors import InvalidDataset, InvalidInput
from modelforge_server.errors import FailedPrecondition, InvalidArgument


def record(**arrays: np.ndarray) -> DatasetRecord:
    return DatasetRecord(tensors=[tensors.to_tensor(a, name) for name, a in arrays.items()])


def x(items: int, start: int = 0) -> np.ndarray:
    return np.arange(start * 4, (start + items) * 4, dtype=np.float32).reshape(items, 4)


def ids(items: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + items, dtype=np.int64)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**21, 2**35 + 7])
def test_lengths_are_protobuf_varints(value: int) -> None:
    # A bytes field 1 of `value` bytes is the tag 0x0a, then the length as protobuf writes it, then the bytes.
    if value <= 2**21:
        wire = wrappers_pb2.BytesValue(value=b"\0" * value).SerializeToString()
        expected = wire[1 : len(wire) - value] if value else b"\0"
        assert encode_varint(value) == expected
    assert len(encode_varint(value)) == max(1, (value.bit_length() + 6) // 7)


def test_known_varints() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"


def test_records_round_trip_with_every_tensor_intact() -> None:
    records = [record(x=x(3), id=ids(3)), record(x=x(5, 3), id=ids(5, 3)), record(x=x(1, 8), id=ids(1, 8))]
    data = write_records(records)
    assert list(read_records(data)) == records
    summary = summarize(data)
    assert summary.item_count == 9 and summary.record_count == 3
    assert summary.tensors == (
        TensorInfo("x", tensors.DataType.DATA_TYPE_FLOAT32, (4,)),
        TensorInfo("id", tensors.DataType.DATA_TYPE_INT64, ()),
    )
    items = Items.from_bytes(data, delimited=True)
    assert items.count == 9
    batch = {t.name: tensors.to_numpy(t) for t in items.batch(2, 6)}
    np.testing.assert_array_equal(batch["x"], x(9)[2:6])
    np.testing.assert_array_equal(batch["id"], ids(9)[2:6])


def test_an_empty_record_list_is_an_empty_file_and_no_dataset() -> None:
    assert write_records([]) == b""
    assert list(read_records(b"")) == []
    with pytest.raises(InvalidDataset, match="holds no records"):
        summarize(b"")


def test_files_the_sdk_writes_read_back_item_for_item() -> None:
    inputs = {"x": x(1000), "id": ids(1000)}
    data = _convert.encode_dataset(inputs, record_bytes=4096)
    summary = summarize(data)
    assert summary.item_count == 1000 and summary.record_count > 1
    items = Items.from_bytes(data, delimited=True)
    for t in items.batch(0, 1000):
        np.testing.assert_array_equal(tensors.to_numpy(t), inputs[t.name])


def test_a_file_cut_inside_a_record_is_invalid() -> None:
    data = write_records([record(x=x(3)), record(x=x(2))])
    with pytest.raises(InvalidDataset, match="claims .* bytes but the file ends first") as caught:
        list(read_records(data[:-1]))
    assert isinstance(caught.value, InvalidArgument) and caught.value.reason == "INVALID_DATASET"
    with pytest.raises(InvalidDataset, match="file ends first"):
        summarize(data[:-5])


def test_a_file_cut_inside_a_length_is_invalid() -> None:
    body = record(x=x(100)).SerializeToString()
    assert len(body) >= 128  # a two-byte length
    data = encode_varint(len(body)) + body
    with pytest.raises(InvalidDataset, match="ends inside a record length"):
        list(read_records(data[:1]))
    first = write_records([record(x=x(1))])
    with pytest.raises(InvalidDataset, match="ends inside a record length"):
        list(read_records(first + data[:1]))  # the first record reads; the second's length is cut


def test_a_length_longer_than_ten_bytes_is_not_a_varint() -> None:
    with pytest.raises(InvalidDataset, match="not a valid varint"):
        list(read_records(b"\xff" * 11 + b"\x00"))


def test_a_body_that_is_not_a_dataset_record_is_invalid() -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1 claiming about 4 GiB
    with pytest.raises(InvalidDataset, match="is not a DatasetRecord"):
        list(read_records(encode_varint(len(garbage)) + garbage))


def test_tensors_with_different_leading_dimensions_are_refused() -> None:
    mismatched = record(x=x(3), id=ids(2))
    with pytest.raises(InvalidDataset, match="'id' has 2 items where the others have 3"):
        summarize(write_records([mismatched]))
    with pytest.raises(InvalidInput, match="'id' has 2 items where the others have 3") as caught:
        describe_record(mismatched.tensors, error=InvalidInput)
    assert caught.value.metadata["input"] == "id"


def test_items_that_hold_no_values_are_refused_naming_the_tensor() -> None:
    # Shape [10**12, 0] in 29 bytes: a job of a trillion items, which a worker would walk out of memory.
    empty = record(x=np.zeros((10**12, 0), dtype=np.float32))
    with pytest.raises(InvalidDataset, match=r"'x': its items, of shape \[0\], hold no values; each item needs"):
        summarize(write_records([empty]))
    with pytest.raises(InvalidInput, match="hold no values") as caught:
        describe_record(record(x=np.zeros((5, 3, 0), dtype=np.float32)).tensors, error=InvalidInput)
    assert caught.value.metadata["input"] == "x"


def test_records_must_agree_with_the_first() -> None:
    other_shape = record(x=np.zeros((2, 5), dtype=np.float32))
    other_dtype = record(x=np.zeros((2, 4), dtype=np.float64))
    other_names = record(y=x(2))
    for odd in (other_shape, other_dtype, other_names):
        with pytest.raises(InvalidDataset, match="record 1 has other names, dtypes or item shapes"):
            summarize(write_records([record(x=x(3)), odd]))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (tensors.to_tensor(np.float32(1.0), "x"), "is a scalar"),
        (tensors.to_tensor(x(0), ""), "needs a name"),
        (tensors.to_tensor(x(2), "x"), "appears twice"),
    ],
)
def test_malformed_tensors_are_refused(tensor, message: str) -> None:
    tensors_ = [tensor, tensor] if message == "appears twice" else [tensor]
    with pytest.raises(InvalidDataset, match=message):
        summarize(write_records([DatasetRecord(tensors=tensors_)]))


def test_data_that_does_not_fill_the_shape_is_refused() -> None:
    short = tensors.to_tensor(x(2), "x")
    short.raw_data = short.raw_data[:-4]
    with pytest.raises(InvalidDataset, match="does not match dtype and shape"):
        summarize(write_records([DatasetRecord(tensors=[short])]))


def test_a_record_without_items_is_refused() -> None:
    with pytest.raises(InvalidDataset, match="record 0 holds no items"):
        summarize(write_records([record(x=x(0))]))


# --- files: what an upload is checked with, one record in memory at a time ------------------------------------


def scanned(tmp_path: Path, data: bytes) -> DatasetSummary:
    path = tmp_path / "upload.partial"
    path.write_bytes(data)
    return scan_file(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (write_records([record(x=x(3)), record(x=x(2))])[:-1], "claims .* bytes but the file ends first"),
        (write_records([record(x=x(1))]) + b"\x96", "ends inside a record length"),
        (b"\xff" * 11 + b"\x00", "not a valid varint"),
        (encode_varint(6) + b"\x0a\xff\xff\xff\xff\x0f", "is not a DatasetRecord"),
        (write_records([record(x=x(3)), record(y=x(2))]), "record 1 has other names, dtypes or item shapes"),
        (write_records([record(x=x(0))]), "record 0 holds no items"),
        (b"", "holds no records"),
    ],
)
def test_a_file_is_refused_for_what_bytes_are_refused_for(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(InvalidDataset, match=message):
        summarize(data)
    with pytest.raises(InvalidDataset, match=message):
        scanned(tmp_path, data)


async def test_a_file_scans_and_reads_back_as_rows_with_their_item_ranges(tmp_path: Path) -> None:
    records = [record(x=x(3)), record(x=x(5, 3)), record(x=x(1, 8))]
    data = write_records(records)
    summary = scanned(tmp_path, data)
    assert summary == DatasetSummary(summarize(data).tensors, 9, 3, (3, 5, 1))
    rows = [r async for r in file_records(tmp_path / "upload.partial", summary.record_items, group_bytes=1)]
    assert [(r.index, r.first_item, r.item_count) for r in rows] == [(0, 0, 3), (1, 3, 5), (2, 8, 1)]
    assert [DatasetRecord.FromString(r.record) for r in rows] == records


async def test_dataset_items_assemble_batches_across_records() -> None:
    whole = x(10)
    rows = [
        InputRecord(i, a, b - a, record(x=whole[a:b]).SerializeToString())
        for i, (a, b) in enumerate([(0, 4), (4, 5), (5, 10)])
    ]

    async def fetch(start: int, stop: int) -> list[InputRecord]:
        return [r for r in rows if r.first_item < stop and r.first_item + r.item_count > start]

    items = DatasetItems(fetch, cached_records=1)
    for start, stop in [(0, 10), (3, 6), (9, 10), (0, 1)]:
        (tensor,) = await items.read(start, stop)
        np.testing.assert_array_equal(tensors.to_numpy(tensor), whole[start:stop])
    rows.clear()  # a dataset deleted under a job
    with pytest.raises(FailedPrecondition, match="no records for items 2 to 3"):
        await DatasetItems(fetch).read(2, 4)


async def test_dataset_items_read_ahead_fetch_once_for_the_batches_that_follow() -> None:
    whole = x(100)
    rows = [
        InputRecord(i, a, 10, record(x=whole[a : a + 10]).SerializeToString()) for i, a in enumerate(range(0, 100, 10))
    ]
    fetched: list[tuple[int, int]] = []

    async def fetch(start: int, stop: int) -> list[InputRecord]:
        fetched.append((start, stop))
        return [r for r in rows if r.first_item < stop and r.first_item + r.item_count > start]

    # A cache of one record still keeps everything the last fetch read.
    items = DatasetItems(fetch, cached_records=1, read_ahead=40)
    for start in range(0, 100, 8):
        (tensor,) = await items.read(start, min(start + 8, 100))
        np.testing.assert_array_equal(tensors.to_numpy(tensor), whole[start : start + 8])
    assert fetched == [(0, 40), (40, 80), (80, 120)]

"""Reading a job's items batch by batch: tensors of any dtype and item shape sliced across records, as sent to
inference."""

from __future__ import annotations

import numpy as np
import pytest

from modelforge import tensors
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.datasets import DatasetItems, Items
from modelforge_jobs.domain import InputRecord
from modelforge_jobs.errors import InvalidDataset


def record(**arrays: np.ndarray) -> DatasetRecord:
    return DatasetRecord(tensors=[tensors.to_tensor(a, name) for name, a in arrays.items()])


async def test_dataset_items_slice_strings_and_multidimensional_items_across_records() -> None:
    images = np.arange(7 * 2 * 3, dtype=np.uint8).reshape(7, 2, 3)
    names = np.array([f"item {i}".encode() for i in range(7)], dtype=object)
    rows = [
        InputRecord(i, a, b - a, record(image=images[a:b], name=names[a:b]).SerializeToString())
        for i, (a, b) in enumerate([(0, 3), (3, 4), (4, 7)])
    ]

    async def fetch(start: int, stop: int) -> list[InputRecord]:
        return [r for r in rows if r.first_item < stop and r.first_item + r.item_count > start]

    items = DatasetItems(fetch, cached_records=1, read_ahead=2)
    for start, stop in [(0, 7), (2, 5), (3, 4), (6, 7)]:
        batch = {t.name: t for t in await items.read(start, stop)}
        assert list(batch["image"].shape) == [stop - start, 2, 3]
        np.testing.assert_array_equal(tensors.to_numpy(batch["image"]), images[start:stop])
        assert list(batch["name"].string_data) == list(names[start:stop])
    whole = Items.from_records([DatasetRecord.FromString(r.record) for r in rows])
    assert whole.count == 7
    assert list(whole.batch(1, 6)[1].string_data) == list(names[1:6])


def test_a_record_whose_data_disagrees_with_its_shape_is_invalid() -> None:
    bad = record(x=np.zeros((3, 4), dtype=np.float32))
    bad.tensors[0].shape[0] = 4
    with pytest.raises(InvalidDataset, match="does not match its dtype and shape"):
        Items.from_records([bad])

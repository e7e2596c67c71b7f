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
from modelforge_jobs.runner import RunnerSettings


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


async def test_records_used_earlier_are_dropped_once_the_cached_bytes_are_exceeded() -> None:
    x = np.arange(4 * 1000, dtype=np.float32).reshape(4, 1000)  # one item per record, 4 kB each
    rows = [InputRecord(i, i, 1, record(x=x[i : i + 1]).SerializeToString()) for i in range(4)]
    fetched: list[tuple[int, int]] = []

    async def fetch(start: int, stop: int) -> list[InputRecord]:
        fetched.append((start, stop))
        return [r for r in rows if r.first_item < stop and r.first_item + r.item_count > start]

    for cached_bytes, refetched in ((1 << 20, False), (len(rows[0].record), True)):
        fetched.clear()
        items = DatasetItems(fetch, cached_records=8, cached_bytes=cached_bytes)
        for start in (0, 1, 0):
            np.testing.assert_array_equal(
                tensors.to_numpy((await items.read(start, start + 1))[0]), x[start : start + 1]
            )
        assert fetched == [(0, 1), (1, 2), (0, 1)][: 3 if refetched else 2], cached_bytes


def test_a_fetch_reads_ahead_whole_batches_within_its_bytes() -> None:
    settings = RunnerSettings(worker_id="w", heartbeat_interval=1.0, stale_after=5.0, read_ahead_bytes=64 << 20)
    assert settings.read_ahead_items(batch_size=256, item_bytes=64) == 16 * 256  # small items: 16 batches
    assert settings.read_ahead_items(batch_size=32, item_bytes=600_000) == (64 << 20) // 600_000  # 111 items
    assert settings.read_ahead_items(batch_size=256, item_bytes=1 << 20) == 256  # never less than one batch


def test_batches_in_flight_are_bounded_by_their_bytes() -> None:
    settings = RunnerSettings(worker_id="w", heartbeat_interval=1.0, stale_after=5.0, in_flight_bytes=64 << 20)
    assert settings.lanes(batch_size=256, item_bytes=256, batches=1000) == 8  # small batches: batch_concurrency
    assert settings.lanes(batch_size=256, item_bytes=256, batches=3) == 3  # no more than the batches left
    assert settings.lanes(batch_size=27, item_bytes=600_000, batches=12) == 4  # 16 MB batches: 64 MiB of them
    assert settings.lanes(batch_size=256, item_bytes=600_000, batches=12) == 2  # two at least, to overlap
    assert settings.lanes(batch_size=256, item_bytes=600_000, batches=1) == 1

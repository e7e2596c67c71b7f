"""The dataset record format, dataset uploads, and reading a job's items batch by batch.

Format (language-neutral, documented in jobs.proto at DatasetRecord): a file is a sequence of records; each record
is its byte length as a base-128 varint (the way protobuf encodes lengths) followed by a serialized
``modelforge.jobs.v1.DatasetRecord``, a list of named ``modelforge.common.v1.Tensor``. Every tensor of a record has
the record's item count as its first dimension; every record carries the same names, dtypes and per-item shapes.
The items of a dataset are the records' items, in order. Job results use the same records, one per batch.

The file form is the wire form only. An upload lands in a temporary file of the API's own (`received`), is checked
and scanned (`scan_file`), and its records are stored in PostgreSQL, one row each with the items it covers
(`file_records`); a worker reads back only the records of the batches it runs (`DatasetItems`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import numpy as np

from modelforge import tensors
from modelforge.common.v1.tensor_pb2 import Tensor
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.domain import InputRecord, TensorInfo
from modelforge_jobs.errors import ChecksumMismatch, InvalidDataset, InvalidInput
from modelforge_server.errors import FailedPrecondition

T = TypeVar("T")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise InvalidDataset(f"the file ends inside a record length at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidDataset(f"a record length at byte {pos} is not a valid varint")


def write_records(records: Sequence[DatasetRecord]) -> bytes:
    """The file form of records: each as its varint length then its bytes."""
    parts: list[bytes] = []
    for record in records:
        body = record.SerializeToString()
        parts += (encode_varint(len(body)), body)
    return b"".join(parts)


def read_records(data: bytes) -> Iterator[DatasetRecord]:
    """Parses a file of length-delimited records; InvalidDataset when it is malformed."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        length, pos = _decode_varint(view, pos)
        if pos + length > len(view):
            raise InvalidDataset(f"a record at byte {pos} claims {length} bytes but the file ends first")
        record = DatasetRecord()
        try:
            # types-protobuf says bytes; the runtime takes any buffer, and a view spares a copy per record.
            record.ParseFromString(view[pos : pos + length])  # type: ignore[arg-type]
        except Exception:
            raise InvalidDataset(f"the record at byte {pos} is not a DatasetRecord") from None
        pos += length
        yield record


def describe_record(
    tensors_: Sequence[Tensor], *, error: type[InvalidInput] | None = None
) -> tuple[list[TensorInfo], int]:
    """The tensor infos and item count of one record; raises when the tensors do not agree."""

    def fail(message: str, **metadata: str) -> Exception:
        return error(message, **metadata) if error is not None else InvalidDataset(message)

    if not tensors_:
        raise fail("the input has no tensors; give one tensor per model input")
    infos: list[TensorInfo] = []
    items: int | None = None
    seen: set[str] = set()
    for tensor in tensors_:
        if not tensor.name:
            raise fail("every tensor needs a name (the model input it feeds)")
        if tensor.name in seen:
            raise fail(f"tensor {tensor.name!r} appears twice", input=tensor.name)
        seen.add(tensor.name)
        if len(tensor.shape) < 1:
            raise fail(
                f"tensor {tensor.name!r} is a scalar; its first dimension must count the items", input=tensor.name
            )
        try:
            expected = tensors.element_count(tensor.shape)
            if tensor.dtype == tensors.DataType.DATA_TYPE_STRING:
                ok = len(tensor.string_data) == expected
            else:
                ok = len(tensor.raw_data) == expected * tensors.itemsize(tensor.dtype)
        except ValueError as exc:
            raise fail(f"tensor {tensor.name!r}: {exc}", input=tensor.name) from None
        if not ok:
            raise fail(f"tensor {tensor.name!r}: its data does not match dtype and shape {list(tensor.shape)}")
        count = int(tensor.shape[0])
        if items is None:
            items = count
        elif count != items:
            raise fail(f"tensor {tensor.name!r} has {count} items where the others have {items}", input=tensor.name)
        infos.append(TensorInfo(tensor.name, int(tensor.dtype), tuple(int(d) for d in tensor.shape[1:])))
    return infos, items or 0


@dataclass(frozen=True)
class DatasetSummary:
    tensors: tuple[TensorInfo, ...]
    item_count: int
    record_count: int
    record_items: tuple[int, ...] = ()  # the item count of each record, in order


def _summarize(records: Iterable[DatasetRecord]) -> DatasetSummary:
    first: list[TensorInfo] | None = None
    counts: list[int] = []
    for record in records:
        infos, count = describe_record(record.tensors)
        if count == 0:
            raise InvalidDataset(f"record {len(counts)} holds no items")
        if first is None:
            first = infos
        elif sorted(infos, key=lambda i: i.name) != sorted(first, key=lambda i: i.name):
            raise InvalidDataset(f"record {len(counts)} has other names, dtypes or item shapes than record 0")
        counts.append(count)
    if first is None:
        raise InvalidDataset("it holds no records")
    return DatasetSummary(tuple(first), sum(counts), len(counts), tuple(counts))


def summarize(data: bytes) -> DatasetSummary:
    """Checks that every record parses and agrees with the first; CPU-bound, run it in a thread."""
    return _summarize(read_records(data))


def _read_varint(file: IO[bytes], pos: int) -> tuple[int, int] | None:
    """The varint at `pos` and the position after it; None at the end of the file."""
    result = shift = 0
    start = pos
    while True:
        byte = file.read(1)
        if not byte:
            if pos == start:
                return None
            raise InvalidDataset(f"the file ends inside a record length at byte {pos}")
        pos += 1
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidDataset(f"a record length at byte {pos} is not a valid varint")


def _file_bodies(file: IO[bytes], size: int) -> Iterator[tuple[int, bytes]]:
    """The position and bytes of each record of a file of `size` bytes, one record in memory at a time."""
    pos = 0
    while (head := _read_varint(file, pos)) is not None:
        length, pos = head
        if pos + length > size:
            raise InvalidDataset(f"a record at byte {pos} claims {length} bytes but the file ends first")
        body = file.read(length)
        if len(body) != length:
            raise InvalidDataset(f"a record at byte {pos} claims {length} bytes but the file ends first")
        yield pos, body
        pos += length


def scan_file(path: Path) -> DatasetSummary:
    """`summarize` for a file, reading one record at a time; CPU- and IO-bound, run it in a thread."""

    def records(file: IO[bytes], size: int) -> Iterator[DatasetRecord]:
        for pos, body in _file_bodies(file, size):
            record = DatasetRecord()
            try:
                record.ParseFromString(body)
            except Exception:
                raise InvalidDataset(f"the record at byte {pos} is not a DatasetRecord") from None
            yield record

    with path.open("rb") as file:
        return _summarize(records(file, path.stat().st_size))


async def file_records(
    path: Path, record_items: Sequence[int], *, group_bytes: int = 8 << 20
) -> AsyncIterator[InputRecord]:
    """The records of a scanned file as rows to store, read in groups of about `group_bytes` in a thread."""
    size = path.stat().st_size
    with path.open("rb") as file:
        bodies = _file_bodies(file, size)

        def group() -> list[bytes]:
            out: list[bytes] = []
            taken = 0
            for _, body in bodies:
                out.append(body)
                taken += len(body)
                if taken >= group_bytes:
                    break
            return out

        index = first = 0
        while batch := await _settled(asyncio.to_thread(group)):
            for body in batch:
                count = record_items[index]
                yield InputRecord(index, first, count, body)
                index += 1
                first += count


async def _settled(awaitable: Awaitable[T]) -> T:
    """Awaits a thread's work; if cancelled meanwhile, lets the thread finish before raising, so that nothing
    touches a file after its owner closed or removed it."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _append(file: IO[bytes], digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    file.write(chunk)


@contextlib.asynccontextmanager
async def received(chunks: AsyncIterator[bytes], *, scratch: Path, sha256: str, size: int) -> AsyncIterator[Path]:
    """The uploaded bytes in a temporary file under `scratch` (the API's own disk, shared with nobody), checked
    for size and sha256 as they arrive. The file is removed when the block ends, however it ends: a failure, a
    cancelled upload or a stored dataset all leave nothing behind."""
    scratch.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="upload-", suffix=".partial", dir=scratch)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        with open(handle, "wb") as file:
            count = 0
            async for chunk in chunks:
                count += len(chunk)
                if count > size:
                    raise ChecksumMismatch("size_bytes", str(size), f"more than {size} bytes")
                await _settled(asyncio.to_thread(_append, file, digest, chunk))
        if count != size:
            raise ChecksumMismatch("size_bytes", str(size), str(count))
        if (actual := digest.hexdigest()) != sha256:
            raise ChecksumMismatch("sha256", sha256, actual)
        yield path
    finally:
        path.unlink(missing_ok=True)


class BatchSource(Protocol):
    """A job's input, read batch by batch as inference inputs."""

    async def read(self, start: int, stop: int) -> list[Tensor]: ...


class Items:
    """A job's whole input as numpy arrays, sliced into batches of inference inputs."""

    def __init__(self, arrays: dict[str, np.ndarray[Any, Any]], dtypes: dict[str, int]) -> None:
        self._arrays = arrays
        self._dtypes = dtypes
        self.count = len(next(iter(arrays.values()))) if arrays else 0

    @classmethod
    def from_records(cls, records: Sequence[DatasetRecord]) -> Items:
        parts: dict[str, list[np.ndarray[Any, Any]]] = {}
        dtypes: dict[str, int] = {}
        for record in records:
            for tensor in record.tensors:
                parts.setdefault(tensor.name, []).append(tensors.to_numpy(tensor))
                dtypes[tensor.name] = int(tensor.dtype)
        arrays = {name: chunks[0] if len(chunks) == 1 else np.concatenate(chunks) for name, chunks in parts.items()}
        return cls(arrays, dtypes)

    @classmethod
    def from_bytes(cls, data: bytes, *, delimited: bool) -> Items:
        """From a dataset file (delimited) or one serialized record (inline input)."""
        records = list(read_records(data)) if delimited else [DatasetRecord.FromString(data)]
        return cls.from_records(records)

    def batch(self, start: int, stop: int) -> list[Tensor]:
        return [
            tensors.to_tensor(array[start:stop], name=name, dtype=self._dtypes[name])
            for name, array in self._arrays.items()
        ]

    async def read(self, start: int, stop: int) -> list[Tensor]:
        return self.batch(start, stop)


Fetch = Callable[[int, int], Awaitable[list[InputRecord]]]


@dataclass(frozen=True)
class _Decoded:
    first_item: int
    item_count: int
    arrays: dict[str, np.ndarray[Any, Any]]
    dtypes: dict[str, int]


def _decode(record: InputRecord) -> _Decoded:
    message = DatasetRecord.FromString(record.record)
    return _Decoded(
        record.first_item,
        record.item_count,
        {t.name: tensors.to_numpy(t) for t in message.tensors},
        {t.name: int(t.dtype) for t in message.tensors},
    )


class DatasetItems:
    """A stored dataset's items, read by item range: each batch fetches only the records it covers.

    A miss fetches the records of `read_ahead` items from the batch's start (at least the batch), so that a runner
    reading its batches in order makes one query per several batches. The records of the last fetch, and the
    `cached_records` records used last, stay in memory decoded, since consecutive batches usually share records;
    memory stays bounded by those whatever the dataset's size.
    """

    def __init__(self, fetch: Fetch, *, cached_records: int = 8, read_ahead: int = 0) -> None:
        self._fetch = fetch
        self._cache: collections.OrderedDict[int, _Decoded] = collections.OrderedDict()
        self._limit = max(1, cached_records)
        self._read_ahead = max(0, read_ahead)
        self._fetched = 0  # records of the last fetch, never evicted before the next one

    def _cached(self, start: int, stop: int) -> list[_Decoded] | None:
        """The cached records covering start .. stop - 1 in order, or None if one is missing."""
        found: list[_Decoded] = []
        pos = start
        while pos < stop:
            record = next((r for r in self._cache.values() if r.first_item <= pos < r.first_item + r.item_count), None)
            if record is None:
                return None
            found.append(record)
            pos = record.first_item + record.item_count
        return found

    async def read(self, start: int, stop: int) -> list[Tensor]:
        records = self._cached(start, stop)
        if records is None:
            fetched = await self._fetch(start, max(stop, start + self._read_ahead))
            decoded = await asyncio.to_thread(lambda: [_decode(r) for r in fetched])
            records = [r for r in decoded if r.first_item < stop and r.first_item + r.item_count > start]
            covered = sum(min(stop, r.first_item + r.item_count) - max(start, r.first_item) for r in records)
            if covered != stop - start:
                raise FailedPrecondition(
                    f"the job's dataset holds no records for items {start} to {stop - 1}: it is gone; upload it again"
                )
            for record in decoded:
                self._cache[record.first_item] = record
                self._cache.move_to_end(record.first_item)
            self._fetched = len(decoded)
        for record in records:
            self._cache.move_to_end(record.first_item)
        while len(self._cache) > max(self._limit, self._fetched):
            self._cache.popitem(last=False)
        dtypes = records[0].dtypes
        out: list[Tensor] = []
        for name in records[0].arrays:
            parts = [r.arrays[name][max(start - r.first_item, 0) : stop - r.first_item] for r in records]
            array = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out.append(tensors.to_tensor(array, name=name, dtype=dtypes[name]))
        return out

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
import bisect
import collections
import contextlib
import errno
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from google.protobuf.message import DecodeError

from modelforge import tensors
from modelforge.common.v1.tensor_pb2 import DataType, Tensor
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.domain import InputRecord, TensorInfo
from modelforge_jobs.errors import (
    DatasetRecordDamaged,
    InlineInputDamaged,
    InvalidDataset,
    InvalidInput,
    NoRoomForDataset,
)
from modelforge_server.errors import ChecksumMismatch, FailedPrecondition, SizeMismatch

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
    tensors_: Sequence[Tensor], *, error: type[InvalidInput] | None = None, first_item: int = 0
) -> tuple[list[TensorInfo], int]:
    """The tensor infos and item count of one record, whose items are numbered from `first_item`; raises when the
    tensors do not agree, or a string element is not UTF-8 text (ONNX Runtime's strings are text: such an item
    could never run)."""

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
            raise fail(
                f"tensor {tensor.name!r}: its data does not match dtype and shape {list(tensor.shape)}",
                input=tensor.name,
            )
        count = int(tensor.shape[0])
        if 0 in tensor.shape[1:]:  # a few bytes would make a job of any number of items
            raise fail(
                f"tensor {tensor.name!r}: its items, of shape {list(tensor.shape[1:])}, hold no values; each item "
                "needs at least one",
                input=tensor.name,
            )
        if tensor.dtype == tensors.DataType.DATA_TYPE_STRING and (bad := _not_text(tensor.string_data)) is not None:
            item = first_item + bad // max(1, expected // max(count, 1))
            raise fail(
                f"tensor {tensor.name!r}: string element {bad} (of item {item}) is not valid UTF-8 text, which "
                "ONNX Runtime's string inputs need",
                input=tensor.name,
            )
        if items is None:
            items = count
        elif count != items:
            raise fail(f"tensor {tensor.name!r} has {count} items where the others have {items}", input=tensor.name)
        infos.append(TensorInfo(tensor.name, int(tensor.dtype), tuple(int(d) for d in tensor.shape[1:])))
    return infos, items or 0


def _not_text(elements: Sequence[bytes]) -> int | None:
    """The index of the first element that is not UTF-8, or None."""
    for index, element in enumerate(elements):
        try:
            element.decode()
        except UnicodeDecodeError:
            return index
    return None


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
        infos, count = describe_record(record.tensors, first_item=sum(counts))
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


_SCRATCH_PREFIX, _SCRATCH_SUFFIX = "upload-", ".partial"


def sweep_scratch(scratch: Path) -> int:
    """Removes what uploads left in `scratch` when their process died mid-upload (a process that ends normally
    removes its own); returns how many files went. Call it at start, before the API takes uploads: the directory
    is that process's alone."""
    removed = 0
    for leftover in scratch.glob(f"{_SCRATCH_PREFIX}*{_SCRATCH_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


@contextlib.asynccontextmanager
async def received(chunks: AsyncIterator[bytes], *, scratch: Path, sha256: str, size: int) -> AsyncIterator[Path]:
    """The uploaded bytes in a temporary file under `scratch` (the API's own disk, shared with nobody), checked
    for size and sha256 as they arrive. The file is removed when the block ends, however it ends: a failure, a
    cancelled upload or a stored dataset all leave nothing behind."""
    scratch.mkdir(parents=True, exist_ok=True)
    if size > (free := shutil.disk_usage(scratch).free):  # refused at the header, not once the disk is full
        raise NoRoomForDataset(size, free)
    handle, name = tempfile.mkstemp(prefix=_SCRATCH_PREFIX, suffix=_SCRATCH_SUFFIX, dir=scratch)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        with open(handle, "wb") as file:
            count = 0
            async for chunk in chunks:
                count += len(chunk)
                if count > size:
                    raise SizeMismatch(size, count)
                try:
                    await _settled(asyncio.to_thread(_append, file, digest, chunk))
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise NoRoomForDataset(size, shutil.disk_usage(scratch).free) from exc
        if count != size:
            raise SizeMismatch(size, count)
        if (actual := digest.hexdigest()) != sha256:
            raise ChecksumMismatch(sha256, actual)
        yield path
    finally:
        path.unlink(missing_ok=True)


class BatchSource(Protocol):
    """A job's input, read batch by batch as inference inputs."""

    async def read(self, start: int, stop: int) -> list[Tensor]: ...


@dataclass(frozen=True)
class _Column:
    """One tensor of a record, kept as its wire data: raw little-endian bytes (or, for STRING, the elements), of
    which each item takes `stride` bytes (elements). A batch's tensor is a slice of it, with no decoding."""

    name: str
    dtype: DataType.ValueType
    item_shape: tuple[int, ...]
    raw: memoryview
    strings: Sequence[bytes]
    stride: int

    @classmethod
    def of(cls, tensor: Tensor, items: int) -> _Column:
        item_shape = tuple(int(d) for d in tensor.shape[1:])
        elements = tensors.element_count(item_shape)
        if tensor.dtype == DataType.DATA_TYPE_STRING:
            raw, strings, stride, size = memoryview(b""), list(tensor.string_data), elements, len(tensor.string_data)
        else:
            raw, strings, stride = memoryview(tensor.raw_data), [], elements * tensors.itemsize(tensor.dtype)
            size = len(raw)
        if len(tensor.shape) < 1 or tensor.shape[0] != items or size != items * stride:
            raise InvalidDataset(f"tensor {tensor.name!r}: its data does not match its dtype and shape")
        return cls(tensor.name, tensor.dtype, item_shape, raw, strings, stride)

    def tensor(self, parts: Sequence[tuple[_Column, int, int]], items: int) -> Tensor:
        """This tensor for `items` items made of item ranges of columns like this one (`parts`: column, start,
        stop), the data copied once."""
        shape = (items, *self.item_shape)
        if self.dtype == DataType.DATA_TYPE_STRING:
            strings = [s for c, a, b in parts for s in c.strings[a * c.stride : b * c.stride]]
            return Tensor(name=self.name, dtype=self.dtype, shape=shape, string_data=strings)
        views = [c.raw[a * c.stride : b * c.stride] for c, a, b in parts]
        raw = bytes(views[0]) if len(views) == 1 else b"".join(views)
        return Tensor(name=self.name, dtype=self.dtype, shape=shape, raw_data=raw)


@dataclass(frozen=True)
class _Decoded:
    """One record, parsed: the items first_item .. + item_count of every tensor."""

    first_item: int
    item_count: int
    columns: dict[str, _Column]
    size: int = 0  # bytes of the serialized record, which its columns' data keeps in memory

    @classmethod
    def of(cls, message: DatasetRecord, first_item: int, size: int = 0) -> _Decoded:
        items = int(message.tensors[0].shape[0]) if message.tensors and message.tensors[0].shape else 0
        return cls(first_item, items, {t.name: _Column.of(t, items) for t in message.tensors}, size)

    def tensors(self) -> set[TensorInfo]:
        return {TensorInfo(c.name, int(c.dtype), c.item_shape) for c in self.columns.values()}


def _parsed(data: bytes, first_item: int) -> _Decoded:
    """One stored record, parsed; ValueError saying what is wrong when it is not the record its upload or submit
    checked (a job's input is checked as it arrives, so only damage at rest fails here)."""
    try:
        message = DatasetRecord.FromString(data)
    except DecodeError:
        raise ValueError("its bytes do not parse as a DatasetRecord") from None
    try:
        return _Decoded.of(message, first_item, len(data))
    except InvalidDataset as exc:
        raise ValueError(exc.detail) from None  # (a dtype tensors does not know raises ValueError itself)


def _decode(record: InputRecord, dataset_id: str, tensors_: set[TensorInfo]) -> _Decoded:
    """A dataset's stored record, parsed and checked against its row and the dataset's tensors (none: unchecked);
    DatasetRecordDamaged when it is not what the upload stored. Running the job again reads the same bytes: it
    must fail at once, not as a fault to retry."""
    try:
        decoded = _parsed(record.record, record.first_item)
    except ValueError as exc:
        raise DatasetRecordDamaged(dataset_id, record.index, str(exc)) from None
    if decoded.item_count != record.item_count:
        why = f"it holds {decoded.item_count} items where its row says {record.item_count}"
        raise DatasetRecordDamaged(dataset_id, record.index, why)
    if tensors_ and decoded.tensors() != tensors_:
        why = "its tensors' names, dtypes or item shapes are not the dataset's"
        raise DatasetRecordDamaged(dataset_id, record.index, why)
    return decoded


def _assemble(records: Sequence[_Decoded], start: int, stop: int) -> list[Tensor]:
    """The inference inputs of items start .. stop - 1, from the records that hold them, in order."""
    return [
        column.tensor(
            [
                (r.columns[name], max(start - r.first_item, 0), min(stop, r.first_item + r.item_count) - r.first_item)
                for r in records
            ],
            stop - start,
        )
        for name, column in records[0].columns.items()
    ]


class Items:
    """A job's whole input, parsed once and sliced into batches of inference inputs."""

    def __init__(self, records: Sequence[_Decoded]) -> None:
        self._records = list(records)
        self._firsts = [r.first_item for r in self._records]
        self.count = sum(r.item_count for r in self._records)

    @classmethod
    def from_records(cls, records: Sequence[DatasetRecord]) -> Items:
        decoded: list[_Decoded] = []
        first = 0
        for record in records:
            decoded.append(_Decoded.of(record, first))
            first += decoded[-1].item_count
        return cls(decoded)

    @classmethod
    def from_bytes(cls, data: bytes, *, delimited: bool) -> Items:
        """From a dataset file (delimited: InvalidDataset when it is malformed) or a job's stored inline input, one
        serialized record (InlineInputDamaged when it no longer parses or agrees with itself)."""
        if delimited:
            return cls.from_records(list(read_records(data)))
        try:
            return cls([_parsed(data, 0)])
        except ValueError as exc:
            raise InlineInputDamaged(str(exc)) from None

    def batch(self, start: int, stop: int) -> list[Tensor]:
        first = bisect.bisect_right(self._firsts, start) - 1
        last = bisect.bisect_left(self._firsts, stop)
        return _assemble(self._records[first:last], start, stop)

    async def read(self, start: int, stop: int) -> list[Tensor]:
        return self.batch(start, stop)


Fetch = Callable[[int, int], Awaitable[list[InputRecord]]]

# Records of up to this many bytes in all are parsed on the event loop: a hand-off to a thread costs more than
# parsing them (they are copied, never decoded element by element). Larger fetches are parsed in a thread.
_PARSE_INLINE_BYTES = 2 << 20


class DatasetItems:
    """A stored dataset's items, read by item range: each batch fetches only the records it covers.

    A miss fetches the records of `read_ahead` items from the batch's start (at least the batch), so that a runner
    reading its batches in order makes one query per several batches. The records of the last fetch, and of the
    ones used last at most `cached_records` records and `cached_bytes` bytes, stay in memory parsed, since
    consecutive batches usually share records; memory stays bounded by those whatever the dataset's size.

    A record that no longer parses, or no longer agrees with its row or with the dataset's `tensors`, raises
    DatasetRecordDamaged naming `dataset_id` and the record.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        dataset_id: str = "",
        tensors: Sequence[TensorInfo] = (),
        cached_records: int = 8,
        cached_bytes: int = 64 << 20,
        read_ahead: int = 0,
    ) -> None:
        self._fetch = fetch
        self._dataset_id = dataset_id  # named by the error of a damaged record
        self._tensors = set(tensors)  # every record's, as the upload found them
        self._cache: collections.OrderedDict[int, _Decoded] = collections.OrderedDict()
        self._limit = max(1, cached_records)
        self._byte_limit = cached_bytes
        self._bytes = 0  # of the records cached
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

            def decode() -> list[_Decoded]:
                return [_decode(r, self._dataset_id, self._tensors) for r in fetched]

            if sum(len(r.record) for r in fetched) <= _PARSE_INLINE_BYTES:
                decoded = decode()
            else:
                decoded = await asyncio.to_thread(decode)
            records = [r for r in decoded if r.first_item < stop and r.first_item + r.item_count > start]
            covered = sum(min(stop, r.first_item + r.item_count) - max(start, r.first_item) for r in records)
            if covered != stop - start:
                raise FailedPrecondition(
                    f"the job's dataset holds no records for items {start} to {stop - 1}: it is gone; upload it again"
                )
            for record in decoded:
                replaced = self._cache.pop(record.first_item, None)
                self._bytes += record.size - (replaced.size if replaced is not None else 0)
                self._cache[record.first_item] = record
            self._fetched = len(decoded)
        for record in records:
            self._cache.move_to_end(record.first_item)
        while len(self._cache) > self._fetched and (len(self._cache) > self._limit or self._bytes > self._byte_limit):
            _, evicted = self._cache.popitem(last=False)
            self._bytes -= evicted.size
        return _assemble(records, start, stop)

"""The dataset record format and the content-addressed dataset store.

Format (language-neutral, documented in jobs.proto at DatasetRecord): a file is a sequence of records; each record
is its byte length as a base-128 varint (the way protobuf encodes lengths) followed by a serialized
``modelforge.jobs.v1.DatasetRecord``, a list of named ``modelforge.common.v1.Tensor``. Every tensor of a record has
the record's item count as its first dimension; every record carries the same names, dtypes and per-item shapes.
The items of a dataset are the records' items, in order. Job results use the same records, one per batch.

Files are stored under their sha256 in the dataset directory; several datasets may share one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelforge import tensors
from modelforge.common.v1.tensor_pb2 import Tensor
from modelforge.jobs.v1.jobs_pb2 import DatasetRecord
from modelforge_jobs.domain import TensorInfo
from modelforge_jobs.errors import ChecksumMismatch, InvalidDataset, InvalidInput


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
            record.ParseFromString(view[pos : pos + length])
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


def summarize(data: bytes) -> DatasetSummary:
    """Checks that every record parses and agrees with the first; CPU-bound, run it in a thread."""
    first: list[TensorInfo] | None = None
    items = records = 0
    for record in read_records(data):
        infos, count = describe_record(record.tensors)
        if count == 0:
            raise InvalidDataset(f"record {records} holds no items")
        if first is None:
            first = infos
        elif sorted(infos, key=lambda i: i.name) != sorted(first, key=lambda i: i.name):
            raise InvalidDataset(f"record {records} has other names, dtypes or item shapes than record 0")
        items += count
        records += 1
    if first is None:
        raise InvalidDataset("it holds no records")
    return DatasetSummary(tuple(first), items, records)


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


class DatasetStore:
    """Dataset files under their sha256 in one directory; writes go through a temporary file and a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    async def receive(self, chunks: AsyncIterator[bytes], *, sha256: str, size: int) -> tuple[Path, bytes]:
        """Writes the chunks to a temporary file, checking size and sha256; returns it and its bytes.

        The caller moves it into place with `commit` or removes it with `discard`.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".upload-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        parts: list[bytes] = []
        received = 0
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > size:
                    raise ChecksumMismatch("size_bytes", str(size), f"more than {size} bytes")
                digest.update(chunk)
                parts.append(chunk)
            if received != size:
                raise ChecksumMismatch("size_bytes", str(size), str(received))
            actual = digest.hexdigest()
            if actual != sha256:
                raise ChecksumMismatch("sha256", sha256, actual)
            data = b"".join(parts)
            await asyncio.to_thread(tmp.write_bytes, data)
        except BaseException:
            self.discard(tmp)
            raise
        return tmp, data

    def commit(self, tmp: Path, sha256: str) -> None:
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    @staticmethod
    def discard(tmp: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

    async def read(self, sha256: str) -> bytes:
        return await asyncio.to_thread(self.path(sha256).read_bytes)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

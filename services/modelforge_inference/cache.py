"""The prediction cache in Redis.

An entry maps a prediction key to the outputs of one request. The key is a BLAKE2b digest over the model file's
sha256, the inputs in canonical form and the requested output names (:func:`prediction_digest`), so it names the
answer by content: two replicas, or two versions sharing one file, share their entries, and a new file never meets
an old entry. Values are a compact binary layout (:func:`encode_outputs`), never pickle.

Redis is an optimisation, never a dependency of a prediction. Every Redis failure is translated here and only here:
a connection-level failure puts the cache in *degraded* mode (``degraded`` / ``degraded_reason``), in which ``get``
and ``put`` are no-ops answering a miss without touching Redis, while a background probe pings Redis with backoff and
leaves degraded mode on its own when Redis answers again. No method of :class:`PredictionCache` raises because of
Redis.

Concurrent identical misses in one replica run the model once: the engine hands the key's digest to the version's
batcher, which shares one run among the requests queued with it (see batcher.py); two replicas missing the same key
at the same moment each compute it once.

Entries are written in the background (:meth:`PredictionCache.put_later`), so a slow Redis adds nothing to the
latency of a miss; until its write completes, an entry is answered from memory, so a repeat arriving meanwhile is
a hit rather than a second computation.

In front of Redis sits a small in-process tier (:class:`LocalTier`, ``local_bytes``; 0 turns it off): the entries
this process stored or read most recently, bounded in bytes, each expiring when its Redis entry does (a Redis hit
brings its remaining TTL along). A hit there is a dictionary lookup instead of a Redis round trip. Because a key
names its answer by content, a local entry can only be stale after a ``refresh`` on another replica, or after its
Redis entry was deleted by hand, and then only until it expires. While the cache is degraded the local tier is not
consulted either: the cache as a whole is off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import random
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
import redis.asyncio
import redis.exceptions

from modelforge_inference.domain import ResolvedModel
from modelforge_server.errors import Unavailable

__all__ = [
    "CacheCounts",
    "CacheUnavailable",
    "LocalTier",
    "PredictionCache",
    "PredictionKey",
    "decode_outputs",
    "encode_outputs",
    "prediction_digest",
]

log = logging.getLogger(__name__)

_STRING = "bytes"  # the dtype label of string tensors (numpy object arrays of bytes or str)


# ---------------------------------------------------------------------------------------------------------------
# Keys


def _dtype_label(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return _STRING
    return array.dtype.newbyteorder("<").str  # "<f4", "|u1", "|b1": the same label on every machine


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def _element_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytearray | memoryview | np.bytes_):
        return bytes(value)
    raise ValueError(f"string tensors hold bytes or str elements, not {type(value).__name__}")


def _frame(digest: Any, data: bytes) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def prediction_digest(model_sha256: str, inputs: Mapping[str, np.ndarray], output_names: Iterable[str] = ()) -> bytes:
    """The 32-byte BLAKE2b digest naming one prediction.

    It covers the model file's sha256, every input as (name, dtype, shape, bytes) in name order, and the sorted,
    de-duplicated requested output names (empty means "all outputs", a key of its own). Every field is
    length-framed, so no two different requests share a byte stream. Numbers are hashed as little-endian
    row-major bytes, whatever the array's memory layout; string elements as their bytes (str is UTF-8 encoded).
    """
    digest = hashlib.blake2b(digest_size=32, person=b"modelforge-pred1")
    _frame(digest, model_sha256.encode())
    digest.update(struct.pack("<I", len(inputs)))
    for name in sorted(inputs):
        array = np.asarray(inputs[name])
        label = _dtype_label(array)
        _frame(digest, name.encode())
        _frame(digest, label.encode())
        digest.update(struct.pack(f"<I{array.ndim}q", array.ndim, *array.shape))
        if label == _STRING:
            digest.update(struct.pack("<Q", array.size))
            for element in array.reshape(-1):
                _frame(digest, _element_bytes(element))
        else:
            data = _little_endian(array)
            digest.update(struct.pack("<Q", data.nbytes))
            digest.update(data.reshape(-1).view(np.uint8).data)
    names = sorted(set(output_names))
    digest.update(struct.pack("<I", len(names)))
    for name in names:
        _frame(digest, name.encode())
    return digest.digest()


@dataclasses.dataclass(frozen=True, slots=True)
class PredictionKey:
    """Names one cache entry; also says which model version the entry is counted under."""

    model: str
    version: int
    digest: bytes

    @classmethod
    def of(
        cls, model: ResolvedModel, inputs: Mapping[str, np.ndarray], output_names: Iterable[str] = ()
    ) -> PredictionKey:
        """The key of a prediction of ``model`` on ``inputs``, asking for ``output_names`` (empty: all)."""
        return cls(model.name, model.version, prediction_digest(model.sha256, inputs, output_names))

    @property
    def hex(self) -> str:
        return self.digest.hex()


# ---------------------------------------------------------------------------------------------------------------
# Values
#
#   value  := b"MFP1" u32:count output*
#   output := u16:len name  u8:len dtype  u8:ndim i64*ndim:shape  u64:len  pad-to-8  payload
#   payload of a number tensor: its little-endian row-major bytes; of a string tensor: (u32:len bytes)* per element

_MAGIC = b"MFP1"
_HEAD = struct.Struct("<4sI")


def _payload(array: np.ndarray) -> tuple[str, bytes | memoryview]:
    label = _dtype_label(array)
    if label == _STRING:
        elements = [_element_bytes(element) for element in array.reshape(-1)]
        parts = []
        for element in elements:
            parts.append(struct.pack("<I", len(element)))
            parts.append(element)
        return label, b"".join(parts)
    data = _little_endian(array)
    return label, data.reshape(-1).view(np.uint8).data


def _owned(outputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """outputs, with a copy of each array that is a view keeping a larger buffer alive: a request's rows of a
    merged run's output would otherwise keep the whole batch's output in memory, uncounted, as long as they do."""
    if all(_retained_bytes(array) <= array.nbytes for array in outputs.values()):
        return outputs
    return {name: array.copy() if _retained_bytes(array) > array.nbytes else array for name, array in outputs.items()}


def _objects_bytes(array: np.ndarray) -> int:
    """What the elements of an object array (a string output) take as Python objects, each beside its 8-byte
    pointer: the encoded size does not count them (a str holding one non-ASCII character stores every character in
    2 or 4 bytes)."""
    return sum(sys.getsizeof(element) + 8 for element in array.reshape(-1).tolist())


def _retained_bytes(array: np.ndarray) -> int:
    """The bytes of the buffer that array keeps alive (its own when it owns its data)."""
    base = array.base
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if base is None:
        return array.nbytes
    if isinstance(base, np.ndarray):
        return base.nbytes
    try:
        return memoryview(base).nbytes
    except TypeError:  # a buffer numpy got through an interface memoryview does not take: assume just the array
        return array.nbytes


def _entry_size(outputs: Mapping[str, np.ndarray]) -> int:
    """A lower bound of the encoded size, cheap enough to refuse big entries before encoding them."""
    size = _HEAD.size
    for name, array in outputs.items():
        size += 40 + len(name) + 8 * array.ndim
        if array.dtype.kind in "OSU":
            size += 4 * array.size + sum(len(_element_bytes(e)) for e in np.asarray(array).reshape(-1))
        else:
            size += array.nbytes
    return size


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """Serialises named arrays compactly: a small header per output, then its raw bytes."""
    parts: list[bytes | memoryview] = [_HEAD.pack(_MAGIC, len(outputs))]
    offset = _HEAD.size
    for name, value in outputs.items():
        array = np.asarray(value)
        label, payload = _payload(array)
        encoded_name = name.encode()
        header = struct.pack(
            f"<H{len(encoded_name)}sB{len(label)}sB{array.ndim}qQ",
            len(encoded_name),
            encoded_name,
            len(label),
            label.encode(),
            array.ndim,
            *array.shape,
            len(payload),
        )
        offset += len(header)
        padding = -offset % 8  # payloads start 8-byte aligned, so decoded arrays are aligned views
        parts.append(header + b"\0" * padding)
        offset += padding + len(payload)
        parts.append(payload)
    return b"".join(parts)


def decode_outputs(value: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`encode_outputs`. Number arrays are read-only views over ``value`` (no copy);
    string tensors come back as object arrays of bytes.

    Raises:
        ValueError: ``value`` is not in this layout or is truncated.
    """
    try:
        magic, count = _HEAD.unpack_from(value, 0)
        if magic != _MAGIC:
            raise ValueError("not a ModelForge prediction cache entry")
        offset = _HEAD.size
        outputs: dict[str, np.ndarray] = {}
        for _ in range(count):
            (name_len,) = struct.unpack_from("<H", value, offset)
            name = value[offset + 2 : offset + 2 + name_len].decode()
            offset += 2 + name_len
            label_len = value[offset]
            label = value[offset + 1 : offset + 1 + label_len].decode()
            offset += 1 + label_len
            ndim = value[offset]
            shape = struct.unpack_from(f"<{ndim}q", value, offset + 1)
            (size,) = struct.unpack_from("<Q", value, offset + 1 + 8 * ndim)
            offset += 1 + 8 * ndim + 8
            offset += -offset % 8
            if offset + size > len(value):
                raise ValueError("truncated entry")
            if label == _STRING:
                elements = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=object)
                position, end = offset, offset + size
                for index in range(elements.size):
                    (length,) = struct.unpack_from("<I", value, position)
                    elements[index] = value[position + 4 : position + 4 + length]
                    position += 4 + length
                if position != end:
                    raise ValueError("string payload length mismatch")
                outputs[name] = elements.reshape(shape)
            else:
                dtype = np.dtype(label)
                outputs[name] = np.frombuffer(value, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(
                    shape
                )
            offset += size
        if offset != len(value):
            raise ValueError("trailing bytes")
        return outputs
    except (struct.error, UnicodeDecodeError, TypeError, IndexError) as exc:
        raise ValueError(f"corrupt prediction cache entry: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# The in-process tier


# What an entry of the in-process tier holds in memory beyond its encoded bytes: its key, the table's node and
# tuple, the outputs' dict (_ENTRY_OVERHEAD), and each output's array object (_ARRAY_OVERHEAD). Measured with
# tracemalloc on CPython 3.11: 571-709 bytes for an entry of one [1, 8] float32 output, 824 for three outputs;
# these round up, so that `capacity` bounds the memory the tier really takes.
_ENTRY_OVERHEAD = 512
_ARRAY_OVERHEAD = 192
# Expired entries the oldest end of the table may give back at each put; entries expire in roughly the order
# they were last used, so this keeps up with the puts.
_SWEEP = 4


class LocalTier:
    """The most recently used entries of this process: at most `capacity` bytes, each until its expiry.

    Entries are kept decoded (the arrays a prediction answers with), sized as their encoded form plus what the
    entry costs in Python objects; an entry larger than a quarter of the capacity is not kept, so one big answer
    cannot flush the rest. Expiry times are on the monotonic clock; None never expires. An expired entry goes when
    it is asked for, or when it has reached the least recently used end of the table and a new one is put.
    """

    def __init__(self, capacity: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[Mapping[str, np.ndarray], float | None, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes held now, overheads included."""
        return self._bytes

    def get(self, digest: bytes) -> Mapping[str, np.ndarray] | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        outputs, expires, _ = entry
        if expires is not None and self._clock() >= expires:
            self.drop(digest)
            return None
        self._entries.move_to_end(digest)
        return outputs

    def put(self, digest: bytes, outputs: Mapping[str, np.ndarray], ttl_seconds: float | None, size: int) -> None:
        """Keeps `outputs` (`size` bytes encoded) under `digest` for `ttl_seconds` (None: until evicted)."""
        self.drop(digest)
        now = self._clock()
        self._sweep(now)
        size += _ENTRY_OVERHEAD + _ARRAY_OVERHEAD * len(outputs)
        size += sum(_objects_bytes(array) for array in outputs.values() if array.dtype == object)
        if ttl_seconds is not None and ttl_seconds <= 0 or size > self.capacity // 4:
            return
        expires = None if ttl_seconds is None else now + ttl_seconds
        self._entries[digest] = (outputs, expires, size)
        self._bytes += size
        while self._bytes > self.capacity:
            self.drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._bytes -= entry[2]

    def _sweep(self, now: float) -> None:
        """Drops expired entries at the least recently used end, a few at most, up to the first live one."""
        for _ in range(_SWEEP):
            oldest = next(iter(self._entries.items()), None)
            if oldest is None or oldest[1][1] is None or now < oldest[1][1]:
                return
            self.drop(oldest[0])


# ---------------------------------------------------------------------------------------------------------------
# The cache


# The most entries replaced while Redis was out of reach that are remembered, to delete once it answers.
_DELETES_KEPT = 10_000


@dataclasses.dataclass(slots=True)
class CacheCounts:
    """What the cache did for one model version since the process started."""

    hits: int = 0  # answered from the cache (Redis or the in-process tier)
    local_hits: int = 0  # of those, answered by the in-process tier without asking Redis
    misses: int = 0  # looked up, not there
    skipped: int = 0  # not looked up or not stored because the cache was degraded
    stores: int = 0  # entries written
    oversized: int = 0  # entries not written because they exceed the version's max_entry_bytes
    errors: int = 0  # Redis calls that failed, and entries that could not be decoded


class CacheUnavailable(Unavailable):
    """Raised only by :meth:`PredictionCache.check`, for health reporting; predictions never see it."""

    reason = "PREDICTION_CACHE_UNAVAILABLE"

    def __init__(self, why: str) -> None:
        super().__init__(f"the prediction cache (Redis) is unreachable: {why}; predictions run uncached meanwhile")


# Failures that say Redis cannot be reached (as opposed to a command Redis refused).
_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)
_FAILED = object()


class PredictionCache:
    """Prediction outputs in Redis, keyed by :class:`PredictionKey`, with single flight and degraded mode.

    Use it as ``async with PredictionCache(redis) as cache:`` (or ``await cache.start()`` / ``await cache.aclose()``):
    the background probe that ends degraded mode runs between the two. The Redis client is the caller's to create
    and close.

    Args:
        redis: A ``redis.asyncio.Redis`` with ``decode_responses=False``.
        key_prefix: Prepended to the hex digest to form the Redis key.
        operation_timeout: Longest a request waits on one Redis call before the cache counts Redis as down.
        write_timeout: Longest a background write may take (nobody waits for it) before Redis counts as down.
        probe_interval: First delay between probes while degraded; doubles up to ``max_probe_interval``.
        local_bytes: Capacity of the in-process tier in front of Redis (:class:`LocalTier`); 0 turns it off.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        key_prefix: str = "modelforge:pred:",
        operation_timeout: float = 0.5,
        write_timeout: float = 5.0,
        probe_interval: float = 0.05,
        max_probe_interval: float = 5.0,
        local_bytes: int = 0,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._timeout = operation_timeout
        self._write_timeout = write_timeout
        self._local = LocalTier(local_bytes) if local_bytes > 0 else None
        self._writing: dict[bytes, Mapping[str, np.ndarray]] = {}  # digest -> outputs whose write is under way
        self._writes: set[asyncio.Task[bool]] = set()
        # Entries a refresh replaced while Redis was out of reach, to delete once it answers (oldest first).
        self._to_delete: dict[str, None] = {}
        self._probe_interval = probe_interval
        self._max_probe_interval = max_probe_interval
        self._counts: dict[tuple[str, int], CacheCounts] = {}
        self._degraded_reason: str | None = None
        self._trouble = asyncio.Event()
        self._recovered = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PredictionCache:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Starts the background probe; checks Redis once so that ``degraded`` is meaningful from the start."""
        if self._probe is None:
            self._probe = asyncio.create_task(self._probe_loop(), name="modelforge.inference.cache.probe")
            await self._command(self._redis.ping())

    async def aclose(self) -> None:
        """Gives background writes up to one operation timeout to finish, then cancels them and the probe."""
        if self._writes:
            await asyncio.wait(self._writes, timeout=self._timeout)
        for task in self._writes:
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the cache is bypassed."""
        return self._degraded_reason is not None

    @property
    def degraded_reason(self) -> str | None:
        """Why the cache is degraded (the last Redis error), or None."""
        return self._degraded_reason

    async def check(self) -> None:
        """Raises Unavailable while degraded; for health checks (``app.Server.watch_dependency``).

        While not degraded it pings Redis, so that Redis going away is noticed without traffic (a failed ping
        degrades the cache, as a failed get or put does).
        """
        if self._degraded_reason is None:
            await self._command(self._redis.ping())
        if self._degraded_reason is not None:
            raise CacheUnavailable(self._degraded_reason)

    async def wait_recovered(self) -> None:
        """Returns once the cache is not degraded."""
        while self._degraded_reason is not None:
            self._recovered.clear()
            await self._recovered.wait()

    def counts(self, model: str, version: int) -> CacheCounts:
        """The counters of one model version (a copy; zeros if the cache never saw it)."""
        return dataclasses.replace(self._counts.get((model, version), CacheCounts()))

    def forget_counts(self, model: str, version: int) -> None:
        """Drops the counters of a deleted version: a version created later under its number starts from zero."""
        self._counts.pop((model, version), None)

    def statistics(self) -> dict[tuple[str, int], CacheCounts]:
        """The counters of every model version seen, keyed by (name, version)."""
        return {key: self.counts(*key) for key in self._counts}

    # -- entries ---------------------------------------------------------------------------------------------

    def key(
        self, model: ResolvedModel, inputs: Mapping[str, np.ndarray], output_names: Iterable[str] = ()
    ) -> PredictionKey:
        """The key of a prediction; see :func:`prediction_digest`. Hashes the inputs on the calling thread."""
        return PredictionKey.of(model, inputs, output_names)

    async def get(self, key: PredictionKey) -> dict[str, np.ndarray] | None:
        """The cached outputs, or None on a miss, while degraded, or when Redis fails."""
        counts = self._count(key)
        if (kept := self._in_memory(key, counts)) is not None:
            return kept
        if self._degraded_reason is not None:
            counts.skipped += 1
            return None
        found = await self._command(self._fetch(key))
        if found is _FAILED:
            counts.errors += 1
            return None
        value, ttl = found
        if value is None:
            # A run of the same prediction that ended while Redis answered has stored it meanwhile: single flight
            # for a request that came while the run was under way but asked Redis too late to share it.
            if (kept := self._in_memory(key, counts)) is not None:
                return kept
            counts.misses += 1
            return None
        try:
            outputs = decode_outputs(value)
        except ValueError as exc:
            log.warning("dropping undecodable prediction cache entry %s: %s", key.hex, exc)
            counts.errors += 1
            await self._command(self._redis.delete(self._prefix + key.hex))
            return None
        counts.hits += 1
        if self._local is not None:
            # Numeric outputs are views over the whole value, string ones copies of their elements: kept beside
            # string outputs, those views would keep the string payload alive twice over, so they are copied.
            strings = any(array.dtype == object for array in outputs.values())
            kept = {n: a.copy() if strings and a.dtype != object else a for n, a in outputs.items()}
            self._local.put(key.digest, kept, ttl, len(value))
            return kept
        return outputs

    def _in_memory(self, key: PredictionKey, counts: CacheCounts) -> dict[str, np.ndarray] | None:
        """The outputs this process holds for key (counted as a hit): stored a moment ago, their write to Redis
        under way, or in the in-process tier."""
        writing = self._writing.get(key.digest)
        if writing is not None:
            counts.hits += 1
            return dict(writing)
        if self._local is not None and self._degraded_reason is None:
            local = self._local.get(key.digest)
            if local is not None:
                counts.hits += 1
                counts.local_hits += 1
                return dict(local)
        return None

    async def _fetch(self, key: PredictionKey) -> tuple[bytes | None, float | None]:
        """An entry and, when the in-process tier is on, its remaining lifetime in seconds (None: it never expires),
        in one round trip."""
        name = self._prefix + key.hex
        if self._local is None:
            return cast("bytes | None", await self._redis.get(name)), None  # the client does not decode
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(name)
            pipe.pttl(name)
            value, pttl = await pipe.execute()
        return value, None if pttl == -1 else max(pttl, 0) / 1000  # -2: gone meanwhile, so not kept

    def put_later(
        self,
        key: PredictionKey,
        outputs: Mapping[str, np.ndarray],
        ttl_seconds: float | None,
        max_entry_bytes: int,
        *,
        replacing: bool = False,
    ) -> None:
        """Stores outputs as :meth:`put` does, in a background task; returns at once.

        Until the write completes, :meth:`get` answers key from memory. Nothing is kept while degraded.

        replacing: the outputs replace what key holds (a refresh): when they are not stored (too large, or the
        cache degraded), the old entry is removed rather than left to answer until it expires.
        """
        size = self._admit(key, outputs, max_entry_bytes, replacing=replacing)
        if size is None:
            return
        if self._local is not None:
            outputs = _owned(outputs)  # held for as long as the entry lives: no more than its own rows
            self._local.put(key.digest, outputs, ttl_seconds, size)
        self._writing[key.digest] = outputs
        put = self._put(key, outputs, ttl_seconds, max_entry_bytes, self._write_timeout, replacing=replacing)
        self._background(put, functools.partial(self._written, key.digest, outputs))

    def _admit(
        self, key: PredictionKey, outputs: Mapping[str, np.ndarray], max_entry_bytes: int, *, replacing: bool
    ) -> int | None:
        """The entry's size (a lower bound of its encoded size) when it may be stored. None, and counted, when it
        may not: the cache is degraded, or the entry is too large; then a replaced entry is removed."""
        counts = self._count(key)
        if self._degraded_reason is not None:
            counts.skipped += 1
        elif (size := _entry_size(outputs)) <= max_entry_bytes:
            return size
        else:
            counts.oversized += 1
        if replacing:
            self._forget(key)
        return None

    def _forget(self, key: PredictionKey) -> None:
        """Drops key from memory now and from Redis in the background; while degraded, from Redis once it answers
        again (at most _DELETES_KEPT such keys are kept, the oldest dropped first)."""
        if self._local is not None:
            self._local.drop(key.digest)
        self._writing.pop(key.digest, None)
        name = self._prefix + key.hex
        if self._degraded_reason is None:
            self._background(self._command(self._redis.delete(name), self._write_timeout))
            return
        self._to_delete[name] = None
        if len(self._to_delete) > _DELETES_KEPT:
            del self._to_delete[next(iter(self._to_delete))]

    def _delete_replaced(self) -> None:
        """Deletes, in the background, the entries refreshes replaced while Redis was out of reach."""
        names, self._to_delete = list(self._to_delete), {}
        for start in range(0, len(names), 1000):
            self._background(self._command(self._redis.delete(*names[start : start + 1000]), self._write_timeout))

    def _background(self, work: Awaitable[Any], done: Callable[[asyncio.Future[Any]], object] | None = None) -> None:
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(done or self._writes.discard)

    async def flush(self) -> None:
        """Waits for the background writes started so far."""
        if self._writes:
            await asyncio.wait(list(self._writes))

    def _written(self, digest: bytes, outputs: Mapping[str, np.ndarray], task: asyncio.Future[bool]) -> None:
        self._writes.discard(task)
        if self._writing.get(digest) is outputs:  # a later write of the same key keeps its own
            del self._writing[digest]
        if not task.cancelled():
            task.exception()  # _put does not raise; retrieved so that a bug is not reported as unhandled

    async def put(
        self,
        key: PredictionKey,
        outputs: Mapping[str, np.ndarray],
        ttl_seconds: float | None,
        max_entry_bytes: int,
    ) -> bool:
        """Stores outputs under key for ttl_seconds (None: no expiry). Returns whether the entry was written.

        Entries larger than max_entry_bytes are not written (counted as ``oversized``); nor is anything while
        degraded or when Redis fails.
        """
        if self._admit(key, outputs, max_entry_bytes, replacing=False) is None:
            return False
        return await self._put(key, outputs, ttl_seconds, max_entry_bytes, self._timeout)

    async def _put(
        self,
        key: PredictionKey,
        outputs: Mapping[str, np.ndarray],
        ttl_seconds: float | None,
        max_entry_bytes: int,
        timeout: float,
        *,
        replacing: bool = False,
    ) -> bool:
        """Writes an entry _admit took, unless the cache degraded meanwhile (put_later writes in the background)."""
        counts = self._count(key)
        if self._degraded_reason is not None:
            counts.skipped += 1
            return False
        value = encode_outputs(outputs)
        if len(value) > max_entry_bytes:
            counts.oversized += 1
            if replacing:
                self._forget(key)
            elif self._local is not None:  # put_later kept it in memory on a lower bound of its size
                self._local.drop(key.digest)
            return False
        expiry = None if ttl_seconds is None else max(1, round(ttl_seconds * 1000))
        result = await self._command(self._redis.set(self._prefix + key.hex, value, px=expiry), timeout)
        if result is _FAILED:
            counts.errors += 1
            if replacing:  # the entry it was to replace must not be answered meanwhile (best effort)
                self._forget(key)
            return False
        counts.stores += 1
        if self._local is not None:
            self._local.put(key.digest, outputs, ttl_seconds, len(value))
        return True

    # -- Redis -----------------------------------------------------------------------------------------------

    def _count(self, key: PredictionKey) -> CacheCounts:
        counts = self._counts.get((key.model, key.version))
        if counts is None:
            counts = self._counts[(key.model, key.version)] = CacheCounts()
        return counts

    async def _command(self, command: Awaitable[Any], timeout: float | None = None) -> Any:
        """Awaits one Redis command; translates every Redis failure into _FAILED (and degraded mode)."""
        try:
            async with asyncio.timeout(self._timeout if timeout is None else timeout):
                return await command
        except redis.exceptions.MaxConnectionsError:
            # This process has every connection of its pool in use (a burst of calls): Redis itself is fine, so
            # this one call goes without the cache, and the cache stays up.
            return _FAILED
        except _CONNECTION_ERRORS as exc:
            self._degrade(exc)
            return _FAILED
        except redis.exceptions.RedisError as exc:  # a command Redis refused (OOM, read-only replica, ...)
            log.warning("prediction cache command failed: %s", exc)
            return _FAILED

    def _degrade(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._degraded_reason is None:
            log.warning("prediction cache degraded, predictions run uncached until Redis answers: %s", reason)
        self._degraded_reason = reason
        self._trouble.set()

    async def _probe_loop(self) -> None:
        while True:
            await self._trouble.wait()
            self._trouble.clear()
            delay = self._probe_interval
            while self._degraded_reason is not None:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._max_probe_interval)
                # The pool's idle connections may lead to a Redis that went away (a restart): dropped, so that the
                # calls after recovery do not fail on them one by one and degrade the cache again.
                await self._redis.connection_pool.disconnect(inuse_connections=False)
                try:
                    # As long as a background write may take: a new connection's handshake is several round trips,
                    # and the probe's connection, once made, goes back to the pool for the calls that follow.
                    async with asyncio.timeout(self._write_timeout):
                        await self._redis.ping()
                except _CONNECTION_ERRORS + (redis.exceptions.RedisError,) as exc:
                    self._degraded_reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    continue
                log.info("prediction cache recovered: Redis answers again")
                self._degraded_reason = None
                self._delete_replaced()
                self._recovered.set()

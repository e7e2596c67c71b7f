"""Serialised responses whose large tensor bytes are appended from a memoryview, copied once.

protobuf copies a ``bytes`` field into the message on assignment and again when it serialises it. A response
carrying megabytes of output pays both on the event loop. Instead, the small fields are serialised by protobuf
and each large bytes field is appended in the wire format (tag, varint length, payload) straight from a view of
the array; one ``b"".join`` makes the only copy. A message built this way parses to the same message protobuf
would have produced, and where its fields are appended in field-number order the bytes are identical too.

Servicers return these ``bytes`` in place of the message; `passthrough` makes the method's registered
serialiser send them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_LENGTH_DELIMITED = 2

Parts = list[bytes | memoryview]


def varint(value: int) -> bytes:
    """The base-128 varint encoding of a non-negative integer."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_size(value: int) -> int:
    """The length of ``varint(value)``, without building it."""
    return 1 if value < 0x80 else (value.bit_length() + 6) // 7


def key(field: int) -> bytes:
    """The key of a length-delimited field (bytes, string or an embedded message)."""
    return varint(field << 3 | _LENGTH_DELIMITED)


def length_delimited(field: int, parts: Parts) -> Parts:
    """``parts`` (together one payload) as field ``field``: its key, the payload's length, then the parts."""
    size = sum(len(part) for part in parts)  # memoryviews here are flat byte views (format "B")
    return [key(field), varint(size), *parts]


def join(parts: Parts) -> bytes:
    return b"".join(parts)


def passthrough(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serialiser that sends pre-serialised ``bytes`` unchanged and serialises messages."""

    def serializer(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return serializer

"""Page sizes and opaque page tokens for List RPCs (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from modelforge_server.errors import InvalidArgument


def page_size(requested: int, *, default: int = 50, maximum: int = 500) -> int:
    """0 means the default; values above the maximum are lowered to it; negative values are refused."""
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative, got {requested}", field="page_size")
    if requested == 0:
        return default
    return min(requested, maximum)


# What a listing's page leaves of the message limit for its items: the token and the message's own fields.
PAGE_OVERHEAD_BYTES = 64 * 1024


def fitting(items: Sequence[Message], budget: int) -> int:
    """How many of `items`, from the first, fit in `budget` bytes as a repeated field of one answer; at least one, so
    that a listing always moves on. A page of large items is cut there, and its token continues from the last item
    kept: the answer stays under the message limit whatever the page size (AIP-158 lets a page hold fewer)."""
    total = 0
    for count, item in enumerate(items):
        total += item.ByteSize() + 10  # the field's tag and length prefix, at most
        if total > budget and count:
            return count
    return len(items)


def encode(key: list[Any], request: Message) -> str:
    """Encodes the sort key of the last item on a page as an opaque token, bound to the listing (the request's
    message type) and to the request's other fields."""
    payload = json.dumps(
        {"k": key, "l": request.DESCRIPTOR.full_name, "r": _fingerprint(request)}, separators=(",", ":")
    ).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode(token: str, kinds: tuple[type, ...], request: Message) -> list[Any] | None:
    """Returns the key encoded by `encode`, None for an empty token; InvalidArgument for anything else.

    `kinds` is the type of each part of the listing's sort key: a token of another listing, or one edited by hand
    into something no listing issues (not base64 JSON, a key of the wrong shape or types), is refused here rather
    than failing further in. Tokens are not signed: one whose key was changed to another of the right types pages
    from there, which shows nothing the listing would not. So is a token given with other filters than the request it
    came from (AIP-158: the other fields must not change), which would page through another listing from a place
    in this one.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        payload = None
    key = payload.get("k") if isinstance(payload, dict) else None
    if not isinstance(key, list):
        raise InvalidArgument(
            f"page_token is not one this server issued; {_PASS_IT_ON}",
            field="page_token",
        )
    if payload.get("l") != request.DESCRIPTOR.full_name:  # another listing's, though its key may fit this one
        raise foreign_token()
    if len(key) != len(kinds) or not all(_fits(part, kind) for part, kind in zip(key, kinds, strict=False)):
        raise foreign_token()
    if payload.get("r") != _fingerprint(request):
        raise InvalidArgument(
            "page_token came with other filters than the request that gave it; keep every field but page_size and "
            "page_token as it was, or list again from the first page",
            field="page_token",
        )
    return key


def _fits(part: Any, kind: type) -> bool:
    """Whether a part of a token's key is of its kind and a value PostgreSQL takes as such (a bigint, text)."""
    if not isinstance(part, kind) or isinstance(part, bool):
        return False
    if isinstance(part, int):
        return -(2**63) <= part < 2**63
    if isinstance(part, str):
        return "\x00" not in part
    return True


def _fingerprint(request: Message) -> str:
    """A digest of the request's fields other than the page size and token: what the listing is of."""
    rest = copy.copy(request)
    for name in ("page_token", "page_size"):
        rest.ClearField(name)
    return hashlib.blake2b(rest.SerializeToString(deterministic=True), digest_size=8).hexdigest()


_PASS_IT_ON = (
    "pass next_page_token from the previous response unchanged (a token kept from another version of ModelForge "
    "does not carry over: list again from the first page)"
)


def foreign_token() -> InvalidArgument:
    """The error for a token that decodes but is not of this listing (a listing that checks its key further)."""
    return InvalidArgument(
        f"page_token does not belong to this listing; {_PASS_IT_ON}",
        field="page_token",
    )

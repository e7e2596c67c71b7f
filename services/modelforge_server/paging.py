"""Page sizes and opaque page tokens for List RPCs (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from modelforge_server.errors import InvalidArgument


def page_size(requested: int, *, default: int = 50, maximum: int = 500) -> int:
    """0 means the default; values above the maximum are lowered to it; negative values are refused."""
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative, got {requested}", field="page_size")
    if requested == 0:
        return default
    return min(requested, maximum)


def encode(key: list[Any]) -> str:
    """Encodes the sort key of the last item on a page as an opaque token."""
    payload = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode(token: str, kinds: tuple[type, ...]) -> list[Any] | None:
    """Returns the key encoded by `encode`, None for an empty token; InvalidArgument for anything else.

    `kinds` is the type of each part of the listing's sort key: a token of another listing, or one edited by hand,
    is refused here rather than failing further in.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, list):
        raise InvalidArgument(
            "page_token is not one this server issued; pass next_page_token from the previous response unchanged",
            field="page_token",
        )
    if len(key) != len(kinds) or any(
        not isinstance(part, kind) or isinstance(part, bool) for part, kind in zip(key, kinds, strict=False)
    ):
        raise foreign_token()
    return key


def foreign_token() -> InvalidArgument:
    """The error for a token that decodes but is not of this listing (a listing that checks its key further)."""
    return InvalidArgument(
        "page_token does not belong to this listing; pass next_page_token from the previous response unchanged",
        field="page_token",
    )

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


def decode(token: str) -> list[Any] | None:
    """Returns the key encoded by `encode`, None for an empty token; InvalidArgument for anything else."""
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
    return key

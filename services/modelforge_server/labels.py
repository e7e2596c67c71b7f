"""Labels: the free key/value pairs that models, versions, jobs and datasets carry, and the rules every service
applies to them.

Keys are as Kubernetes has them: an optional DNS-subdomain prefix and '/', then a name of 1 to 63 characters of
A-Z, a-z, 0-9, '-', '_' and '.' that begins and ends with a letter or digit (``modelforge.io/max-batch-size``,
``team``). Values are any text of at most 256 characters, and one thing carries at most 64 labels: they travel
in every answer that holds it, and filter listings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from modelforge_server.errors import InvalidArgument

__all__ = ["LABELS_MAX", "LABEL_VALUE_MAX", "InvalidLabel", "TooManyLabels", "check_labels"]

# Matched with fullmatch (a trailing newline does not pass).
_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
_PREFIX_MAX = 253
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
LABEL_VALUE_MAX = 256
LABELS_MAX = 64


class InvalidLabel(InvalidArgument):
    reason = "INVALID_LABEL"

    def __init__(self, key: str, why: str, field: str = "labels") -> None:
        super().__init__(f"label {key!r} is invalid: {why}", field=field, label=key)


class TooManyLabels(InvalidArgument):
    """More labels than LABELS_MAX: a label error too, though of no one label."""

    reason = InvalidLabel.reason

    def __init__(self, count: int, field: str = "labels") -> None:
        super().__init__(
            f"{field} has {count} labels; at most {LABELS_MAX} are allowed: keep longer records elsewhere and "
            "name them with a label",
            field=field,
        )


def check_labels(labels: Mapping[str, str] | None, field: str = "labels") -> None:
    """Refuses labels that break the rules above, naming the first such key and what is wrong with it."""
    if not labels:
        return
    if len(labels) > LABELS_MAX:
        raise TooManyLabels(len(labels), field)
    for key, value in labels.items():
        prefix, slash, name = key.rpartition("/")
        if slash and not prefix:
            raise InvalidLabel(key, "the prefix before '/' is empty; drop the '/' or name a DNS subdomain", field)
        if prefix and (len(prefix) > _PREFIX_MAX or not _PREFIX.fullmatch(prefix)):
            raise InvalidLabel(
                key,
                f"the prefix {prefix!r} must be a DNS subdomain of at most {_PREFIX_MAX} characters "
                "(lowercase letters, digits, '-' and '.', such as modelforge.io)",
                field,
            )
        if not _NAME.fullmatch(name):
            raise InvalidLabel(
                key,
                "the name (after any 'prefix/') must be 1 to 63 characters of A-Z, a-z, 0-9, '-', '_' and '.', "
                "beginning and ending with a letter or digit",
                field,
            )
        if len(value) > LABEL_VALUE_MAX:
            raise InvalidLabel(
                key, f"its value has {len(value)} characters; at most {LABEL_VALUE_MAX} are allowed", field
            )

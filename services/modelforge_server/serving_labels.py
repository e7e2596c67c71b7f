"""The modelforge.io/ labels of a model version that configure how the inference service serves it.

The registry refuses a value a label does not take when the label is set, and the inference service reads the
labels with the same parsers when it loads the version, so a bad value is caught at the push rather than at the
first request.

| label                                    | takes                                       |
| ---------------------------------------- | ------------------------------------------- |
| modelforge.io/max-batch-size             | integer >= 0 (0: no batching)               |
| modelforge.io/max-queue-delay-us         | integer >= 0                                |
| modelforge.io/preferred-batch-sizes      | comma-separated integers >= 1               |
| modelforge.io/priority-levels            | integer from 1 to 256                       |
| modelforge.io/max-queue-size             | integer >= 1                                |
| modelforge.io/queue-timeout-seconds      | seconds > 0, up to 86400, or "none"         |
| modelforge.io/cache                      | true or false                               |
| modelforge.io/cache-ttl-seconds          | integer >= 1                                |
| modelforge.io/cache-max-entry-bytes      | size from 1 to 512MiB (1048576, 1MiB)       |
| modelforge.io/intra-op-threads           | integer from 0 to 1024 (0: ONNX Runtime's)  |
| modelforge.io/inter-op-threads           | integer from 0 to 1024                      |
| modelforge.io/graph-optimization-level   | disabled, basic, extended or all            |
| modelforge.io/execution-providers        | comma-separated ONNX Runtime provider names |
| modelforge.io/allow-spinning             | true or false (default false)               |
| modelforge.io/memory-arena               | true or false (default true)                |

Integers without a smaller bound go up to 2^31 - 1.

Other keys under the prefix are left alone: other tools may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from modelforge_server.settings import parse_int

PREFIX = "modelforge.io/"
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
# Upper bounds where a value is paid for up front: a queue per priority level, a thread per pool thread. Past them a
# label is a typo or a mistake, and would cost the server its memory or its scheduler.
MAX_PRIORITY_LEVELS = 256
MAX_THREADS = 1024
# Every other integer label: V2 ModelConfig carries batch and queue sizes as int32, as Triton's does.
MAX_INT32 = 2**31 - 1
# A queue timeout is a bound on waiting, not a way to switch it off ("none" does that); a day is past any use.
MAX_QUEUE_TIMEOUT_SECONDS = 86_400
# Redis stores no larger value (its proto-max-bulk-len, 512 MB by default) and drops the connection on one.
MAX_CACHE_ENTRY_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Label:
    """How one serving label's value is read: ``parse`` raises ValueError for a value it does not take."""

    parse: Callable[[str], Any]
    takes: str  # what it takes, for messages: "an integer from 0 to 2147483647"


@dataclass(frozen=True, slots=True)
class BadLabel:
    """A serving label whose value its parser refuses."""

    key: str
    value: str
    takes: str


def _int(minimum: int, maximum: int = MAX_INT32, *, size: bool = False) -> Label:
    """An integer in [minimum, maximum]; with `size`, a byte count that takes the suffixes the settings take."""

    def parse(text: str) -> int:
        value = parse_int(text.strip()) if size else int(text)
        if not minimum <= value <= maximum:
            raise ValueError
        return value

    if size:
        return Label(parse, f"a size in bytes from {minimum} to {maximum} (it may end in KiB, MiB, GiB, K, M or G)")
    return Label(parse, f"an integer from {minimum} to {maximum}")


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    if any(not 1 <= size <= MAX_INT32 for size in sizes):
        raise ValueError
    return sizes


def _timeout(text: str) -> float | None:
    if text.strip().lower() in ("", "none"):
        return None
    value = float(text)
    if not 0 < value <= MAX_QUEUE_TIMEOUT_SECONDS:  # nan and inf too
        raise ValueError
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError


def _level(text: str) -> str:
    if text not in OPTIMIZATION_LEVELS:
        raise ValueError
    return text


def _providers(text: str) -> tuple[str, ...]:
    """Names ONNX Runtime knows, whether or not its build here has them: a version may be pushed for replicas
    with GPUs from a host without one, but a misspelt name would run on the CPU without a word."""
    providers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not providers or not set(providers) <= set(ort.get_all_providers()):
        raise ValueError
    return providers


# label name (after the prefix) -> how its value is read
LABELS: dict[str, Label] = {
    "max-batch-size": _int(0),
    "max-queue-delay-us": _int(0),
    "preferred-batch-sizes": Label(_sizes, f"comma-separated integers from 1 to {MAX_INT32}"),
    "priority-levels": _int(1, MAX_PRIORITY_LEVELS),
    "max-queue-size": _int(1),
    "queue-timeout-seconds": Label(
        _timeout, f'a number of seconds > 0 and at most {MAX_QUEUE_TIMEOUT_SECONDS}, or "none"'
    ),
    "cache": Label(_bool, "true or false"),
    "cache-ttl-seconds": _int(1),
    "cache-max-entry-bytes": _int(1, MAX_CACHE_ENTRY_BYTES, size=True),
    "intra-op-threads": _int(0, MAX_THREADS),
    "inter-op-threads": _int(0, MAX_THREADS),
    "graph-optimization-level": Label(_level, " | ".join(OPTIMIZATION_LEVELS)),
    "execution-providers": Label(
        _providers, "comma-separated ONNX Runtime provider names, such as CUDAExecutionProvider,CPUExecutionProvider"
    ),
    "allow-spinning": Label(_bool, "true or false"),
    "memory-arena": Label(_bool, "true or false"),
}


def serving_label(key: str) -> tuple[str, Label] | None:
    """The name (after the prefix) and reader of ``key`` when it is a serving label; None for any other key."""
    if not key.startswith(PREFIX):
        return None
    name = key.removeprefix(PREFIX)
    label = LABELS.get(name)
    return None if label is None else (name, label)


def bad_labels(labels: Mapping[str, str]) -> list[BadLabel]:
    """The serving labels among ``labels`` whose values their parsers refuse, in the order given, then preferred
    batch sizes that the labels' own max-batch-size makes unreachable (Triton refuses such a config)."""
    bad = []
    parsed: dict[str, Any] = {}
    for key, value in labels.items():
        found = serving_label(key)
        if found is None:
            continue
        try:
            parsed[found[0]] = found[1].parse(value)
        except ValueError:
            bad.append(BadLabel(key, value, found[1].takes))
    largest = parsed.get("max-batch-size")
    if largest and any(size > largest for size in parsed.get("preferred-batch-sizes", ())):
        key = PREFIX + "preferred-batch-sizes"
        bad.append(BadLabel(key, labels[key], f"batch sizes of at most its max-batch-size, {largest}"))
    return bad

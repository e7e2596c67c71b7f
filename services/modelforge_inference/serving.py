"""ServingConfig of a model version: the server-wide defaults, overridden by the version's modelforge.io/ labels.

| label                                    | takes                                       |
| ---------------------------------------- | ------------------------------------------- |
| modelforge.io/max-batch-size             | integer >= 0 (0: no batching)               |
| modelforge.io/max-queue-delay-us         | integer >= 0                                |
| modelforge.io/preferred-batch-sizes      | comma-separated integers >= 1               |
| modelforge.io/priority-levels            | integer from 1 to 256                       |
| modelforge.io/max-queue-size             | integer >= 1                                |
| modelforge.io/queue-timeout-seconds      | number > 0, or "none"                       |
| modelforge.io/cache                      | true or false                               |
| modelforge.io/cache-ttl-seconds          | integer >= 1                                |
| modelforge.io/cache-max-entry-bytes      | integer >= 1                                |
| modelforge.io/intra-op-threads           | integer from 0 to 1024 (0: ONNX Runtime's)  |
| modelforge.io/inter-op-threads           | integer from 0 to 1024                      |
| modelforge.io/graph-optimization-level   | disabled, basic, extended or all            |
| modelforge.io/execution-providers        | comma-separated ONNX Runtime provider names |
| modelforge.io/allow-spinning             | true or false (default false)               |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from modelforge_inference.domain import BatchingConfig, CacheConfig, ResolvedModel, ServingConfig, SessionConfig
from modelforge_inference.errors import InvalidServingConfig
from modelforge_inference.settings import InferenceSettings
from modelforge_server.settings import SettingsError

PREFIX = "modelforge.io/"
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
# Upper bounds where a value is paid for up front: a queue per priority level, a thread per pool thread. Past them a
# label is a typo or a mistake, and would cost the server its memory or its scheduler.
MAX_PRIORITY_LEVELS = 256
MAX_THREADS = 1024


def _int(minimum: int, maximum: int | None = None) -> tuple[Callable[[str], Any], str]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError
        return value

    return parse, f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    if any(size < 1 for size in sizes):
        raise ValueError
    return sizes


def _timeout(text: str) -> float | None:
    if text.strip().lower() in ("", "none"):
        return None
    value = float(text)
    if not value > 0:
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
    providers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not providers:
        raise ValueError
    return providers


# label suffix -> (section, field, parser, what it takes)
_LABELS: dict[str, tuple[str, str, Callable[[str], Any], str]] = {
    "max-batch-size": ("batching", "max_batch_size", *_int(0)),
    "max-queue-delay-us": ("batching", "max_queue_delay_us", *_int(0)),
    "preferred-batch-sizes": ("batching", "preferred_batch_sizes", _sizes, "comma-separated integers >= 1"),
    "priority-levels": ("batching", "priority_levels", *_int(1, MAX_PRIORITY_LEVELS)),
    "max-queue-size": ("batching", "max_queue_size", *_int(1)),
    "queue-timeout-seconds": ("batching", "default_queue_timeout", _timeout, 'a number of seconds > 0 or "none"'),
    "cache": ("cache", "enabled", _bool, "true or false"),
    "cache-ttl-seconds": ("cache", "ttl_seconds", *_int(1)),
    "cache-max-entry-bytes": ("cache", "max_entry_bytes", *_int(1)),
    "intra-op-threads": ("session", "intra_op_threads", *_int(0, MAX_THREADS)),
    "inter-op-threads": ("session", "inter_op_threads", *_int(0, MAX_THREADS)),
    "graph-optimization-level": ("session", "graph_optimization_level", _level, " | ".join(OPTIMIZATION_LEVELS)),
    "execution-providers": ("session", "execution_providers", _providers, "comma-separated provider names"),
    "allow-spinning": ("session", "allow_spinning", _bool, "true or false"),
}


def defaults(settings: InferenceSettings) -> ServingConfig:
    """The server-wide ServingConfig from MODELFORGE_* settings.

    Each setting that a label overrides takes what the label takes; SettingsError names one that does not, at
    start, rather than every load failing later on a value ONNX Runtime has no option for, or a queue that holds
    nothing.
    """
    return ServingConfig(
        batching=BatchingConfig(
            max_batch_size=_setting("max-batch-size", settings.max_batch_size),
            max_queue_delay_us=_setting("max-queue-delay-us", settings.max_queue_delay_us),
            preferred_batch_sizes=_setting("preferred-batch-sizes", ",".join(settings.preferred_batch_sizes)),
            priority_levels=_setting("priority-levels", settings.priority_levels),
            max_queue_size=_setting("max-queue-size", settings.max_queue_size),
            default_queue_timeout=_setting("queue-timeout-seconds", settings.default_queue_timeout),
        ),
        cache=CacheConfig(
            enabled=settings.cache_enabled,
            ttl_seconds=_setting("cache-ttl-seconds", settings.cache_ttl_seconds),
            max_entry_bytes=_setting("cache-max-entry-bytes", settings.cache_max_entry_bytes),
        ),
        session=SessionConfig(
            intra_op_threads=_setting("intra-op-threads", settings.intra_op_threads),
            inter_op_threads=_setting("inter-op-threads", settings.inter_op_threads),
            graph_optimization_level=_setting("graph-optimization-level", settings.graph_optimization_level),
            execution_providers=settings.execution_providers,
        ),
    )


# Labels whose server-wide setting is named otherwise than MODELFORGE_<LABEL>.
_SETTING_NAMES = {"queue-timeout-seconds": "default_queue_timeout"}


def _setting(label: str, value: Any) -> Any:
    """The server-wide setting that `label` overrides, checked by the label's parser."""
    _, _, parse, expected = _LABELS[label]
    try:
        return parse("none" if value is None else str(value))
    except ValueError:
        key = "MODELFORGE_" + _SETTING_NAMES.get(label, label.replace("-", "_")).upper()
        raise SettingsError(f"{key}={value!r} is invalid: it takes {expected}") from None


def serving_config(base: ServingConfig, model: ResolvedModel) -> ServingConfig:
    """base with the version's modelforge.io/ labels applied; InvalidServingConfig names a bad label."""
    changes: dict[str, dict[str, Any]] = {"batching": {}, "cache": {}, "session": {}}
    for label, text in model.labels.items():
        if not label.startswith(PREFIX):
            continue
        entry = _LABELS.get(label.removeprefix(PREFIX))
        if entry is None:
            continue  # other tools may use the prefix; unknown keys are theirs
        section, field, parse, expected = entry
        try:
            changes[section][field] = parse(text)
        except ValueError:
            raise InvalidServingConfig(model.name, model.version, label, text, expected) from None
    return ServingConfig(
        batching=dataclasses.replace(base.batching, **changes["batching"]),
        cache=dataclasses.replace(base.cache, **changes["cache"]),
        session=dataclasses.replace(base.session, **changes["session"]),
    )

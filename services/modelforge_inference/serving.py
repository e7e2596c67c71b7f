"""ServingConfig of a model version: the server-wide defaults, overridden by the version's modelforge.io/ labels
(modelforge_server.serving_labels lists them and reads their values)."""

from __future__ import annotations

import dataclasses
from typing import Any

from modelforge_inference.domain import BatchingConfig, CacheConfig, ResolvedModel, ServingConfig, SessionConfig
from modelforge_inference.errors import InvalidServingConfig
from modelforge_inference.settings import InferenceSettings
from modelforge_server.serving_labels import LABELS, PREFIX, serving_label
from modelforge_server.settings import SettingsError

__all__ = ["PREFIX", "defaults", "serving_config"]

# label name (after the prefix) -> the ServingConfig section and field it sets
_FIELDS: dict[str, tuple[str, str]] = {
    "max-batch-size": ("batching", "max_batch_size"),
    "max-queue-delay-us": ("batching", "max_queue_delay_us"),
    "preferred-batch-sizes": ("batching", "preferred_batch_sizes"),
    "priority-levels": ("batching", "priority_levels"),
    "max-queue-size": ("batching", "max_queue_size"),
    "queue-timeout-seconds": ("batching", "default_queue_timeout"),
    "cache": ("cache", "enabled"),
    "cache-ttl-seconds": ("cache", "ttl_seconds"),
    "cache-max-entry-bytes": ("cache", "max_entry_bytes"),
    "intra-op-threads": ("session", "intra_op_threads"),
    "inter-op-threads": ("session", "inter_op_threads"),
    "graph-optimization-level": ("session", "graph_optimization_level"),
    "execution-providers": ("session", "execution_providers"),
    "allow-spinning": ("session", "allow_spinning"),
    "memory-arena": ("session", "memory_arena"),
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
    reader = LABELS[label]
    try:
        return reader.parse("none" if value is None else str(value))
    except ValueError:
        key = "MODELFORGE_" + _SETTING_NAMES.get(label, label.replace("-", "_")).upper()
        raise SettingsError(f"{key}={value!r} is invalid: it takes {reader.takes}") from None


def serving_config(base: ServingConfig, model: ResolvedModel) -> ServingConfig:
    """base with the version's modelforge.io/ labels applied; InvalidServingConfig names a bad label."""
    changes: dict[str, dict[str, Any]] = {"batching": {}, "cache": {}, "session": {}}
    for label, text in model.labels.items():
        found = serving_label(label)
        if found is None:
            continue  # not a serving label (other tools may use the prefix too)
        name, reader = found
        section, field = _FIELDS[name]
        try:
            changes[section][field] = reader.parse(text)
        except ValueError:  # set before the registry checked serving labels
            raise InvalidServingConfig(model.name, model.version, label, text, reader.takes) from None
    batching = dataclasses.replace(base.batching, **changes["batching"])
    if batching.max_batch_size:  # a preferred size from the server's settings that this version's labels outgrew
        reachable = tuple(size for size in batching.preferred_batch_sizes if size <= batching.max_batch_size)
        batching = dataclasses.replace(batching, preferred_batch_sizes=reachable)
    return ServingConfig(
        batching=batching,
        cache=dataclasses.replace(base.cache, **changes["cache"]),
        session=dataclasses.replace(base.session, **changes["session"]),
    )

"""Logging set-up: one JSON object per line when stderr is not a terminal, readable text when it is.

Every line carries the service; and, where they exist, the trace and span ids of the current OpenTelemetry span
and the fields bound with :func:`bind` (``model``, ``job_id``...) or passed as ``extra``. Values that look like
payloads (bytes, arrays) are never written: they are replaced by their size.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from opentelemetry import trace

__all__ = ["JsonFormatter", "TextFormatter", "bind", "bound", "configure"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_BOUND: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("modelforge_log_fields", default=None)
_MAX_VALUE_CHARS = 512


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Adds fields to every log line written inside the block (in this task and the ones it starts).

    Use the keys ``model`` (a model ref such as ``resnet:3``) and ``job_id`` for the domain identifiers.
    """
    token = _BOUND.set({**(_BOUND.get() or {}), **fields})
    try:
        yield
    finally:
        _BOUND.reset(token)


def bound() -> dict[str, Any]:
    """The fields :func:`bind` attached to the current context."""
    return dict(_BOUND.get() or {})


def _context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """trace_id/span_id, bound fields, then the record's own `extra`; payload-like values are summarised."""
    fields: dict[str, Any] = {}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid and span_context.trace_flags.sampled:  # an id no collector will have is no lead
        fields["trace_id"] = format(span_context.trace_id, "032x")
        fields["span_id"] = format(span_context.span_id, "016x")
    fields.update(_BOUND.get() or {})
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    return {k: _safe(v) for k, v in fields.items()}


def _safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if hasattr(value, "__array_interface__") or hasattr(value, "nbytes"):
        return f"<array of {getattr(value, 'nbytes', '?')} bytes>"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + f"...<{len(text)} chars>"


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with the service, the trace context and any bound or `extra` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One readable line: time, level, service, logger, message, then key=value context."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context_fields(record).items() if k != "span_id")
        line = f"{_timestamp(record)} {record.levelname:<7} {self._service} {record.name}: {record.getMessage()}"
        if context:
            line += f"  [{context}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class Throttle(logging.Filter):
    """Passes at most one line per `seconds` of the logger it is added to: a library that logs each retry of the
    same failure (an unreachable trace collector, every few seconds) says so once in a while, not all the time.
    ``clock``: the time source, seconds. Code of ModelForge's own asks :meth:`due` before it logs, and may
    :meth:`reset` it once the failure is over, so that the next one is said at once."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._seconds = seconds
        self._clock = clock
        self._last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        return self.due()

    def due(self) -> bool:
        """Whether a line may be said now (if so, the next one may not for `seconds`)."""
        now = self._clock()
        if now - self._last < self._seconds:
            return False
        self._last = now
        return True

    def reset(self) -> None:
        self._last = -math.inf


# Libraries whose DEBUG lines come on every call ("Loaded running loop" for each RPC): left at INFO when the
# services log at DEBUG, which is for ModelForge's own lines.
QUIET_LIBRARIES = ("grpc._cython.cygrpc",)


def configure(service: str, level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Routes every logger to stderr (or `stream`) in the format that suits where the output goes.

    `level` comes from MODELFORGE_LOG_LEVEL through the service settings (``settings.log_level``).
    """
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    isatty = getattr(out, "isatty", None)
    handler.setFormatter(TextFormatter(service) if isatty is not None and isatty() else JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))

"""ONNX Runtime sessions: options from a SessionConfig, provider fallback, warmup, and what their errors mean.

Everything here blocks; the engine calls it on its own threads, never on the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from modelforge_inference.domain import DYNAMIC, SessionConfig, Signature, TensorSpec

log = logging.getLogger("modelforge.inference.sessions")

_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_CPU = "CPUExecutionProvider"

# ONNX Runtime raises these when what it was given cannot run: bad values or shapes the graph cannot take
# (a Reshape that does not fit, an index out of range). The signature checks have passed by then, and the
# session ran its warmup, so they are the caller's doing.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ort_state.InvalidArgument, ort_state.Fail, ort_state.RuntimeException)


def providers(config: SessionConfig) -> list[str]:
    """The configured providers that this ONNX Runtime build has, in order, always ending with the CPU."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for provider in config.execution_providers:
        if provider in available:
            if provider not in chosen:
                chosen.append(provider)
        else:
            log.warning(
                "execution provider %s is not available in this ONNX Runtime build (it has %s); using the CPU instead",
                provider,
                ", ".join(sorted(available)),
            )
    if _CPU not in chosen:
        chosen.append(_CPU)
    return chosen


def session_options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = _LEVELS[config.graph_optimization_level]
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    return options


class ModelSession:
    """One ONNX Runtime session and the output order it returns. `run` is thread-safe and releases the GIL."""

    def __init__(self, path: Path, config: SessionConfig) -> None:
        self.session = ort.InferenceSession(str(path), session_options(config), providers=providers(config))
        self.output_names = [output.name for output in self.session.get_outputs()]
        self._run_options = ort.RunOptions()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, feeds, self._run_options)
        return dict(zip(self.output_names, results, strict=True))

    def warmup(self, signature: Signature) -> None:
        """Runs once on zeros (dynamic dimensions 1); a model that refuses zeros is logged and still served."""
        try:
            self.run({spec.name: _zeros(spec) for spec in signature.inputs})
        except INPUT_ERRORS as exc:
            log.warning("warmup run failed; serving the model anyway: %s", exc)


def _zeros(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if dim == DYNAMIC else dim for dim in spec.shape)
    if spec.is_string:
        array = np.empty(shape, dtype=object)
        array.fill(b"")
        return array
    return np.zeros(shape, dtype=spec.dtype)


def resident_bytes() -> int:
    """This process's resident memory, to estimate what a session takes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def stack(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenates request inputs along dimension 0 (the one copy batching needs)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def describe_error(exc: BaseException) -> str:
    """ONNX Runtime's message without its status-code boilerplate."""
    text = str(exc)
    for prefix in ("[ONNXRuntimeError] : ",):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text.strip()

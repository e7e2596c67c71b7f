"""ONNX Runtime sessions: options from a SessionConfig, provider fallback, warmup, and what their errors mean.

Everything here blocks; the engine calls it on its own threads, never on the event loop.

bfloat16 has no numpy dtype: ModelForge carries it as uint16 bit patterns. A session whose graph takes bfloat16
inputs feeds them as OrtValues typed BFLOAT16 over those bits (no copy), and one that returns bfloat16 outputs
runs with OrtValue outputs and copies their bits into uint16 arrays. Every other session keeps ONNX Runtime's
plain numpy path, or, for outputs the caller has memory for (a client's shared memory), an IO binding that has
ONNX Runtime write them there, with no copy.

Only tensor outputs are served. Outputs of other types (sequences or maps, such as the ZipMap of a scikit-learn
classifier converted by skl2onnx) are left out of every run, so ONNX Runtime never builds them; a model with no
tensor output, or with an input that is not a tensor, is refused at load.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime import RunOptions
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from modelforge import tensors
from modelforge_inference.domain import DYNAMIC, SessionConfig, Signature, TensorSpec

log = logging.getLogger("modelforge.inference.sessions")

_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_CPU = "CPUExecutionProvider"
_BFLOAT16 = "tensor(bfloat16)"
_STRING = "tensor(string)"

# ONNX Runtime raises these when what it was given cannot run: bad values or shapes the graph cannot take
# (a Reshape that does not fit, an index out of range). The signature checks have passed by then, so they are
# taken as the caller's doing; until a run of the session has completed (ModelSession.proven), the error says that
# the model itself may be at fault.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ort_state.InvalidArgument, ort_state.Fail, ort_state.RuntimeException)
# Outputs are bound from this many bytes on: setting up an IO binding costs about as much as copying 400 KB.
_BIND_FROM_BYTES = 256 * 1024
# The same errors from a run through an IO binding, which ONNX Runtime's Python layer wraps in RuntimeError.
_BINDING_ERRORS: tuple[type[BaseException], ...] = (*INPUT_ERRORS, RuntimeError)
# ONNX Runtime reports a failed allocation with the same exception types; only its message tells it apart.
_OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "out of memory")
# The longest a warmup run may take before it is stopped (ModelSession.warmup).
WARMUP_LIMIT_SECONDS = 10.0


def run_options() -> RunOptions:
    """Options for runs. They log nothing: a failed run raises, and the error it answers with says what ONNX
    Runtime said (its own log line would repeat it on stderr for every bad request). Setting ``terminate`` on
    them, from any thread, stops the runs using them between two nodes (or two iterations of a loop), and they
    raise."""
    options = RunOptions()
    options.log_severity_level = 4  # fatal only
    return options


def quiet_default_logger() -> None:
    """Turns ONNX Runtime's process-wide logger down to fatal errors. It writes some failures of a run (a size that
    overflows, an allocation refused) to stderr itself, in a format of its own, once per bad request, although the
    run raises them and the answer says what they said: a client could fill the log."""
    ort.set_default_logger_severity(4)


def prime_runtime() -> None:
    """Builds and runs a session of a one-node model, once, and drops it. What ONNX Runtime allocates for the
    first session of a process (its environment, allocators and kernel registries: about 5 MiB) would otherwise
    count in the memory estimate of the first version loaded, which is the process's growth during its load."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "prime",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[_CPU])
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options())


def terminate(options: RunOptions) -> None:
    options.terminate = True


def out_of_memory(exc: BaseException) -> bool:
    """Whether an ONNX Runtime failure was an allocation that could not be made."""
    text = str(exc)
    return any(marker in text for marker in _OUT_OF_MEMORY)


def providers(config: SessionConfig, name: str = "the model") -> list[str]:
    """The configured providers that this ONNX Runtime build has, in order, always ending with the CPU. `name`:
    the model the session serves, for the warning about a provider missing here."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for provider in config.execution_providers:
        if provider in available:
            if provider not in chosen:
                chosen.append(provider)
        else:
            log.warning(
                "execution provider %s is not available in this ONNX Runtime build (it has %s); %s runs on the CPU "
                "instead",
                provider,
                ", ".join(sorted(available)),
                name,
            )
    if _CPU not in chosen:
        chosen.append(_CPU)
    return chosen


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's cpuset, taskset), not all the host has."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def intra_op_threads(configured: int) -> int:
    """The intra-op pool to ask ONNX Runtime for. Its own choice (0) is a thread per physical core of the host,
    each pinned to its core: in a process held to fewer CPUs (taskset, a cpuset) those threads would run outside
    them, so there 0 means one thread per CPU the process may use, left where the process is."""
    usable = usable_cpus()
    return usable if configured == 0 and usable < (os.cpu_count() or 1) else configured


def session_options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(config.intra_op_threads)
    options.inter_op_num_threads = config.inter_op_threads
    if config.inter_op_threads > 1:  # ONNX Runtime has an inter-op pool only when it runs independent nodes at once
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    options.graph_optimization_level = _LEVELS[config.graph_optimization_level]
    spinning = "1" if config.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    options.enable_cpu_mem_arena = config.memory_arena
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    return options


def unserved_inputs(described: list[str]) -> str:
    """Why a model with inputs no request can feed (sequences, maps, optionals, element types ModelForge lacks)
    cannot be served."""
    return f"its inputs {', '.join(described)} are not tensors ModelForge serves; requests carry tensors only"


class ModelSession:
    """One ONNX Runtime session and the output order it returns. `run` is thread-safe and releases the GIL."""

    def __init__(self, path: Path, config: SessionConfig, *, name: str = "the model") -> None:
        """`name`: the model version the session serves ("resnet:3"), for its log lines."""
        self.name = name
        self.session = ort.InferenceSession(str(path), session_options(config), providers=providers(config, name))
        outputs = served_outputs(self.session.get_outputs())
        # Every run names these outputs, so ONNX Runtime never computes the others (a ZipMap's list of dicts).
        self.output_names = [output.name for output in outputs]
        self._run_options = run_options()  # shared by the runs that no one stops
        # Whether every node runs on the CPU: a run elsewhere may spend its time waiting for a device, off the
        # thread's CPU clock that decides whether a version's runs are tiny enough for the event loop.
        self.providers = tuple(self.session.get_providers())  # what it runs on: those asked for that are here
        self.cpu_only = self.providers == (_CPU,)
        # Whether a run (the warmup included) has completed: until one has, a failure may be the model's own.
        self.proven = False
        inputs = self.session.get_inputs()
        if unserved := [f"{spec.name!r} ({spec.type})" for spec in inputs if not _is_served(spec.type)]:
            raise ValueError(unserved_inputs(unserved))
        self._bfloat16_inputs = frozenset(spec.name for spec in inputs if spec.type == _BFLOAT16)
        self._bfloat16_outputs = tuple(output.type == _BFLOAT16 for output in outputs)
        # Outputs come back as OrtValues only when one of them is bfloat16 (numpy cannot hold it).
        self._by_value = any(self._bfloat16_outputs)
        self._typed = self._by_value or bool(self._bfloat16_inputs)
        # Outputs can be bound to the caller's memory on the plain numpy path, with number inputs only.
        self._bindable = not self._typed and all(spec.type != _STRING for spec in inputs)
        if self._by_value and any(spec.type == _STRING for spec in inputs):
            raise ValueError(
                "a model with string inputs and bfloat16 outputs cannot be served: ONNX Runtime takes string "
                "inputs only on the path that cannot return bfloat16; cast the outputs to float32 or float16"
            )

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        into: Mapping[str, np.ndarray] | None = None,
        options: RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        """The outputs of one run, by name. ``into``: writable arrays, shaped and typed as the outputs they are
        named for will be, that ONNX Runtime writes those outputs into; they are then returned as those arrays.
        Small outputs, and any where the session cannot bind them, are computed as usual and copied into their
        arrays. ``options``: from `run_options`, for a run that may be stopped with `terminate`."""
        if options is None:
            options = self._run_options
        if into and self._bindable and sum(array.nbytes for array in into.values()) >= _BIND_FROM_BYTES:
            outputs = self._run_into(feeds, into, options)
        else:
            outputs = self._run_typed(feeds, options) if self._typed else self._run_plain(feeds, options)
            outputs = place(outputs, into) if into else outputs
        self.proven = True
        return outputs

    def _run_plain(self, feeds: Mapping[str, np.ndarray], options: RunOptions) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, feeds, options)
        return dict(zip(self.output_names, results, strict=True))

    def _run_into(
        self, feeds: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray], options: RunOptions
    ) -> dict[str, np.ndarray]:
        """A run through an IO binding with the outputs in ``into`` bound to those arrays. When it fails, the run
        is repeated unbound: if that succeeds, the graph's outputs do not have the shapes its signature promised,
        and the session binds no more (a failure of both runs is the input's, and is raised)."""
        binding = self.session.io_binding()
        inputs = {name: np.ascontiguousarray(array) for name, array in feeds.items()}  # held until the run ends
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name in self.output_names:
            target = into.get(name)
            if target is None:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cpu", 0, target.dtype, target.shape, target.ctypes.data)
        try:
            self.session.run_with_iobinding(binding, options)
        except _BINDING_ERRORS as exc:
            outputs = self._run_plain(feeds, options)  # raises when the input is at fault, or when terminated
            self._bindable = False
            log.warning("outputs of this model cannot be bound to shared memory, and are copied there: %s", exc)
            return place(outputs, into)
        values = binding.get_outputs()
        return {
            name: into[name] if name in into else value.numpy()
            for name, value in zip(self.output_names, values, strict=True)
        }

    def _run_typed(self, feeds: Mapping[str, np.ndarray], options: RunOptions) -> dict[str, np.ndarray]:
        """The run of a graph with bfloat16 inputs or outputs, which travel as uint16 bit patterns."""
        values: dict[str, Any] = {}
        for name, array in feeds.items():
            if name in self._bfloat16_inputs:
                bits = np.ascontiguousarray(array, dtype=np.uint16)
                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TensorProto.BFLOAT16)
            elif self._by_value:
                values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            else:
                values[name] = array
        if not self._by_value:
            results = self.session.run(self.output_names, values, options)
            return dict(zip(self.output_names, results, strict=True))
        produced = self.session.run_with_ort_values(self.output_names, values, options)
        return {
            name: _bfloat16_bits(value) if bfloat16 else value.numpy()
            for name, value, bfloat16 in zip(self.output_names, produced, self._bfloat16_outputs, strict=True)
        }

    def warmup(self, signature: Signature, limit: float = WARMUP_LIMIT_SECONDS) -> None:
        """Runs once on zeros (dynamic dimensions 1), and once more on ones if the model refuses zeros (a shape
        input of Expand or Tile, a divisor); a model that refuses both is logged and still served.

        Inputs whose fixed dimensions come to more than WARMUP_MAX_BYTES get no warmup (logged): allocated for
        real, a model declaring a [100000, 100000] input would take 40 GB at load, or fail it. A run that outlasts
        `limit` seconds is stopped (logged), and the model is served without one: a model may loop for ever on
        zeros, and loads happen one at a time, so it would hold every later load.
        """
        size = sum(_zeros_bytes(spec) for spec in signature.inputs)
        if size > WARMUP_MAX_BYTES:
            log.info("no warmup run for %s: its fixed input shapes come to %d bytes of zeros", self.name, size)
            return
        options = run_options()
        timer = threading.Timer(limit, terminate, [options])
        timer.daemon = True
        timer.start()
        try:
            for fill in _WARMUP_FILLS:
                try:
                    self.run({spec.name: _filled(spec, fill) for spec in signature.inputs}, options=options)
                    return
                except INPUT_ERRORS as exc:
                    if options.terminate:
                        log.warning("warmup run of %s stopped after %g s; serving it without one", self.name, limit)
                        return
                    failure = exc
            log.warning("warmup run of %s failed on zeros and on ones; serving it anyway: %s", self.name, failure)
        finally:
            timer.cancel()


def served_outputs(outputs: Sequence[ort.NodeArg]) -> list[ort.NodeArg]:
    """The outputs that are tensors of a type ModelForge serves, in graph order; logs the others, which are never
    computed. Raises ValueError when there is none: such a model cannot be served.

    These are the outputs the registry records with a dtype (it stores the others as UNSPECIFIED), so they are
    the outputs of the version's signature.
    """
    served = [output for output in outputs if _is_served(output.type)]
    left_out = [f"{output.name!r} ({output.type})" for output in outputs if not _is_served(output.type)]
    if not served:
        raise ValueError(
            f"it has no output that is a tensor ModelForge serves, only {', '.join(left_out)}; ModelForge serves "
            "tensor outputs only (a scikit-learn model converted by skl2onnx with options={'zipmap': False} "
            "returns tensors)"
        )
    if left_out:
        log.warning(
            "serving the tensor outputs %s only; left out, as ModelForge serves tensors only: %s; they are never "
            "computed, and requests naming them get INVALID_ARGUMENT",
            ", ".join(repr(output.name) for output in served),
            ", ".join(left_out),
        )
    return served


def _is_served(ort_type: str) -> bool:
    try:
        tensors.from_ort_type(ort_type)
    except ValueError:
        return False
    return True


def place(outputs: dict[str, np.ndarray], into: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``outputs`` with each one named in ``into`` copied into that array and replaced by it; an output whose
    shape differs from its array's stays as it is (the caller then copies it as the output's shape demands)."""
    for name, target in into.items():
        array = outputs.get(name)
        if array is not None and array.shape == target.shape and array.dtype == target.dtype:
            np.copyto(target, array)
            outputs[name] = target
    return outputs


def _bfloat16_bits(value: ort.OrtValue) -> np.ndarray:
    """A copy of a CPU bfloat16 OrtValue's elements as uint16 bit patterns."""
    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype=np.uint16)
    elements = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    return np.ctypeslib.as_array(elements).reshape(shape).copy()


WARMUP_MAX_BYTES = 64 * 1024 * 1024


def _zeros_bytes(spec: TensorSpec) -> int:
    elements = 1
    for dim in spec.shape:
        elements *= 1 if dim == DYNAMIC else dim
    return elements * (8 if spec.is_string else spec.dtype.itemsize)


# What the warmup runs fill number inputs with, in order: string inputs are always empty strings.
_WARMUP_FILLS = (0, 1)


def _filled(spec: TensorSpec, fill: int) -> np.ndarray:
    shape = tuple(1 if dim == DYNAMIC else dim for dim in spec.shape)
    if spec.is_string:
        array = np.empty(shape, dtype=object)
        array.fill(b"")
        return array
    return np.full(shape, fill, dtype=spec.dtype)


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

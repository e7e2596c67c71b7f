"""Validates an ONNX file and reads its signature and facts; runs in a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
import os
import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from modelforge_registry.domain import ONNX_TEXT_MAX, OnnxInfo, OperatorSet, Signature, TensorSpec
from modelforge_registry.errors import ExternalDataRefused, InvalidOnnx, NotServable
from modelforge_server.runtime_errors import describe_error

# ONNX TensorProto element types to our DataType names (modelforge.common.v1.DataType without its prefix).
_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FLOAT32",
    onnx.TensorProto.DOUBLE: "FLOAT64",
    onnx.TensorProto.FLOAT16: "FLOAT16",
    onnx.TensorProto.BFLOAT16: "BFLOAT16",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "STRING",
}


class Inspections:
    """Runs inspect_file on uploaded files in worker threads, as many at once as `budget` bytes of files allow.

    An inspection holds about twice its file's size in memory (the model parsed in Python, then the checker's own
    copy, then ONNX Runtime's session, one after the other), so concurrent uploads of large models would add up to
    several times what one needs; past the budget they wait their turn. A file larger than the budget takes all of
    it. A caller that goes away leaves its share taken until its thread ends, since the thread cannot be stopped.
    """

    def __init__(self, budget: int, inspect: Callable[[Path], Inspected] | None = None) -> None:
        self.budget = max(1, budget)
        self.in_use = 0
        self._inspect = inspect if inspect is not None else inspect_file
        self._turns = asyncio.Condition()

    async def inspect(self, path: Path, size: int) -> Inspected:
        """Validates the file; returns its signature and facts, or raises InvalidOnnx / ExternalDataRefused."""
        share = min(max(1, size), self.budget)
        async with self._turns:
            await self._turns.wait_for(lambda: self.in_use + share <= self.budget)
            self.in_use += share
        running = asyncio.ensure_future(asyncio.to_thread(self._inspect, path))
        running.add_done_callback(lambda done: asyncio.ensure_future(self._give_back(share, done)))
        return await asyncio.shield(running)

    async def _give_back(self, share: int, done: asyncio.Future[Inspected]) -> None:
        if not done.cancelled():
            done.exception()  # seen here too, so that a result nobody awaits any more is not reported as lost
        async with self._turns:
            self.in_use -= share
            self._turns.notify_all()


Inspected = tuple[Signature, OnnxInfo]


def inspect_file(path: Path, *, runtime_check: bool = True) -> Inspected:
    """The file's signature and facts, read from the model in Python, which is then let go before the checker reads
    the file itself: the file is held in memory once at a time, not twice over (the checker given a model would
    take it serialized again). With `runtime_check`, ONNX Runtime must then build a session of it."""
    found, info = _read(path)
    try:
        onnx.checker.check_model(os.fspath(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise InvalidOnnx(f"onnx.checker refused it: {_first_line(exc)}") from None
    if runtime_check:
        _check_servable(found)
        _check_runtime(path)
    return found, info


def _check_servable(found: Signature) -> None:
    """Refuses a model whose signature no request could ever be served on: inputs that are not tensors of a type
    ModelForge knows, no output that is one, or string inputs beside bfloat16 outputs. The inference service refuses
    the same when it loads one (its sessions module, which the registry cannot import), for versions stored without
    this check."""
    if unserved := [repr(spec.name) for spec in found.inputs if spec.dtype == "UNSPECIFIED"]:
        which = (
            f"inputs {', '.join(unserved)} are not tensors"
            if len(unserved) > 1
            else f"input {unserved[0]} is no tensor"
        )
        raise NotServable(
            f"its {which} of a type it serves (a sequence, a map, an optional, or an element type such as float8 or "
            "complex64); requests carry tensors only"
        )
    if all(spec.dtype == "UNSPECIFIED" for spec in found.outputs):
        raise NotServable(
            "it has no output that is a tensor of a type it serves (a scikit-learn model converted by skl2onnx "
            "with options={'zipmap': False} returns tensors)"
        )
    if any(spec.dtype == "STRING" for spec in found.inputs) and any(s.dtype == "BFLOAT16" for s in found.outputs):
        raise NotServable(
            "ONNX Runtime takes string inputs only on the path that cannot return bfloat16 outputs; cast the outputs "
            "to float32 or float16"
        )


# The most characters of a library's message that a refusal quotes (its first line).
_LINE_CHARS = 300
# What ONNX Runtime raises for a model it cannot build a session of; none derives from RuntimeError.
_RUNTIME_REFUSALS: tuple[type[BaseException], ...] = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


def _check_runtime(path: Path) -> None:
    """Refuses a model ONNX Runtime cannot build a session of on the CPU, which the checker lets through: an
    operator of a domain it has no kernels for (a custom-op library's), a type an operator has no kernel for, an
    opset newer than this ONNX Runtime, a graph whose types do not agree. Every inference replica would fail to
    load it. The session is built as plainly as it can be (no graph optimisation, one thread, no memory arena) and
    let go at once; nothing is run."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4  # fatal only: the refusal's message says what went wrong
    try:
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except _RUNTIME_REFUSALS as exc:
        raise InvalidOnnx(
            f"ONNX Runtime {ort.__version__} cannot load it: {_first_line(exc, describe_error(exc))} (if the model is "
            "meant for another runtime or for custom operators, a registry with MODELFORGE_RUNTIME_CHECK=false "
            "accepts it)"
        ) from None


def _read(path: Path) -> Inspected:
    try:
        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidOnnx(f"it cannot be parsed as an ONNX protobuf ({_first_line(exc)})") from None
    if not model.HasField("graph"):
        raise InvalidOnnx("it has no graph (is it an ONNX file at all, and complete?)")
    refuse_external_data(model)  # before the checker, which would follow the file's external data paths
    _check_opsets(model)
    found, info = signature(model), facts(model)
    _check_texts(_texts(found, info))
    return found, info


def _check_opsets(model: onnx.ModelProto) -> None:
    """Refuses an opset of the ONNX domain that no release defines yet (the checker lets it through, and no runtime
    could load it)."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise InvalidOnnx(
                f"it imports opset {opset.version} of the ONNX domain, which does not exist (the newest is {newest}): "
                "export it with an opset the runtime serving it supports"
            )


def _check_texts(texts: list[tuple[str, str]]) -> None:
    """Refuses text kept from the file that PostgreSQL cannot store (a NUL character) or that is too large to travel
    in every answer holding the version (over ONNX_TEXT_MAX bytes in all)."""
    if (where := next((where for where, text in texts if "\0" in text), None)) is not None:
        raise InvalidOnnx(
            f"its {where} contains a NUL character (U+0000), which the registry cannot store: remove it (onnx.load, "
            "change it, onnx.save) and push again"
        )
    size = sum(len(text.encode()) for _, text in texts)
    if size > ONNX_TEXT_MAX:
        raise InvalidOnnx(
            f"its doc_string, metadata_props and names hold {size} bytes of text, more than the {ONNX_TEXT_MAX} a "
            "version keeps: move large metadata (vocabularies, configs) into files of their own"
        )


def _texts(found: Signature, info: OnnxInfo) -> list[tuple[str, str]]:
    """Every text kept from the file, each with where it is."""
    texts: list[tuple[str, str]] = [
        ("producer_name", info.producer_name),
        ("producer_version", info.producer_version),
        ("graph name", info.graph_name),
        ("doc_string", info.doc_string),
        *((f"opset domain {o.domain!r}", o.domain) for o in info.opset_imports),
        *((f"metadata_props key {key!r}", key) for key in info.metadata_props),
        *((f"metadata_props[{key!r}]", value) for key, value in info.metadata_props.items()),
    ]
    for kind, specs in (("input", found.inputs), ("output", found.outputs)):
        for spec in specs:
            texts.append((f"{kind} name {spec.name!r}", spec.name))
            texts.extend((f"{kind} {spec.name!r} dimension name {dim!r}", dim) for dim in spec.dim_names)
    return texts


def refuse_external_data(model: onnx.ModelProto) -> None:
    """Refuses any tensor stored outside the file; names escaping paths as such."""
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        raise ExternalDataRefused(tensor.name, location, escapes=escapes_directory(location))


def escapes_directory(location: str) -> bool:
    """True when a relative location would resolve outside the model's directory (or is absolute)."""
    normalized = location.replace("\\", "/")
    if not normalized or normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        return True
    return posixpath.normpath(normalized).split("/")[0] == ".."


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for training in model.training_info:  # ONNX Runtime does not read it; the file holds it all the same
        yield from _graph_tensors(training.initialization)
        yield from _graph_tensors(training.algorithm)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in (attribute.sparse_tensor, *attribute.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def signature(model: onnx.ModelProto) -> Signature:
    """The inputs a request feeds and the outputs: a graph input an initializer (dense or sparse) gives a default
    for is left out, as ONNX Runtime leaves it out of a session's inputs."""
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    inputs = tuple(_spec(value) for value in graph.input if value.name not in initializers)
    outputs = tuple(_spec(value) for value in graph.output)
    return Signature(inputs=inputs, outputs=outputs)


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    if value.type.WhichOneof("value") != "tensor_type":
        return TensorSpec(name=value.name, dtype="UNSPECIFIED", shape=(), dim_names=())
    tensor_type = value.type.tensor_type
    shape: list[int] = []
    names: list[str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            shape.append(dim.dim_value)
            names.append("")
        else:
            shape.append(-1)
            names.append(dim.dim_param)
    return TensorSpec(
        name=value.name,
        dtype=_DTYPES.get(tensor_type.elem_type, "UNSPECIFIED"),
        shape=tuple(shape),
        dim_names=tuple(names),
    )


def facts(model: onnx.ModelProto) -> OnnxInfo:
    return OnnxInfo(
        ir_version=model.ir_version,
        opset_imports=tuple(OperatorSet(domain=o.domain, version=o.version) for o in model.opset_import),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        graph_name=model.graph.name,
        doc_string=model.doc_string,
        metadata_props={prop.key: prop.value for prop in model.metadata_props},
    )


def _first_line(exc: BaseException, text: str | None = None) -> str:
    """The first line of `text` (the exception's own message unless given); a line over _LINE_CHARS ends with an
    ellipsis where it was cut, between two words unless that would drop more than a long word (a path)."""
    text = (str(exc) if text is None else text).strip() or type(exc).__name__
    line = text.splitlines()[0]
    if len(line) <= _LINE_CHARS:
        return line
    space = line.rfind(" ", 0, _LINE_CHARS + 1)
    cut = space if space >= _LINE_CHARS - 40 else _LINE_CHARS
    return line[:cut].rstrip() + " …"

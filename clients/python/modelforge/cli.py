"""The ``modelforge`` command: run the suite, manage models, predict, run batch jobs.

Every command that talks to a service finds it through a flag (``--registry``, ``--inference``, ``--jobs``),
else ``MODELFORGE_REGISTRY_ADDRESS`` and friends, else the default port on localhost. Failures print one line,
``modelforge: <what went wrong>``, to stderr and exit non-zero: 1 for a refused or failed call, 2 for a usage
error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import os
import secrets
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from modelforge import _arrayfiles
from modelforge._channel import DEFAULT_MAX_MESSAGE_BYTES, INFERENCE, JOBS, REGISTRY, Service, resolve_target
from modelforge._convert import INT32_MAX, MiB, storable
from modelforge._domain import JobState, JobStatus, Model, ModelVersion, Prediction
from modelforge._errors import (
    ANSWER_TOO_LARGE_HINT,
    DEADLINE_HINT,
    REQUEST_TOO_LARGE_HINT,
    UNREACHABLE_HINT,
    DeadlineExceededError,
    ModelForgeError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from modelforge._inference import InferenceClient
from modelforge._jobs import Job, JobsClient
from modelforge._refs import MAX_VERSION, ModelRef
from modelforge._registry import RegistryClient, UnservedOutputsWarning

__all__ = ["main"]


class UsageError(Exception):
    """A command line that cannot run as written; exit status 2."""


# --- output helpers ------------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal's stderr; silent when stderr is not a terminal.

    Call it as ``bar(done, total)``; :meth:`close` ends the line.
    """

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO | None = None, *, unit: str = "bytes") -> None:
        self._label = label
        self._format = _size if unit == "bytes" else _count
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty()
        self._shown = -1
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self._live:
            return
        permille = 1000 if total <= 0 else min(1000, done * 1000 // total)
        if permille == self._shown:
            return
        self._shown = permille
        filled = self.WIDTH * permille // 1000
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self._format(int(done / elapsed))
        line = (
            f"\r{self._label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {permille / 10:5.1f}% "
            f"{self._format(done)}/{self._format(total)} {rate}/s"
        )
        self._stream.write(line)
        self._stream.flush()

    def close(self) -> None:
        if self._live and self._shown >= 0:
            self._stream.write("\n")
            self._stream.flush()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _count(n: int) -> str:
    return f"{n} items"


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], out: TextIO) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": list(value.shape)}
    return value


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(_jsonable(value), indent=2, sort_keys=False), file=out)


def _labels(pairs: Sequence[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"a label is KEY=VALUE, not {pair!r}")
        labels[key] = value
    return labels


# --- the commands --------------------------------------------------------------------------------------------


class Context:
    """What every command gets: the parsed arguments, where to print, and clients made on demand."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.service: Service | None = None  # the service the command is talking to, for error messages

    @contextlib.contextmanager
    def registry(self) -> Iterator[RegistryClient]:
        self.service = REGISTRY
        with RegistryClient(self.target(REGISTRY), timeout=self.args.timeout) as client:
            yield client

    @contextlib.contextmanager
    def inference(self) -> Iterator[InferenceClient]:
        self.service = INFERENCE
        with InferenceClient(self.target(INFERENCE), timeout=self.args.timeout) as client:
            yield client

    @contextlib.contextmanager
    def jobs(self) -> Iterator[JobsClient]:
        self.service = JOBS
        with JobsClient(self.target(JOBS), timeout=self.args.timeout) as client:
            yield client

    def target(self, service: Service) -> str:
        return resolve_target(service, getattr(self.args, service.key, None))


def cmd_up(ctx: Context) -> int:
    try:
        from modelforge_server import supervisor  # the server extra; the SDK alone cannot run services
    except ImportError as exc:
        raise UsageError(
            f"`modelforge up` needs the server extra ({exc.name} is missing): pip install 'modelforge[server]'"
        ) from None
    a = ctx.args
    ports = {k: v for k, v in (("registry", a.registry_port), ("inference", a.inference_port),
                               ("jobs", a.jobs_port)) if v is not None}  # fmt: skip
    options = supervisor.UpOptions(
        host=a.host, ports=ports, only=tuple(a.only or ()), workers=a.workers,
        replicas={"inference": a.inference_replicas},
        metrics_port=a.metrics_port, worker_metrics_port=a.worker_metrics_port,
    )  # fmt: skip
    return supervisor.run(options)


def cmd_models_push(ctx: Context) -> int:
    a = ctx.args
    path = Path(a.file)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give the .onnx file to push")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    bar = ProgressBar(f"uploading {path.name}", ctx.err)
    with ctx.registry() as registry, warnings.catch_warnings(record=True) as noted:
        warnings.simplefilter("always", UnservedOutputsWarning)  # said as a note of the command's own
        try:
            version = registry.push(
                path,
                name=a.name,
                alias=a.alias,
                description=a.description,
                labels=_labels(a.label),
                version_label=a.version_label,
                create_model=not a.no_create,
                progress=bar,
            )
        finally:
            bar.close()
    if a.json:
        _print_json(version, ctx.out)
    else:
        aliases = f" ({', '.join(version.aliases)})" if version.aliases else ""
        print(f"pushed {version.ref}{aliases}  sha256 {version.sha256}  {_size(version.size_bytes)}", file=ctx.out)
    for warning in noted:
        if issubclass(warning.category, UnservedOutputsWarning):
            print(f"modelforge: note: {warning.message}", file=ctx.err)
    return 0


def cmd_models_ls(ctx: Context) -> int:
    a = ctx.args
    for flag, value in (("--prefix", a.prefix), ("--label", a.label)):
        if a.name and value is not None:
            raise UsageError(
                f"{flag} filters the list of models; `models ls {a.name}` lists that model's versions, which only "
                "--state filters"
            )
    if not a.name and a.state:
        raise UsageError("--state filters the versions of one model: name it, as in `models ls NAME --state STATE`")
    with ctx.registry() as registry:
        if a.name:
            versions = list(registry.list_versions(a.name, state=a.state))
            if a.json:
                _print_json(versions, ctx.out)
                return 0
            rows = [
                [str(v.version), v.state.value, _size(v.size_bytes), v.sha256[:12], ",".join(v.aliases) or "-",
                 v.version_label or "-", _when(v.create_time)]
                for v in versions
            ]  # fmt: skip
            _table(rows, ["VERSION", "STATE", "SIZE", "SHA256", "ALIASES", "LABEL", "CREATED"], ctx.out)
            return 0
        models = list(registry.list_models(name_prefix=a.prefix or "", labels=_labels(a.label)))
    if a.json:
        _print_json(models, ctx.out)
        return 0
    rows = [
        [m.name, str(m.latest_version or "-"), ",".join(f"{k}={v}" for k, v in m.aliases.items()) or "-",
         _when(m.create_time), m.description]
        for m in models
    ]  # fmt: skip
    _table(rows, ["NAME", "LATEST", "ALIASES", "CREATED", "DESCRIPTION"], ctx.out)
    return 0


def _show_model(model: Model, out: TextIO) -> None:
    print(f"model        {model.name}", file=out)
    print(f"description  {model.description or '-'}", file=out)
    print(f"labels       {', '.join(f'{k}={v}' for k, v in model.labels.items()) or '-'}", file=out)
    print(f"latest       {model.latest_version or '-'}", file=out)
    print(f"aliases      {', '.join(f'{k} -> {v}' for k, v in model.aliases.items()) or '-'}", file=out)
    print(f"created      {_when(model.create_time)}", file=out)


def _show_version(v: ModelVersion, out: TextIO) -> None:
    print(f"version      {v.ref}", file=out)
    print(f"state        {v.state.value}", file=out)
    print(f"sha256       {v.sha256}", file=out)
    print(f"size         {_size(v.size_bytes)} ({v.size_bytes} bytes)", file=out)
    print(f"aliases      {', '.join(v.aliases) or '-'}", file=out)
    print(f"label        {v.version_label or '-'}", file=out)
    print(f"description  {v.description or '-'}", file=out)
    print(f"labels       {', '.join(f'{k}={val}' for k, val in v.labels.items()) or '-'}", file=out)
    print(f"created      {_when(v.create_time)}", file=out)
    producer = " ".join(p for p in (v.onnx.producer_name, v.onnx.producer_version) if p) or "-"
    opsets = ", ".join(f"{d or 'ai.onnx'} {n}" for d, n in v.onnx.opset_imports.items()) or "-"
    print(f"onnx         IR {v.onnx.ir_version}, opsets {opsets}, producer {producer}", file=out)
    print("inputs", file=out)
    for spec in v.signature.inputs:
        print(f"  {spec}", file=out)
    print("outputs", file=out)
    for spec in v.signature.outputs:
        print(f"  {spec}", file=out)


def cmd_models_show(ctx: Context) -> int:
    ref = ModelRef.parse(ctx.args.ref)
    with ctx.registry() as registry:
        if ref.is_latest:
            model = registry.get_model(ref.name)
            version = registry.resolve(ref) if model.latest_version else None
            if ctx.args.json:
                _print_json({"model": model, "version": version}, ctx.out)
                return 0
            _show_model(model, ctx.out)
            if version is not None:
                print(file=ctx.out)
                _show_version(version, ctx.out)
            return 0
        version = registry.resolve(ref)
    if ctx.args.json:
        _print_json(version, ctx.out)
    else:
        _show_version(version, ctx.out)
    return 0


def cmd_models_set(ctx: Context) -> int:
    """Changes a model's (NAME) or a version's (NAME:VERSION, NAME@ALIAS) description and labels, and a version's
    version label. Labels are merged: --label adds or replaces one, --unlabel removes one (a missing one is no
    change); the result is written back whole, so a concurrent change of the same labels may be lost."""
    a = ctx.args
    ref = ModelRef.parse(a.ref)
    added, removed = _labels(a.label), set(a.unlabel or ())
    if both := sorted(added.keys() & removed):
        raise UsageError(f"label {both[0]!r} is both set and removed; give it once")
    if not (added or removed) and a.description is None and a.version_label is None:
        raise UsageError("nothing to change: give --description, --label, --unlabel or --version-label")

    def merged(current: Mapping[str, str]) -> dict[str, str] | None:
        if not (added or removed):
            return None  # labels untouched: not in the update
        return {key: value for key, value in {**current, **added}.items() if key not in removed}

    with ctx.registry() as registry:
        if ref.is_latest:
            if a.version_label is not None:
                raise UsageError(f"--version-label belongs to a version: name one, as {ref.name}:VERSION")
            labels = merged(registry.get_model(ref.name).labels) if added or removed else None
            model = registry.update_model(ref.name, description=a.description, labels=labels)
            if a.json:
                _print_json(model, ctx.out)
            else:
                _show_model(model, ctx.out)
            return 0
        version = registry.resolve(ref)  # an alias is resolved once: the update goes to the version it named
        version = registry.update_version(
            ModelRef(ref.name, version=version.version),
            description=a.description,
            labels=merged(version.labels),
            version_label=a.version_label,
        )
    if a.json:
        _print_json(version, ctx.out)
    else:
        _show_version(version, ctx.out)
    return 0


def cmd_models_alias(ctx: Context) -> int:
    a = ctx.args
    with ctx.registry() as registry:
        version = registry.set_alias(a.name, a.alias, a.version)
    print(f"{a.name}@{a.alias} -> {version.version}", file=ctx.out)
    return 0


def cmd_models_unalias(ctx: Context) -> int:
    a = ctx.args
    with ctx.registry() as registry:
        previous = registry.delete_alias(a.name, a.alias)
    print(f"removed {a.name}@{a.alias} (pointed at {previous})", file=ctx.out)
    return 0


def cmd_models_archive(ctx: Context) -> int:
    with ctx.registry() as registry:
        version = registry.archive(ctx.args.ref)
    print(f"archived {version.ref}", file=ctx.out)
    return 0


def cmd_models_restore(ctx: Context) -> int:
    with ctx.registry() as registry:
        version = registry.restore(ctx.args.ref)
    print(f"restored {version.ref}", file=ctx.out)
    return 0


def cmd_models_rm(ctx: Context) -> int:
    ref = ModelRef.parse(ctx.args.ref)
    with ctx.registry() as registry:
        if ref.is_latest:
            count = registry.delete_model(ref.name, force=ctx.args.force)
            print(f"deleted model {ref.name}" + (f" and {count} version(s)" if count else ""), file=ctx.out)
            return 0
        if ctx.args.force:
            raise UsageError("--force applies to a whole model (`models rm NAME --force`), not to one version")
        name, number = ref.name, ref.version
        if number is None:
            number = registry.resolve(ref).version
        registry.delete_version(ModelRef(name, version=number))
    print(f"deleted {name}:{number}", file=ctx.out)
    return 0


def cmd_models_pull(ctx: Context) -> int:
    a = ctx.args
    ref = ModelRef.parse(a.ref)
    target = a.out or f"{ref.name}.onnx"
    bar = ProgressBar(f"downloading {ref}", ctx.err)
    with ctx.registry() as registry:
        try:
            version = registry.download(ref, target, progress=bar)
        finally:
            bar.close()
    where = Path(target) / f"{ref.name}.onnx" if Path(target).is_dir() else Path(target)
    print(f"downloaded {version.ref} to {where} (sha256 verified)", file=ctx.out)
    return 0


def cmd_models_load(ctx: Context) -> int:
    with ctx.inference() as inference:
        loaded = inference.load(ctx.args.ref)
    took = loaded.load_duration.total_seconds()
    print(
        f"loaded {loaded.model}:{loaded.version} ({loaded.state.value}, ~{_size(loaded.memory_bytes)}, {took:.2f} s)",
        file=ctx.out,
    )
    return 0


def cmd_models_unload(ctx: Context) -> int:
    with ctx.inference() as inference:
        unloaded = inference.unload(ctx.args.ref)
    for m in unloaded:
        print(f"unloaded {m.model}:{m.version}", file=ctx.out)
    return 0


def cmd_models_loaded(ctx: Context) -> int:
    with ctx.inference() as inference:
        loaded = list(inference.list_loaded(model=ctx.args.name or ""))
    if ctx.args.json:
        _print_json(loaded, ctx.out)
        return 0
    rows = [
        [f"{m.model}:{m.version}", m.state.value, _size(m.memory_bytes), str(m.in_flight), _when(m.last_used),
         ",".join(p.removesuffix("ExecutionProvider") for p in m.execution_providers), m.reason or ""]
        for m in loaded
    ]  # fmt: skip
    _table(rows, ["MODEL", "STATE", "MEMORY", "IN FLIGHT", "LAST USED", "PROVIDERS", "REASON"], ctx.out)
    return 0


def _read_inputs(specs: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    given_by: dict[str, str] = {}  # input name -> the --input that gave it
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or (Path(spec).is_file() and not Path(file).exists()):  # an archive, whose path may hold a '='
            arrays = _read_archive(Path(spec), spec)
        elif not name or not file:
            raise UsageError(f"--input takes NAME=FILE.npy, not {spec!r}")
        else:
            loaded = _load(Path(file))
            if not isinstance(loaded, np.ndarray):
                raise UsageError(
                    f"{file} is a .npz archive, whose arrays are named by their keys: give it as --input {file}, "
                    "without NAME="
                )
            arrays = {name: loaded}
        for key, array in arrays.items():
            if key in given_by:
                raise UsageError(f"input {key!r} is given twice, by --input {given_by[key]} and --input {spec}")
            given_by[key] = spec
            inputs[key] = array
    return inputs


def _read_archive(path: Path, spec: str) -> dict[str, np.ndarray[Any, Any]]:
    if path.suffix != ".npz":
        raise UsageError(f"--input takes NAME=FILE.npy or FILE.npz, not {spec!r}")
    loaded = _load(path)
    if isinstance(loaded, np.ndarray):
        raise UsageError(f"{path} holds one array, not a .npz archive: give it as --input NAME={path}")
    return loaded


def _load(path: Path) -> np.ndarray[Any, Any] | dict[str, np.ndarray[Any, Any]]:
    """The array of a .npy input file, or the arrays of a .npz one, read whole; a UsageError if it cannot be."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a .npy or .npz file")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return _arrayfiles.read(path)
    except ValueError as exc:  # says which file, and what numpy found wrong with it
        raise UsageError(str(exc)) from None


def _storable(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """`array` as a .npy file holds it without pickle, so that ``np.load`` and ``--input`` read it back.

    A string output (an object array of bytes) becomes a ``str`` array when every element is UTF-8 text, else a
    ``bytes`` array. numpy drops trailing NUL characters from both kinds, so an element ending in one is refused.
    """
    try:
        return storable(name, array)
    except ValueError as exc:
        raise UsageError(f"{exc}; read it with the Python SDK instead of --out") from None


def cmd_predict(ctx: Context) -> int:
    a = ctx.args
    if a.no_sha256 and not a.stream:
        raise UsageError("--no-sha256 applies to --stream only; a plain predict has no sha256 to skip")
    inputs = _read_inputs(a.input)
    if a.out:  # before the model runs for nothing
        _check_out_dir(Path(a.out))
    options: dict[str, Any] = {"outputs": a.output or None, "priority": a.priority, "cache": a.cache}
    with ctx.inference() as inference:
        if a.stream:
            bar = ProgressBar(f"receiving {a.ref}", ctx.err)
            try:
                prediction = inference.predict_stream(a.ref, inputs, progress=bar, verify=not a.no_sha256, **options)
            finally:
                bar.close()
        else:
            prediction = inference.predict_full(a.ref, inputs, **options)
    _report_prediction(prediction, Path(a.out) if a.out else None, ctx.out)
    return 0


def _check_output_file_names(names: Iterable[str]) -> None:
    """Refuses output names that are not a plain file name, before ``--out`` writes anything.

    The names come from the model, not from the user: saved as ``DIR/NAME.npy``, ``../../x`` or ``/tmp/x`` would
    land outside ``DIR``, and ``""``, ``.``, ``..`` or any name starting with ``.`` would make a hidden file.
    """
    for name in names:
        if name.startswith(".") or name == "" or any(c in name for c in "/\\\0"):
            raise UsageError(
                f"output {name!r} is not a plain file name, so --out cannot save it as DIR/NAME.npy; "
                "drop --out, choose the other outputs with --output, "
                "or rename the output in the model"
            )


def _check_out_dir(out_dir: Path) -> None:
    """Refuses an --out that could not be made a directory to write in: an existing file, or a path below one."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"is below {existing}, a file"
        raise UsageError(f"--out {out_dir} {where}; --out takes a directory, where each output is saved as NAME.npy")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out_dir}: {existing} is not writable here; choose another directory")


def _new_partial_file(out_dir: Path) -> tuple[int, Path]:
    """A new empty file in `out_dir` to write an output into before it is moved in place, open for writing.

    The file is created by this call (O_EXCL), so nothing is ever written through a link planted in `out_dir`, and
    its name is short and random, so every output name that fits as NAME.npy fits. Its mode is a plain open's.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    while True:
        partial = out_dir / f".{secrets.token_hex(8)}.partial"
        with contextlib.suppress(FileExistsError):  # the name is taken (a file or a link): draw another
            return os.open(partial, flags, 0o666), partial


def _save_outputs(outputs: Mapping[str, np.ndarray[Any, Any]], out_dir: Path) -> dict[str, Path]:
    """Saves every output as DIR/NAME.npy, or none: each is written beside its place, then all are moved in."""
    _check_output_file_names(outputs)
    storable_outputs = {name: _storable(name, array) for name, array in outputs.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    # A name too long fails here, before any output is moved in: not at its move, after the others'.
    longest = os.pathconf(out_dir, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    for name in storable_outputs:
        if len(os.fsencode(f"{name}.npy")) > longest:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(out_dir / f"{name}.npy"))
    written: dict[Path, Path] = {}  # partial file -> its place
    try:
        for name, array in storable_outputs.items():
            fd, partial = _new_partial_file(out_dir)
            written[partial] = out_dir / f"{name}.npy"
            with os.fdopen(fd, "wb") as f:
                np.save(f, array, allow_pickle=False)
        for partial, place in written.items():
            os.replace(partial, place)
    except BaseException:
        for partial in written:
            with contextlib.suppress(OSError):
                partial.unlink()
        raise
    return {name: out_dir / f"{name}.npy" for name in storable_outputs}


def _report_prediction(prediction: Prediction, out_dir: Path | None, out: TextIO) -> None:
    saved = _save_outputs(prediction.outputs, out_dir) if out_dir is not None else {}
    cached = ", from the cache" if prediction.cache_hit else ""
    total_ms = prediction.timings.total.total_seconds() * 1000
    print(f"{prediction.model}:{prediction.version} answered in {total_ms:.2f} ms{cached}", file=out)
    for name, array in prediction.outputs.items():
        line = f"  {name}: {array.dtype}{list(array.shape)}"
        if name in saved:
            line += f" -> {saved[name]}"
        elif array.size <= 20:
            line += f" = {np.array2string(array, separator=', ')}"
        print(line, file=out)


def cmd_stats(ctx: Context) -> int:
    with ctx.inference() as inference:
        stats = inference.statistics(ctx.args.ref)
    if ctx.args.json:
        _print_json(stats, ctx.out)
        return 0
    rows = []
    for s in stats.models:
        mean = s.total_time.total_seconds() * 1000 / s.request_count if s.request_count else 0.0
        rows.append(
            [f"{s.model}:{s.version}", str(s.request_count), str(s.failure_count), str(s.cancelled_count),
             str(s.inference_count), str(s.execution_count), f"{mean:.2f}",
             f"{s.cache_hit_count}/{s.cache_miss_count}", _when(s.last_inference_time)]
        )  # fmt: skip
    _table(
        rows,
        ["MODEL", "REQUESTS", "FAILURES", "CANCELLED", "ITEMS", "RUNS", "MEAN MS", "CACHE HIT/MISS", "LAST"],
        ctx.out,
    )
    print(f"prediction cache: {stats.cache_status.value}", file=ctx.out)
    return 0


def _job_line(status: JobStatus) -> str:
    p = status.progress
    line = f"job {status.id} {status.state.value}: {p.items_done}/{p.items_total} items"
    if status.state is JobState.RUNNING and p.items_per_second:
        line += f", {p.items_per_second:.0f} items/s"
    if status.error is not None:
        line += f"; {status.error.code} {status.error.reason}: {status.error.message}"
    if status.queued_reason:
        line += f"; {status.queued_reason}"
        if status.next_run_time is not None:
            line += f"; next run {_when(status.next_run_time)}"
    return line


def _follow(job: Job, ctx: Context) -> int:
    """Follows a job to its end: a live bar on a terminal, a line per state change otherwise (on stderr; the
    final state goes to stdout alone, once)."""
    bar = ProgressBar(f"job {job.id[:8]}", ctx.err, unit="items")
    last: JobState | None = None
    try:
        for status in job.watch():
            bar(status.progress.items_done, status.progress.items_total)
            if status.state is not last and not status.state.terminal and not ctx.err.isatty():
                print(_job_line(status), file=ctx.err)
            last = status.state
    finally:
        bar.close()
    print(_job_line(job.status), file=ctx.out)
    return 0 if job.status.state is JobState.COMPLETED else 1


def cmd_jobs_submit(ctx: Context) -> int:
    a = ctx.args
    if bool(a.input) == bool(a.dataset):
        raise UsageError("give the items with --input, or name an uploaded dataset with --dataset (one of the two)")
    inputs = _read_inputs(a.input) if a.input else None
    bar = ProgressBar("uploading the dataset", ctx.err)
    with ctx.jobs() as jobs:
        try:
            job = jobs.submit(
                a.ref,
                inputs,
                dataset=a.dataset,
                batch_size=a.batch_size,
                priority=a.priority,
                labels=_labels(a.label),
                max_attempts=a.max_attempts,
                time_limit=a.time_limit,
                request_id=a.request_id,
                progress=bar,
            )
        finally:
            bar.close()
        print(f"submitted job {job.id} ({job.status.model_ref} resolved to version {job.status.model_version})",
              file=ctx.out)  # fmt: skip
        if a.wait:
            return _follow(job, ctx)
    return 0


def _input_line(status: JobStatus) -> str:
    if not status.dataset_deleted:
        return f"dataset {status.dataset_id}" if status.dataset_id else "inline"
    # A dataset deleted before ModelForge kept the id of a job's dataset (jobs migration 0005) left none.
    return f"dataset {status.dataset_id} (deleted since)" if status.dataset_id else "a dataset, deleted since"


def cmd_jobs_ls(ctx: Context) -> int:
    a = ctx.args
    with ctx.jobs() as jobs:
        listed = [j.status for j in jobs.list_jobs(state=a.state, model=a.model or "", labels=_labels(a.label))]
    if a.json:
        _print_json(listed, ctx.out)
        return 0
    rows = [
        [s.id, f"{s.model_ref.name}:{s.model_version}", s.state.value,
         f"{s.progress.items_done}/{s.progress.items_total}", _when(s.create_time)]
        for s in listed
    ]  # fmt: skip
    _table(rows, ["ID", "MODEL", "STATE", "ITEMS", "CREATED"], ctx.out)
    return 0


def cmd_jobs_datasets(ctx: Context) -> int:
    with ctx.jobs() as jobs:
        listed = list(jobs.list_datasets(labels=_labels(ctx.args.label)))
    if ctx.args.json:
        _print_json(listed, ctx.out)
        return 0
    rows = [[d.id, d.display_name or "-", str(d.item_count), _size(d.size_bytes), _when(d.create_time)] for d in listed]
    _table(rows, ["ID", "NAME", "ITEMS", "SIZE", "CREATED"], ctx.out)
    return 0


def cmd_jobs_rm_dataset(ctx: Context) -> int:
    with ctx.jobs() as jobs:
        jobs.delete_dataset(ctx.args.id)
    print(f"deleted dataset {ctx.args.id}", file=ctx.out)
    return 0


def cmd_jobs_show(ctx: Context) -> int:
    with ctx.jobs() as jobs:
        s = jobs.get_job(ctx.args.id).status
    if ctx.args.json:
        _print_json(s, ctx.out)
        return 0
    p = s.progress
    print(f"job          {s.id}", file=ctx.out)
    print(f"model        {s.model_ref} (version {s.model_version})", file=ctx.out)
    print(f"state        {s.state.value}", file=ctx.out)
    print(
        f"progress     {p.items_done}/{p.items_total} items, {p.batches_done}/{p.batches_total} batches", file=ctx.out
    )
    print(f"input        {_input_line(s)}", file=ctx.out)
    print(f"batch size   {s.batch_size}, priority {s.priority.value}", file=ctx.out)
    print(f"attempts     {s.attempt_count} of {s.max_attempts}", file=ctx.out)
    print(f"created      {_when(s.create_time)}", file=ctx.out)
    print(f"started      {_when(s.start_time)}", file=ctx.out)
    print(f"finished     {_when(s.finish_time)}", file=ctx.out)
    if s.error is not None:
        print(f"error        {s.error.code} {s.error.reason}: {s.error.message}", file=ctx.out)
    if s.queued_reason:
        print(f"queued again {s.queued_reason}", file=ctx.out)
        print(f"next run     {_when(s.next_run_time)}", file=ctx.out)
    return 0


def cmd_jobs_watch(ctx: Context) -> int:
    with ctx.jobs() as jobs:
        return _follow(jobs.get_job(ctx.args.id), ctx)


def cmd_jobs_cancel(ctx: Context) -> int:
    with ctx.jobs() as jobs:
        status = jobs.get_job(ctx.args.id).cancel()
    print(_job_line(status), file=ctx.out)
    return 0


def cmd_jobs_retry(ctx: Context) -> int:
    with ctx.jobs() as jobs:
        status = jobs.get_job(ctx.args.id).retry()
    print(_job_line(status), file=ctx.out)
    return 0


def cmd_jobs_rm(ctx: Context) -> int:
    """Deletes a job; with --dataset, the dataset it read too. Without, says that the dataset stays."""
    with ctx.jobs() as jobs:
        job = jobs.get_job(ctx.args.id)
        deleted = job.delete()
        print(f"deleted job {ctx.args.id} and the outputs of {deleted} items", file=ctx.out)
        dataset = job.status.dataset_id
        if not dataset:
            return 0
        if not ctx.args.dataset:
            print(f"its dataset {dataset} stays, for other jobs: `modelforge jobs rm-dataset {dataset}` deletes it",
                  file=ctx.out)  # fmt: skip
            return 0
        try:
            jobs.delete_dataset(dataset)
        except NotFoundError:
            print(f"its dataset {dataset} had been deleted already", file=ctx.out)
            return 0
    print(f"deleted dataset {dataset}", file=ctx.out)
    return 0


def cmd_jobs_result(ctx: Context) -> int:
    out = Path(ctx.args.out)
    if out.is_dir() or not out.name:  # before the outputs are fetched for nothing
        raise UsageError(f"--out {ctx.args.out} is a directory; give the .npz file to write")
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")  # as numpy.savez would name it; said so below
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the .npz file to write")
    with ctx.jobs() as jobs:  # streamed to the file as it arrives: the result need not fit in memory
        saved = jobs.get_job(ctx.args.id).save_result(out, timeout=ctx.args.wait_timeout)
    summary = ", ".join(f"{name} {dtype}{list(shape)}" for name, (dtype, shape) in saved.items())
    print(f"wrote {summary} to {out}", file=ctx.out)
    return 0


# --- the parser ----------------------------------------------------------------------------------------------


def _address_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default = None if top else argparse.SUPPRESS  # flags work before or after the command
    group = parser.add_argument_group("where the services are")
    group.add_argument(
        "--registry",
        metavar="HOST:PORT",
        default=default,
        help="registry address (default: $MODELFORGE_REGISTRY_ADDRESS or 127.0.0.1:50051)",
    )
    group.add_argument(
        "--inference",
        metavar="HOST:PORT",
        default=default,
        help="inference address (default: $MODELFORGE_INFERENCE_ADDRESS or 127.0.0.1:50052)",
    )
    group.add_argument(
        "--jobs",
        metavar="HOST:PORT",
        default=default,
        help="jobs address (default: $MODELFORGE_JOBS_ADDRESS or 127.0.0.1:50053)",
    )
    group.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=30.0 if top else argparse.SUPPRESS,
                       help="limit in seconds for each call (default: 30), except streamed transfers, which take as "
                            "long as they need: models push and pull, dataset uploads, job results, and following a "
                            "job (--wait, jobs watch); predict --stream has it for the model's run and then for each "
                            "wait for the next chunk")  # fmt: skip


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of {minimum} or more"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {bounds}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


_PORT = _whole(1, 65535)
_PORT_OR_OFF = _whole(0, 65535)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, for ``main`` and for documentation tools."""
    parser = argparse.ArgumentParser(
        prog="modelforge", description="Run ModelForge, manage its models, run predictions and batch jobs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('modelforge')}")
    _address_flags(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _address_flags(common, top=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = commands.add_parser("up", help="run the registry, inference and jobs services (and PostgreSQL/Redis)",
                             description="Start the suite on this machine: embedded PostgreSQL and Redis unless "
                             "MODELFORGE_DATABASE_URL / MODELFORGE_REDIS_URL are set, data under "
                             "MODELFORGE_DATA_DIR (default ./.modelforge). Ctrl-C stops everything.")  # fmt: skip
    up.add_argument("--host", metavar="HOST", help="interface to listen on (default: $MODELFORGE_HOST or 127.0.0.1)")
    up.add_argument("--registry-port", type=_PORT, metavar="PORT", help="default 50051")
    up.add_argument("--inference-port", type=_PORT, metavar="PORT", help="default 50052")
    up.add_argument("--jobs-port", type=_PORT, metavar="PORT", help="default 50053")
    up.add_argument("--metrics-port", type=_PORT_OR_OFF, metavar="PORT",
                    help="the first of the /metrics ports: registry, inference, jobs, then the workers count up from "
                    "the next (default: $MODELFORGE_METRICS_PORT, else 9101-9104; 0: none)")  # fmt: skip
    up.add_argument("--worker-metrics-port", type=_PORT_OR_OFF, metavar="PORT",
                    help="the first jobs worker's /metrics port, the next ones counting up (default: "
                    "$MODELFORGE_WORKER_METRICS_PORT, else after the services'; 0: none)")  # fmt: skip
    up.add_argument("--only", nargs="+", metavar="SERVICE", choices=["registry", "inference", "jobs"],
                    help="run only these: registry, inference, jobs")  # fmt: skip
    up.add_argument(
        "--workers", type=_whole(0), default=1, metavar="N", help="jobs worker processes (default 1; 0: none)"
    )
    up.add_argument("--inference-replicas", type=_whole(1), default=1, metavar="N",
                    help="inference processes sharing its port, to use more cores (Linux; default 1)")  # fmt: skip
    up.set_defaults(run=cmd_up)

    models = commands.add_parser("models", help="push, list, show, label, alias, archive and delete models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    p = sub.add_parser("push", parents=[common], help="upload an ONNX file as a model's next version")
    p.add_argument("file", metavar="FILE.onnx")
    p.add_argument("--name", required=True, metavar="NAME", help="the model (created if it does not exist)")
    p.add_argument("--alias", metavar="ALIAS", help="point this alias at the new version")
    p.add_argument("--description", default="", metavar="TEXT", help="free text for the version")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label for the version (repeatable)")
    p.add_argument("--version-label", default="", metavar="TEXT", help="a free-form label such as a semver")
    p.add_argument("--no-create", action="store_true", help="fail if the model does not exist")
    p.add_argument("--json", action="store_true", help="print the new version as JSON")
    p.set_defaults(run=cmd_models_push)

    p = sub.add_parser("ls", parents=[common], help="list models, or the versions of one model")
    p.add_argument("name", nargs="?", metavar="NAME", help="list this model's versions, newest first")
    p.add_argument("--prefix", metavar="TEXT", help="only models whose name starts with this")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="only models with this label")
    p.add_argument("--state", choices=["READY", "ARCHIVED"], help="only versions in this state")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_models_ls)

    p = sub.add_parser("show", parents=[common], help="show a model or a version: NAME, NAME:VERSION, NAME@ALIAS")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_models_show)

    p = sub.add_parser(
        "set",
        parents=[common],
        help="change the description or labels of a model (NAME) or a version (NAME:VERSION or NAME@ALIAS)",
    )
    p.add_argument("ref", metavar="REF", help="NAME for the model; NAME:VERSION or NAME@ALIAS for a version")
    p.add_argument("--description", metavar="TEXT", help="replace the description ('' clears it)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="add or replace a label (repeatable)")
    p.add_argument("--unlabel", action="append", metavar="KEY", help="remove a label (repeatable)")
    p.add_argument("--version-label", metavar="TEXT", help="replace a version's free-form label, such as a semver")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_models_set)

    p = sub.add_parser("alias", parents=[common], help="point an alias at a version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", type=_whole(1, MAX_VERSION), metavar="VERSION")
    p.add_argument("alias", metavar="ALIAS")
    p.set_defaults(run=cmd_models_alias)

    p = sub.add_parser("unalias", parents=[common], help="remove an alias")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.set_defaults(run=cmd_models_unalias)

    p = sub.add_parser("archive", parents=[common], help="archive a version (NAME:VERSION or NAME@ALIAS)")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(run=cmd_models_archive)

    p = sub.add_parser("restore", parents=[common], help="make an archived version READY again")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(run=cmd_models_restore)

    p = sub.add_parser("rm", parents=[common], help="delete a version (NAME:VERSION) or a whole model (NAME)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--force", action="store_true", help="with NAME: also delete its versions and aliases")
    p.set_defaults(run=cmd_models_rm)

    p = sub.add_parser("pull", parents=[common], help="download a version's file, verifying its sha256")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--out", metavar="FILE.onnx|DIR", help="file or directory to write (default: ./NAME.onnx)")
    p.set_defaults(run=cmd_models_pull)

    p = sub.add_parser("load", parents=[common], help="load a version into the inference service now")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(run=cmd_models_load)

    p = sub.add_parser("unload", parents=[common], help="unload a version (or, with NAME, all its versions)")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(run=cmd_models_unload)

    p = sub.add_parser("loaded", parents=[common], help="list the versions the inference service holds")
    p.add_argument("name", nargs="?", metavar="NAME", help="only this model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_models_loaded)

    p = commands.add_parser("predict", parents=[common], help="run a model on inputs from .npy/.npz files")
    p.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input (repeatable; none for a model without inputs); FILE.npz gives every array in it, "
                        "by name")  # fmt: skip
    p.add_argument("--output", action="append", metavar="NAME", help="return only this output (repeatable)")
    p.add_argument("--out", metavar="DIR", help="save each output as DIR/NAME.npy")
    p.add_argument("--stream", action="store_true", help="receive the outputs as a stream (large outputs)")
    p.add_argument("--no-sha256", action="store_true",
                   help="with --stream: neither end hashes the outputs (saves CPU; sizes are checked)")  # fmt: skip
    p.add_argument("--priority", type=_whole(0, INT32_MAX), default=0, metavar="N",
                   help="queue priority: 1 the most urgent, up to the model's number of levels; 0 (the default) "
                   "and larger numbers, the least urgent level")  # fmt: skip
    p.add_argument("--cache", choices=["use", "bypass", "refresh"], help="what to do with the prediction cache")
    p.set_defaults(run=cmd_predict)

    p = commands.add_parser("stats", parents=[common], help="request counters of the inference service")
    p.add_argument("ref", nargs="?", metavar="REF", help="one model (NAME) or version (NAME:VERSION)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_stats)

    jobs = commands.add_parser("jobs", help="submit batch jobs, follow them and fetch their results")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    p = sub.add_parser("submit", parents=[common], help="run a model over the items of .npz/.npy files")
    p.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS (pinned to its version now)")
    p.add_argument("--input", action="append", metavar="FILE.npz|NAME=FILE.npy",
                   help="the items: every array of FILE.npz by name, or one input per NAME=FILE.npy")  # fmt: skip
    p.add_argument("--dataset", metavar="ID", help="run over a dataset uploaded before (see `jobs datasets`)")
    p.add_argument(
        "--batch-size",
        type=_whole(0, INT32_MAX),
        default=0,
        metavar="N",
        help="items per inference request (default: the server's, or what the model fixes)",
    )
    p.add_argument("--priority", choices=["low", "normal", "high"], help="queue priority")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label for the job (repeatable)")
    p.add_argument(
        "--max-attempts",
        type=_whole(0, INT32_MAX),
        default=0,
        metavar="N",
        help="runs the job may start (default: the server's)",
    )
    p.add_argument("--time-limit", type=_seconds, metavar="SECONDS", help="how long one run may take")
    p.add_argument(
        "--request-id",
        metavar="ID",
        help="makes the submission safe to repeat (a script run again): the same ID with the same arguments and "
        "items answers the job it made; with anything else, an error",
    )
    p.add_argument("--wait", action="store_true", help="follow the job to its end; exit 1 unless it COMPLETED")
    p.set_defaults(run=cmd_jobs_submit)

    p = sub.add_parser("ls", parents=[common], help="list jobs, newest first")
    p.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    p.add_argument("--model", metavar="NAME", help="only jobs of this model")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="only jobs with this label")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_jobs_ls)

    p = sub.add_parser("datasets", parents=[common], help="list uploaded datasets, newest first")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="only datasets with this label")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_jobs_datasets)

    p = sub.add_parser("rm-dataset", parents=[common], help="delete an uploaded dataset no job uses")
    p.add_argument("id", metavar="ID")
    p.set_defaults(run=cmd_jobs_rm_dataset)

    for name, helptext, run in (
        ("show", "show a job", cmd_jobs_show),
        ("watch", "follow a job's progress to its end; exit 1 unless it COMPLETED", cmd_jobs_watch),
        (
            "cancel",
            "cancel a job (a running one stops within a heartbeat interval, its batches in flight cancelled)",
            cmd_jobs_cancel,
        ),
        ("retry", "run a FAILED or CANCELLED job again from its first unfinished batch", cmd_jobs_retry),
        ("rm", "delete a finished job and its results", cmd_jobs_rm),
    ):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("id", metavar="ID")
        if name == "show":
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "rm":
            p.add_argument("--dataset", action="store_true",
                           help="also delete the dataset the job read, unless another queued or running job reads "
                           "it (submit uploads one for inputs over 4 MiB or from a file)")  # fmt: skip
        p.set_defaults(run=run)

    p = sub.add_parser("result", parents=[common], help="save a COMPLETED job's outputs as .npz")
    p.add_argument("id", metavar="ID")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the outputs")
    p.add_argument("--wait-timeout", type=_seconds, metavar="SECONDS", help="wait at most this long for the job")
    p.set_defaults(run=cmd_jobs_result)
    return parser


# The SDK's advice on a message over gRPC's size limit names SDK arguments; the command has advice of its own.
_SIZE_LIMIT_HINTS = {
    REQUEST_TOO_LARGE_HINT: (
        "; the inputs are larger than one request may be: send fewer items per request, or run them as a batch job "
        "(`modelforge jobs submit`)"
    ),
    ANSWER_TOO_LARGE_HINT: (
        f"; the answer is larger than one message may be ({DEFAULT_MAX_MESSAGE_BYTES // MiB} MiB): receive it with "
        "--stream, or ask for fewer outputs (--output) or items"
    ),
}


def _error_line(exc: ModelForgeError, ctx: Context | None) -> str:
    for sdk_hint, hint in _SIZE_LIMIT_HINTS.items():
        if exc.details.endswith(sdk_hint):
            return exc.details.removesuffix(sdk_hint) + hint
    # UNAVAILABLE without a reason is the transport's: the service was not reached. With one, the service answered.
    if isinstance(exc, UnavailableError) and not exc.reason and ctx is not None and ctx.service is not None:
        service = ctx.service
        where = ctx.target(service)
        details = exc.details.removesuffix(UNREACHABLE_HINT) or str(exc)  # the SDK's advice, said here for the CLI
        return (
            f"cannot reach the {service.key} service at {where}: {details}. Is `modelforge up` "
            f"running? Point to it with --{service.key} or {service.env_var}."
        )
    # DEADLINE_EXCEEDED without a reason is the client's own deadline (--timeout), not a queue timeout.
    if (
        isinstance(exc, DeadlineExceededError)
        and not exc.reason
        and ctx is not None
        and getattr(ctx.args, "timeout", None)
    ):
        details = exc.details.removesuffix(DEADLINE_HINT) or str(exc)
        return f"{details} (--timeout was {ctx.args.timeout:g} s: raise it where the service needs longer)"
    # UNIMPLEMENTED without a reason: something answered at that address, but not this service.
    if isinstance(exc, UnimplementedError) and not exc.reason and ctx is not None and ctx.service is not None:
        service = ctx.service
        return (
            f"the server at {ctx.target(service)} does not offer {service.full_name} ({exc.details or exc}): is that "
            f"the {service.key} service's address? Point to it with --{service.key} or {service.env_var}."
        )
    return str(exc)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs the ``modelforge`` command and returns its exit status (the console script exits with it)."""
    out = out or sys.stdout
    err = err or sys.stderr
    ctx: Context | None = None
    try:
        # In the try: a Ctrl-C while the parser is built or reads the line ends as one in the command does.
        args = build_parser().parse_args(argv)
        ctx = Context(args, out, err)
        run: Callable[[Context], int] = args.run
        return run(ctx)
    except UsageError as exc:
        print(f"modelforge: {exc}", file=err)
        return 2
    except ModelForgeError as exc:
        print(f"modelforge: {_error_line(exc, ctx)}", file=err)
        return 1
    except ValueError as exc:  # a malformed reference, label or input caught before any call
        print(f"modelforge: {exc}", file=err)
        return 2
    except TimeoutError as exc:
        print(f"modelforge: {exc}", file=err)
        return 1
    except BrokenPipeError:
        # The reader of the output went away (`modelforge models ls | head`): stop without a word, as other tools
        # do, and send what is still buffered for it nowhere, rather than fail again when Python flushes at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 128 + signal.SIGPIPE  # what a shell reports for a command that a closed pipe ended
    except OSError as exc:
        print(f"modelforge: {exc.strerror or exc}: {exc.filename}" if exc.filename else f"modelforge: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        print("modelforge: interrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())

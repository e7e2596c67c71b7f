"""ONNX Runtime sessions from a version's labels: thread counts, optimisation level and spinning reach the
SessionOptions the session is built with, bad values are refused by name, providers this build lacks fall back to
the CPU with a warning, and ONNX Runtime's errors reach clients without boilerplate or the server's file paths."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import cpus
from modelforge_inference import serving
from modelforge_inference.domain import ResolvedModel, SessionConfig, Signature, TensorSpec
from modelforge_inference.errors import InvalidServingConfig
from modelforge_inference.sessions import (
    INPUT_ERRORS,
    ModelSession,
    providers,
    quiet_default_logger,
    run_options,
    session_options,
    terminate,
)
from modelforge_inference.settings import InferenceSettings
from modelforge_server import serving_labels
from modelforge_server.errors import FailedPrecondition
from modelforge_server.runtime_errors import describe_error
from modelforge_server.settings import SettingsError
from tests.fixtures.onnx_models import build_add_one, build_counter, build_custom_op, build_multi_io, write_model

SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
CPU = "CPUExecutionProvider"
AVAILABLE = ort.get_available_providers()
# Providers ONNX Runtime knows of but this build lacks, GPU ones first (a CPU-only wheel lacks both).
MISSING = sorted(
    set(ort.get_all_providers()) - set(AVAILABLE),
    key=lambda name: (name not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"), name),
)
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _model(labels: dict[str, str]) -> ResolvedModel:
    spec = TensorSpec("x", np.dtype("<f4"), (-1, 4))
    return ResolvedModel("m", 1, "ab" * 32, 10, Signature((spec,), (spec,)), labels=labels)


def _config(labels: dict[str, str], settings: InferenceSettings | None = None) -> SessionConfig:
    return serving.serving_config(serving.defaults(settings or InferenceSettings()), _model(labels)).session


@pytest.mark.parametrize(("labels", "expected"), [({}, "0"), ({"modelforge.io/allow-spinning": "true"}, "1")])
def test_spinning_is_off_unless_the_version_label_turns_it_on(labels: dict[str, str], expected: str) -> None:
    options = session_options(_config(labels))
    assert [options.get_session_config_entry(key) for key in SPINNING] == [expected, expected]


@pytest.mark.parametrize(("labels", "expected"), [({}, True), ({"modelforge.io/memory-arena": "false"}, False)])
def test_the_memory_arena_stays_unless_the_version_label_turns_it_off(labels: dict[str, str], expected: bool) -> None:
    assert session_options(_config(labels)).enable_cpu_mem_arena is expected


def test_a_bad_allow_spinning_label_is_refused() -> None:
    with pytest.raises(InvalidServingConfig):
        _config({"modelforge.io/allow-spinning": "maybe"})


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_thread_and_optimisation_labels_reach_the_session_options(level: str) -> None:
    labels = {
        "modelforge.io/intra-op-threads": "3",
        "modelforge.io/inter-op-threads": "2",
        "modelforge.io/graph-optimization-level": level,
    }

    options = session_options(_config(labels))

    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 2)
    assert options.graph_optimization_level == LEVELS[level]


def test_preferred_batch_sizes_of_the_settings_past_a_versions_max_batch_size_are_left_out() -> None:
    settings = InferenceSettings(max_batch_size=64, preferred_batch_sizes=("8", "32", "64"))
    labels = {"modelforge.io/max-batch-size": "16"}
    batching = serving.serving_config(serving.defaults(settings), _model(labels)).batching
    assert (batching.max_batch_size, batching.preferred_batch_sizes) == (16, (8,))


def test_without_labels_the_server_settings_apply() -> None:
    settings = InferenceSettings(intra_op_threads=5, inter_op_threads=4, graph_optimization_level="extended")

    options = session_options(_config({"team": "vision"}, settings))

    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (5, 4)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def test_the_session_is_built_with_the_labelled_options(tmp_path: Path) -> None:
    path = write_model(build_add_one(), tmp_path / "model.onnx")
    labels = {
        "modelforge.io/intra-op-threads": "2",
        "modelforge.io/inter-op-threads": "3",
        "modelforge.io/graph-optimization-level": "basic",
        "modelforge.io/allow-spinning": "true",
        "modelforge.io/memory-arena": "false",
    }

    built = ModelSession(path, _config(labels)).session.get_session_options()
    assert built.enable_cpu_mem_arena is False

    assert (built.intra_op_num_threads, built.inter_op_num_threads) == (2, 3)
    assert built.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert [built.get_session_config_entry(key) for key in SPINNING] == ["1", "1"]
    assert built.execution_mode == ort.ExecutionMode.ORT_PARALLEL  # the inter-op pool exists in this mode only


@pytest.mark.parametrize(("inter_op", "added"), [("1", 0), ("4", 3)])
def test_inter_op_threads_make_a_pool_of_their_own(tmp_path: Path, inter_op: str, added: int) -> None:
    """The caller's thread is the pool's first, as ONNX Runtime counts threads: N inter-op threads add N - 1."""
    path = write_model(build_multi_io(), tmp_path / "model.onnx")
    labels = {"modelforge.io/intra-op-threads": "1", "modelforge.io/inter-op-threads": inter_op}
    before = len(os.listdir("/proc/self/task"))
    session = ModelSession(path, _config(labels))
    assert len(os.listdir("/proc/self/task")) - before == added
    del session


def test_labels_other_than_serving_options_leave_the_config_equal() -> None:
    """The engine reloads a version whose labels change only when its ServingConfig changes (engine._acquire)."""
    base = serving.defaults(InferenceSettings())

    first = serving.serving_config(base, _model({"team": "vision", "modelforge.io/unknown-tool-key": "x"}))
    second = serving.serving_config(base, _model({"team": "search"}))
    changed = serving.serving_config(base, _model({"modelforge.io/intra-op-threads": "2"}))

    assert first == second == base
    assert changed != base


@pytest.mark.parametrize(
    ("label", "value", "expected"),
    [
        ("intra-op-threads", "-1", "an integer from 0 to 1024"),
        ("intra-op-threads", "two", "an integer from 0 to 1024"),
        ("intra-op-threads", "1.5", "an integer from 0 to 1024"),
        ("intra-op-threads", "", "an integer from 0 to 1024"),
        ("intra-op-threads", "1025", "an integer from 0 to 1024"),
        ("inter-op-threads", "-3", "an integer from 0 to 1024"),
        ("inter-op-threads", "100000", "an integer from 0 to 1024"),
        ("priority-levels", "0", "an integer from 1 to 256"),
        ("priority-levels", "1000000000", "an integer from 1 to 256"),
        ("graph-optimization-level", "ALL", "disabled | basic | extended | all"),
        ("graph-optimization-level", "ORT_ENABLE_ALL", "disabled | basic | extended | all"),
        ("graph-optimization-level", "", "disabled | basic | extended | all"),
    ],
)
def test_a_bad_serving_label_is_refused_by_name(label: str, value: str, expected: str) -> None:
    key = serving.PREFIX + label

    with pytest.raises(InvalidServingConfig) as caught:
        _config({key: value})

    error = caught.value
    assert isinstance(error, FailedPrecondition)  # the stored version is wrong, not the request: FAILED_PRECONDITION
    assert error.reason == "INVALID_SERVING_CONFIG"
    assert error.metadata == {"model": "m", "version": "1", "label": key}
    assert str(error) == (
        f"m:1 has label {key}={value!r}, but it takes {expected}; fix the label with UpdateModelVersion "
        "(the SDK's RegistryClient.update_version) or push a new version"
    )


def test_every_serving_label_sets_a_field_of_the_serving_config() -> None:
    assert serving._FIELDS.keys() == serving_labels.LABELS.keys()
    for name in serving_labels.LABELS:
        section, field = serving._FIELDS[name]
        assert field in {f.name for f in dataclasses.fields(getattr(serving.defaults(InferenceSettings()), section))}


@pytest.mark.parametrize(
    ("setting", "value", "variable"),
    [
        ("graph_optimization_level", "ALL", "MODELFORGE_GRAPH_OPTIMIZATION_LEVEL"),
        ("intra_op_threads", -1, "MODELFORGE_INTRA_OP_THREADS"),
        ("inter_op_threads", -2, "MODELFORGE_INTER_OP_THREADS"),
        ("intra_op_threads", 4096, "MODELFORGE_INTRA_OP_THREADS"),
        ("priority_levels", 0, "MODELFORGE_PRIORITY_LEVELS"),
        ("priority_levels", 10**9, "MODELFORGE_PRIORITY_LEVELS"),
    ],
)
def test_a_bad_server_wide_session_setting_is_refused_at_start(setting: str, value: object, variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        serving.defaults(InferenceSettings(**{setting: value}))  # type: ignore[arg-type]

    assert str(caught.value).startswith(f"{variable}={value!r} is invalid: it takes ")


def test_missing_providers_fall_back_to_the_cpu_with_a_warning_naming_each(caplog: pytest.LogCaptureFixture) -> None:
    missing = MISSING[:2]
    assert len(missing) == 2 and not set(missing) & set(AVAILABLE)
    caplog.set_level(logging.WARNING, logger="modelforge.inference.sessions")

    chosen = providers(SessionConfig(execution_providers=tuple(missing)), "resnet:3")

    assert chosen == [CPU]
    warnings = [r.getMessage() for r in caplog.records if r.name == "modelforge.inference.sessions"]
    assert len(warnings) == 2
    for provider, message in zip(missing, warnings, strict=True):
        assert message.startswith(f"execution provider {provider} is not available in this ONNX Runtime build")
        assert message.endswith("resnet:3 runs on the CPU instead")
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_the_session_runs_on_the_cpu_when_its_provider_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_model(build_add_one(), tmp_path / "model.onnx")
    caplog.set_level(logging.WARNING, logger="modelforge.inference.sessions")

    session = ModelSession(path, _config({"modelforge.io/execution-providers": f"{MISSING[0]},{CPU}"}))

    assert session.session.get_providers() == [CPU]
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == [f"execution provider {MISSING[0]}"]
    out = session.run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(out["y"], np.ones((1, 4), np.float32))


@pytest.mark.skipif("AzureExecutionProvider" not in AVAILABLE, reason="needs a second provider in this build")
def test_a_session_is_cpu_only_unless_another_provider_takes_part(tmp_path: Path) -> None:
    # Only a CPU-only version may run on the event loop: a device's run can wait off the thread's CPU clock.
    path = write_model(build_add_one(), tmp_path / "model.onnx")
    assert ModelSession(path, _config({})).cpu_only
    other = ModelSession(path, _config({"modelforge.io/execution-providers": f"AzureExecutionProvider,{CPU}"}))
    assert other.session.get_providers() == ["AzureExecutionProvider", CPU]
    assert not other.cpu_only


def test_available_providers_keep_their_configured_order_once_each_and_end_with_the_cpu() -> None:
    backwards = tuple(reversed(AVAILABLE))

    assert providers(SessionConfig(execution_providers=backwards)) == list(backwards)
    assert providers(SessionConfig(execution_providers=(*backwards, MISSING[0], *backwards))) == list(backwards)
    others = tuple(name for name in AVAILABLE if name != CPU)
    assert providers(SessionConfig(execution_providers=others)) == [*others, CPU]
    assert providers(SessionConfig(execution_providers=())) == [CPU]


def test_a_load_error_is_described_without_boilerplate_or_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "secret-dir" / "model.onnx"
    write_model(build_custom_op(), path)

    with pytest.raises(INPUT_ERRORS) as caught:
        ModelSession(path, SessionConfig())

    assert str(path) in str(caught.value)  # ONNX Runtime's own message names the file ...
    assert describe_error(caught.value) == "Fatal error: com.example.custom:FancyOp(-1) is not a registered function/op"


def test_a_run_error_is_described_without_boilerplate(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"], name="add")],
        "add",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["a", "b"]) for name in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = write_model(model, tmp_path / "m.onnx")
    session = ModelSession(path, SessionConfig())

    with pytest.raises(INPUT_ERRORS) as caught:  # dynamic dimensions that do not broadcast: past any signature check
        session.run({"x": np.ones((2, 3), np.float32), "z": np.ones((2, 4), np.float32)})

    assert str(caught.value).startswith("[ONNXRuntimeError] : 1 : FAIL : ")
    assert describe_error(caught.value).startswith("Non-zero status code returned while running Add node. Name:'add'")
    assert describe_error(ValueError(" not from ONNX Runtime ")) == "not from ONNX Runtime"


@pytest.mark.parametrize("rows", [3, 30_000], ids=["copied", "bound"])  # 30,000 rows of scores: 360 KB
def test_outputs_given_arrays_are_written_into_them_and_the_others_come_back_as_usual(
    tmp_path: Path, rows: int
) -> None:
    session = ModelSession(write_model(build_multi_io(), tmp_path / "m.onnx"), SessionConfig())
    rng = np.random.default_rng(0)
    feeds = {"features": rng.random((rows, 4), np.float32), "ids": rng.integers(0, 9, (rows, 2), np.int64)}
    expected = session.run(feeds)
    scores = np.full((rows, 3), np.nan, np.float32)

    outputs = session.run(feeds, into={"scores": scores})

    assert outputs["scores"] is scores
    np.testing.assert_array_equal(scores, expected["scores"])
    np.testing.assert_array_equal(outputs["id_sum"], expected["id_sum"])
    assert not np.shares_memory(outputs["id_sum"], scores)


def _reshape_model(tmp_path: Path) -> ModelSession:
    """y = Reshape(x, shape): its signature promises y [-1, 4], which holds only while shape says so."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ModelSession(write_model(model, tmp_path / "reshape.onnx"), SessionConfig())


X = np.arange(4 * 16384, dtype=np.float32).reshape(16384, 4)  # 256 KiB: large enough to be bound


def test_an_output_that_breaks_its_promised_shape_runs_unbound_and_its_array_stays_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = _reshape_model(tmp_path)
    target = np.full(X.shape, -1.0, np.float32)

    with caplog.at_level(logging.WARNING, logger="modelforge.inference.sessions"):
        outputs = session.run({"x": X, "shape": np.array([8192, 8], np.int64)}, into={"y": target})

    assert "cannot be bound to shared memory" in caplog.text
    assert outputs["y"].shape == (8192, 8) and outputs["y"] is not target
    np.testing.assert_array_equal(outputs["y"], X.reshape(8192, 8))
    assert np.all(target == -1.0)
    # The session binds no more: later runs copy into the arrays they are given.
    caplog.clear()
    fitting = session.run({"x": X, "shape": np.array(X.shape, np.int64)}, into={"y": target})
    assert fitting["y"] is target
    np.testing.assert_array_equal(target, X)
    session.run({"x": X, "shape": np.array([8192, 8], np.int64)}, into={"y": target})
    assert "cannot be bound" not in caplog.text


def test_a_bad_input_fails_the_bound_run_as_it_fails_the_unbound_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = _reshape_model(tmp_path)
    target = np.zeros(X.shape, np.float32)

    with pytest.raises(INPUT_ERRORS, match="Reshape"):
        session.run({"x": X, "shape": np.array([3, 3], np.int64)}, into={"y": target})
    with caplog.at_level(logging.WARNING, logger="modelforge.inference.sessions"):
        outputs = session.run({"x": X, "shape": np.array(X.shape, np.int64)}, into={"y": target})
        session.run({"x": X, "shape": np.array([8192, 8], np.int64)}, into={"y": target})

    assert outputs["y"] is target
    np.testing.assert_array_equal(outputs["y"], X)
    assert "cannot be bound" in caplog.text  # still binding after the bad input: the shape break is noticed


@pytest.mark.parametrize("into", [False, True], ids=["plain", "bound"])
def test_terminate_stops_a_run_under_way_from_another_thread(tmp_path: Path, into: bool) -> None:
    session = ModelSession(write_model(build_counter(), tmp_path / "counter.onnx"), _config({}))
    x = np.zeros(65536, np.float32)  # 256 KiB: with `into`, the output is bound
    assert session.run({"x": x, "steps": np.array([3])})["y"][0] == 3
    options = run_options()
    outcome: list[BaseException | dict[str, np.ndarray]] = []

    def endless() -> None:  # 10**12 steps: without terminate, hours
        arrays = {"y": np.empty_like(x)} if into else None
        try:
            outcome.append(session.run({"x": x, "steps": np.array([10**12])}, arrays, options))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=endless)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()
    terminate(options)
    thread.join(30)

    assert not thread.is_alive()
    assert isinstance(outcome[0], INPUT_ERRORS)
    assert "terminate" in str(outcome[0])
    assert session.run({"x": x, "steps": np.array([2])})["y"][0] == 2  # the session's own options stay untouched


def test_a_session_is_proven_by_its_first_completed_run_not_by_failed_ones(tmp_path: Path) -> None:
    session = _reshape_model(tmp_path)
    assert not session.proven
    with pytest.raises(INPUT_ERRORS):
        session.run({"x": X[:2], "shape": np.array([3, 3])})
    assert not session.proven

    session.run({"x": X[:2], "shape": np.array([2, 4])})

    assert session.proven


def test_a_model_declaring_huge_fixed_inputs_loads_without_a_warmup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 100,000 x 100,000 float32 zeros would be 40 GB: the warmup is skipped instead of allocated (or failing).
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100_000, 100_000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100_000, 100_000])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ModelSession(write_model(model, tmp_path / "huge.onnx"), _config({}))
    huge = TensorSpec("x", np.dtype(np.float32), (100_000, 100_000))
    signature = Signature(inputs=(huge,), outputs=(dataclasses.replace(huge, name="y"),))
    with caplog.at_level(logging.INFO, logger="modelforge.inference"):
        session.warmup(signature)
    assert any("no warmup run" in r.getMessage() and "40000000000 bytes" in r.getMessage() for r in caplog.records)
    assert session.proven is False  # no run has completed: a first failure may still be the model's own


def _expand_model(tmp_path: Path) -> tuple[ModelSession, Signature]:
    """``x`` float32 [3] broadcast to the shape ``shape`` (int64 [2]) names: zeros are no shape it broadcasts to."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ModelSession(write_model(model, tmp_path / "expand.onnx"), _config({}), name="expand:1")
    signature = Signature(
        inputs=(TensorSpec("x", np.dtype(np.float32), (3,)), TensorSpec("shape", np.dtype(np.int64), (2,))),
        outputs=(TensorSpec("y", np.dtype(np.float32), (-1, 3)),),
    )
    return session, signature


def test_a_model_refusing_zeros_is_warmed_up_on_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    session, signature = _expand_model(tmp_path)
    with pytest.raises(INPUT_ERRORS, match="invalid expand shape"):
        session.run({"x": np.zeros(3, np.float32), "shape": np.zeros(2, np.int64)})

    with caplog.at_level(logging.INFO, logger="modelforge.inference"):
        session.warmup(signature)

    assert session.proven  # its run on ones completed
    assert not [r for r in caplog.records if "warmup" in r.getMessage()]


def test_a_model_refusing_zeros_and_ones_is_logged_and_still_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session, _ = _expand_model(tmp_path)
    # Declared as [2] while the graph's x is [3]: neither zeros nor ones of this shape run.
    misdeclared = Signature(
        inputs=(TensorSpec("x", np.dtype(np.float32), (2,)), TensorSpec("shape", np.dtype(np.int64), (2,))),
        outputs=(TensorSpec("y", np.dtype(np.float32), (-1, 3)),),
    )
    with caplog.at_level(logging.INFO, logger="modelforge.inference"):
        session.warmup(misdeclared)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("warmup run of expand:1 failed on zeros and on ones; serving it anyway: ")
    assert not session.proven
    served = session.run({"x": np.arange(3, dtype=np.float32), "shape": np.array([2, 3])})
    assert served["y"].tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]


def test_a_warmup_that_does_not_end_is_stopped_and_the_model_served_without_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The counter, counting 10**12 more steps than asked: on zeros too. Loads happen one at a time, so a warmup
    # that never ended held every later load of the replica.
    model = build_counter()
    model.graph.node.insert(0, helper.make_node("Add", ["steps", "far"], ["far_steps"], name="further"))
    model.graph.node[1].input[0] = "far_steps"  # the trip count's Reshape
    model.graph.initializer.append(numpy_helper.from_array(np.array([10**12], np.int64), "far"))
    session = ModelSession(write_model(model, tmp_path / "endless.onnx"), _config({}), name="endless:2")
    signature = Signature(
        inputs=(TensorSpec("x", np.dtype(np.float32), (-1,)), TensorSpec("steps", np.dtype(np.int64), (1,))),
        outputs=(TensorSpec("y", np.dtype(np.float32), (-1,)),),
    )
    with caplog.at_level(logging.INFO, logger="modelforge.inference"):
        session.warmup(signature, limit=0.5)
    assert any("warmup run of endless:2 stopped after 0.5 s" in r.getMessage() for r in caplog.records)
    quick = session.run({"x": np.zeros(1, np.float32), "steps": np.array([-(10**12) + 3])})
    assert quick["y"][0] == 3.0  # served: runs that end still run


_PINNED_SESSION = """
import glob, sys
import numpy as np
from pathlib import Path
from modelforge_inference.domain import SessionConfig
from modelforge_inference.sessions import ModelSession, session_options
print(session_options(SessionConfig()).intra_op_num_threads)
session = ModelSession(Path(sys.argv[1]), SessionConfig())
session.session.run(None, {"x": np.ones((8, 4), np.float32)})
for task in glob.glob("/proc/self/task/*/status"):
    with open(task) as f:
        print(next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list")))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a second CPU to stay off")
def test_a_process_held_to_some_cpus_runs_onnx_runtime_on_those_alone(tmp_path):
    """ONNX Runtime's own thread count (0) pins a thread per physical core of the host: the service asks for one
    per CPU it may use instead, so its pool stays where an operator put the process (taskset, a cpuset)."""
    model = write_model(build_add_one(), tmp_path / "add_one.onnx")
    cpu = min(os.sched_getaffinity(0))
    command = cpus.command([sys.executable, "-c", _PINNED_SESSION, str(model)], frozenset({cpu}))
    asked, *threads = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    assert asked == "1"  # one CPU to use: one thread, where ONNX Runtime's 0 counts the host's cores
    assert threads and set(threads) == {str(cpu)}


def test_a_process_free_to_use_every_cpu_leaves_the_thread_count_to_onnx_runtime():
    if len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        pytest.skip("this test process is itself held to some CPUs")
    assert session_options(SessionConfig()).intra_op_num_threads == 0


def test_a_run_refused_for_an_overflowing_size_raises_and_writes_nothing_to_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["y"])],
        "filled",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = write_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    session = ModelSession(path, _config({}))
    quiet_default_logger()  # as the engine does when it starts

    with pytest.raises(INPUT_ERRORS):
        session.run({"shape": np.array([1 << 62], np.int64)}, options=run_options())

    assert capfd.readouterr().err == ""  # ONNX Runtime's own logger used to print the overflow, once per request

# ruff: noqa: F811  (pytest fixtures imported from tests/fixtures are parameters here)
"""The `modelforge` command against a real registry: output, exit status, and one-line errors.

`main()` blocks, so each invocation runs in a worker thread while the server keeps the test's event loop.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
from onnx import TensorProto, helper

from modelforge import (
    AsyncInferenceClient,
    AsyncJobsClient,
    AsyncRegistryClient,
    ResourceExhaustedError,
    VersionState,
)
from modelforge.cli import ProgressBar, UsageError, _error_line, _save_outputs, _storable, main
from tests.fixtures.onnx_models import (  # noqa: F401
    ModelFile,
    add_one,
    build_constant,
    build_identity,
    build_nonzero,
    build_tensor_and_sequence_output,
    image_generator,
    model_bytes,
    not_onnx,
    onnx_dir,
    string_model,
    write_model,
)
from tests.fixtures.postgres import tables_locked
from tests.fixtures.servers import RunningRegistry, registry, registry_settings  # noqa: F401
from tests.integration.inference.conftest import RunningInference, inference, start_inference  # noqa: F401
from tests.integration.jobs.conftest import (  # noqa: F401
    InProcessWorker,
    RunningJobs,
    jobs_api,
    jobs_settings,
    worker,
)


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Awaitable[Result]]


@pytest.fixture
def cli(registry: RunningRegistry) -> Cli:
    async def run(*argv: str) -> Result:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(main, [*argv, "--registry", registry.address], out=out, err=err)
        return Result(code, out.getvalue(), err.getvalue())

    return run


async def test_push_list_show_alias_archive_and_remove(cli: Cli, add_one: ModelFile, registry: RunningRegistry) -> None:
    pushed = await cli("models", "push", str(add_one.path), "--name", "demo", "--alias", "production")
    assert pushed.code == 0, pushed.err
    assert pushed.out.startswith("pushed demo:1 (production)")
    assert add_one.sha256 in pushed.out

    second = await cli("models", "push", str(add_one.path), "--name", "demo", "--version-label", "2.0", "--json")
    assert json.loads(second.out)["version"] == 2

    listed = await cli("models", "ls")
    assert listed.code == 0
    header, row = listed.out.splitlines()
    assert header.split()[:3] == ["NAME", "LATEST", "ALIASES"]
    assert row.split()[:3] == ["demo", "2", "production=1"]

    versions = await cli("models", "ls", "demo")
    assert [line.split()[0] for line in versions.out.splitlines()[1:]] == ["2", "1"]

    shown = await cli("models", "show", "demo@production")
    assert shown.code == 0
    assert "version      demo:1" in shown.out and "inputs" in shown.out
    shown_json = await cli("models", "show", "demo", "--json")
    assert json.loads(shown_json.out)["model"]["aliases"] == {"production": 1}

    moved = await cli("models", "alias", "demo", "2", "production")
    assert (moved.code, moved.out.strip()) == (0, "demo@production -> 2")

    unnamed = await cli("models", "archive", "demo")  # not whichever version is newest
    assert (unnamed.code, unnamed.err) == (2, "modelforge: 'demo' names a model, not one of its versions: give demo:N "
                                              "or demo@ALIAS\n")  # fmt: skip
    archived = await cli("models", "archive", "demo:1")
    assert (archived.code, archived.out.strip()) == (0, "archived demo:1")
    async with AsyncRegistryClient(registry.address) as client:
        assert (await client.resolve("demo:1")).state is VersionState.ARCHIVED

    refused = await cli("models", "rm", "demo:2")
    assert refused.code == 1
    assert refused.err.startswith("modelforge: ") and len(refused.err.strip().splitlines()) == 1

    assert (await cli("models", "rm", "demo:1")).code == 0
    not_empty = await cli("models", "rm", "demo")
    assert not_empty.code == 1
    forced = await cli("models", "rm", "demo", "--force")
    assert (forced.code, forced.out.strip()) == (0, "deleted model demo and 1 version(s)")
    assert (await cli("models", "ls")).out.splitlines()[1:] == []


async def test_push_of_a_model_with_an_output_that_is_not_served_says_so(cli: Cli, tmp_path: Path) -> None:
    model = write_model(build_tensor_and_sequence_output(), tmp_path / "both.onnx")
    pushed = await cli("models", "push", str(model), "--name", "both")
    assert pushed.code == 0 and pushed.out.startswith("pushed both:1  sha256 "), pushed.err
    assert pushed.err.startswith("modelforge: note: both:1: output 'items' is not a tensor ModelForge serves")
    assert pushed.err.count("\n") == 1  # the note, and no Python warning beside it


async def test_pull_writes_the_verified_file(cli: Cli, add_one: ModelFile, tmp_path: Path) -> None:
    await cli("models", "push", str(add_one.path), "--name", "demo")
    target = tmp_path / "pulled.onnx"
    pulled = await cli("models", "pull", "demo", "--out", str(target))
    assert pulled.code == 0, pulled.err
    assert target.read_bytes() == add_one.data
    # A path ending in a slash names a directory, made if it is missing; the file goes in it.
    into = await cli("models", "pull", "demo", "--out", f"{tmp_path / 'models'}/")
    assert into.code == 0, into.err
    assert (tmp_path / "models" / "demo.onnx").read_bytes() == add_one.data
    assert f"to {tmp_path / 'models' / 'demo.onnx'}" in into.out
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user makes, not private to them


async def test_errors_are_one_line_and_non_zero(cli: Cli, not_onnx: ModelFile, tmp_path: Path) -> None:
    missing = await cli("models", "show", "ghost")
    assert missing.code == 1
    assert missing.err.count("\n") == 1 and "'ghost'" in missing.err

    bad_file = await cli("models", "push", str(not_onnx.path), "--name", "broken")
    assert bad_file.code == 1 and bad_file.err.startswith("modelforge: ")

    no_file = await cli("models", "push", str(tmp_path / "absent.onnx"), "--name", "x")
    assert no_file.code == 2 and "no such file" in no_file.err
    a_directory = await cli("models", "push", str(tmp_path), "--name", "x")
    assert (a_directory.code, a_directory.err) == (
        2,
        f"modelforge: {tmp_path} is a directory; give the .onnx file to push\n",
    )

    bad_ref = await cli("models", "show", "Not-A-Name")
    assert bad_ref.code == 2 and "invalid model name" in bad_ref.err


async def test_another_service_at_the_registrys_address_is_named_as_such(registry: RunningRegistry) -> None:
    out, err = io.StringIO(), io.StringIO()
    argv = ["stats", "--inference", registry.address, "--timeout", "5"]  # the registry's port, not inference's
    code = await asyncio.to_thread(main, argv, out=out, err=err)
    assert code == 1
    assert f"the server at {registry.address} does not offer modelforge.inference.v1.InferenceService" in err.getvalue()
    assert "--inference or MODELFORGE_INFERENCE_ADDRESS" in err.getvalue()


async def test_an_unreachable_registry_says_where_it_looked(closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, ["models", "ls", "--registry", address, "--timeout", "5"], out=out, err=err)
    assert code == 1
    assert f"cannot reach the registry service at {address}" in err.getvalue()
    assert err.getvalue().endswith(
        ". Is `modelforge up` running? Point to it with --registry or MODELFORGE_REGISTRY_ADDRESS.\n"
    )
    assert "is the suite running" not in err.getvalue()  # the SDK's own advice, which says the same for SDK users


async def test_predict_load_stats_and_jobs(
    cli: Cli,
    inference: RunningInference,
    jobs_api: RunningJobs,
    worker: InProcessWorker,
    add_one: ModelFile,
    tmp_path: Path,
) -> None:
    assert (await cli("models", "push", str(add_one.path), "--name", "demo", "--alias", "production")).code == 0
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    addresses = ("--inference", inference.address, "--jobs", f"127.0.0.1:{jobs_api.port}")

    predicted = await cli("predict", "demo@production", "--input", f"x={tmp_path / 'x.npy'}",
                          "--out", str(tmp_path / "out"), *addresses)  # fmt: skip
    assert predicted.code == 0, predicted.err
    assert predicted.out.startswith("demo:1 answered in ")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), x + 1)
    streamed = await cli("predict", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--stream", *addresses)
    assert streamed.code == 0 and "y: float32[3, 4]" in streamed.out
    unhashed = await cli("predict", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--stream", "--no-sha256",
                         "--out", str(tmp_path / "unhashed"), *addresses)  # fmt: skip
    assert unhashed.code == 0, unhashed.err
    np.testing.assert_array_equal(np.load(tmp_path / "unhashed" / "y.npy"), x + 1)
    misused = await cli("predict", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--no-sha256", *addresses)
    assert misused.code == 2 and "--no-sha256 applies to --stream only" in misused.err

    loaded = await cli("models", "load", "demo:1", *addresses)
    assert loaded.code == 0 and loaded.out.startswith("loaded demo:1 (READY")
    header, row = (await cli("models", "loaded", *addresses)).out.splitlines()
    assert re.split(r"\s{2,}", header) == ["MODEL", "STATE", "MEMORY", "IN FLIGHT", "LAST USED", "PROVIDERS", "REASON"]
    assert row.split()[:2] == ["demo:1", "READY"] and "CPU" in row.split()
    stats = await cli("stats", "demo", "--json", *addresses)
    assert json.loads(stats.out)["models"][0]["request_count"] == 3
    assert (await cli("models", "unload", "demo", *addresses)).out.strip() == "unloaded demo:1"
    bad = await cli("predict", "demo", "--input", f"wrong={tmp_path / 'x.npy'}", *addresses)
    assert bad.code == 1 and bad.err.count("\n") == 1
    nothing = await cli("predict", "demo", *addresses)
    assert nothing.code == 1 and "'x': missing" in nothing.err
    (tmp_path / "constant.onnx").write_bytes(model_bytes(build_constant()))
    assert (await cli("models", "push", str(tmp_path / "constant.onnx"), "--name", "constant")).code == 0
    constant = await cli("predict", "constant", "--out", str(tmp_path / "constant"), *addresses)  # no inputs
    assert constant.code == 0, constant.err
    np.testing.assert_array_equal(
        np.load(tmp_path / "constant" / "c.npy"), np.arange(6, dtype=np.float32).reshape(2, 3)
    )

    np.savez(tmp_path / "items.npz", x=x)
    submitted = await cli("jobs", "submit", "demo@production", "--input", str(tmp_path / "items.npz"),
                          "--batch-size", "2", "--wait", *addresses)  # fmt: skip
    assert submitted.code == 0, submitted.err
    job_id = submitted.out.split()[2]
    assert f"job {job_id} COMPLETED: 3/3 items" in submitted.out
    assert (submitted.out + submitted.err).count("COMPLETED") == 1  # the state changes before it go to stderr
    listed = await cli("jobs", "ls", "--state", "COMPLETED", *addresses)
    assert job_id in listed.out
    shown = await cli("jobs", "show", job_id, *addresses)
    assert "state        COMPLETED" in shown.out
    async with AsyncJobsClient(f"127.0.0.1:{jobs_api.port}") as jobs:
        dataset = await jobs.upload_dataset({"x": x}, display_name="three", labels={"use": "cli"})
    datasets = await cli("jobs", "datasets", "--label", "use=cli", *addresses)
    assert datasets.code == 0, datasets.err
    assert [line.split()[:3] for line in datasets.out.splitlines()] == [
        ["ID", "NAME", "ITEMS"],
        [dataset.id, "three", "3"],
    ]
    on_dataset = await cli("jobs", "submit", "demo", "--dataset", dataset.id, "--wait", *addresses)
    assert on_dataset.code == 0, on_dataset.err
    assert "COMPLETED: 3/3 items" in on_dataset.out
    once = ["jobs", "submit", "demo", "--dataset", dataset.id, "--request-id", "nightly-1", "--wait"]
    repeated = [(await cli(*once, *addresses)).out.split()[2] for _ in range(2)]  # a script run twice
    assert repeated[0] == repeated[1] != on_dataset.out.split()[2]
    reused = await cli(*once, "--priority", "high", *addresses)
    assert reused.code == 1 and f"was used for job {repeated[0]}, submitted with priority NORMAL" in reused.err
    neither = await cli("jobs", "submit", "demo", *addresses)
    assert (neither.code, neither.err) == (
        2, "modelforge: give the items with --input, or name an uploaded dataset with --dataset (one of the two)\n"
    )  # fmt: skip
    removed = await cli("jobs", "rm-dataset", dataset.id, *addresses)  # its job has finished: it may go
    assert (removed.code, removed.out) == (0, f"deleted dataset {dataset.id}\n"), removed.err
    assert dataset.id not in (await cli("jobs", "datasets", *addresses)).out
    read_it = on_dataset.out.split()[2]
    shown = await cli("jobs", "show", read_it, *addresses)
    assert f"input        dataset {dataset.id} (deleted since)\n" in shown.out
    async with await psycopg.AsyncConnection.connect(jobs_api.settings.database_url or "", autocommit=True) as conn:
        # As versions before jobs migration 0005 left such a job: no id of the dataset it read.
        await conn.execute("UPDATE jobs.jobs SET input_dataset_id = NULL WHERE id = %s", (read_it,))
        shown = await cli("jobs", "show", read_it, *addresses)
        assert "input        a dataset, deleted since\n" in shown.out
        await conn.execute("UPDATE jobs.jobs SET input_dataset_id = %s WHERE id = %s", (dataset.id, read_it))
    result = await cli("jobs", "result", job_id, "--out", str(tmp_path / "result.npz"), *addresses)
    assert (result.code, result.out) == (0, f"wrote y float32[3, 4] to {tmp_path / 'result.npz'}\n"), result.err
    with np.load(tmp_path / "result.npz", allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["y"], x + 1)
    assert not list(tmp_path.glob(".result.npz*"))  # written beside it, then renamed: no temporary file is left
    bare = await cli("jobs", "result", job_id, "--out", str(tmp_path / "bare"), *addresses)  # named as numpy does
    assert bare.out.strip().endswith(f"to {tmp_path / 'bare.npz'}") and (tmp_path / "bare.npz").is_file()
    deeper = await cli("jobs", "result", job_id, "--out", str(tmp_path / "new" / "r.npz"), *addresses)
    assert deeper.code == 0 and (tmp_path / "new" / "r.npz").is_file(), deeper.err  # as models pull makes them
    for directory in (".", str(tmp_path)):
        refused = await cli("jobs", "result", job_id, "--out", directory, *addresses)
        assert (refused.code, refused.err) == (2, f"modelforge: --out {directory} is a directory; give the .npz file "
                                                  "to write\n")  # fmt: skip
    (tmp_path / "folder.npz").mkdir()
    into_folder = await cli("jobs", "result", job_id, "--out", str(tmp_path / "folder.npz"), *addresses)
    assert (into_folder.code, into_folder.err) == (2, f"modelforge: --out {tmp_path / 'folder.npz'} is a directory; "
                                                      "give the .npz file to write\n")  # fmt: skip
    onto_file = await cli("predict", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--out", str(tmp_path / "bare.npz"),
                          *addresses)  # fmt: skip
    assert (onto_file.code, onto_file.out) == (2, "")  # refused before the model ran
    assert "is a file; --out takes a directory" in onto_file.err
    missing = await cli("jobs", "show", "00000000-0000-0000-0000-000000000000", *addresses)
    assert missing.code == 1 and missing.err.startswith("modelforge: ")
    inline = await cli("jobs", "rm", job_id, *addresses)  # its items went inline: no dataset to speak of
    assert (inline.code, inline.out) == (0, f"deleted job {job_id} and the outputs of 3 items\n")
    async with AsyncJobsClient(f"127.0.0.1:{jobs_api.port}") as jobs:
        uploaded = (await jobs.upload_dataset({"x": x})).id
    first = (await cli("jobs", "submit", "demo", "--dataset", uploaded, "--wait", *addresses)).out.split()[2]
    kept = await cli("jobs", "rm", first, *addresses)
    assert (kept.code, kept.out.splitlines()) == (0, [
        f"deleted job {first} and the outputs of 3 items",
        f"its dataset {uploaded} stays, for other jobs: `modelforge jobs rm-dataset {uploaded}` deletes it",
    ])  # fmt: skip
    assert uploaded in (await cli("jobs", "datasets", *addresses)).out
    again = (await cli("jobs", "submit", "demo", "--dataset", uploaded, "--wait", *addresses)).out.split()[2]
    with_dataset = await cli("jobs", "rm", again, "--dataset", *addresses)
    assert (with_dataset.code, with_dataset.out.splitlines()[1:]) == (0, [f"deleted dataset {uploaded}"])
    assert uploaded not in (await cli("jobs", "datasets", *addresses)).out
    gone = await cli("jobs", "rm", on_dataset.out.split()[2], "--dataset", *addresses)  # its dataset went earlier
    assert (gone.code, gone.out.splitlines()[1:]) == (0, [f"its dataset {dataset.id} had been deleted already"])


@pytest.mark.parametrize("output", ["../escape", "a/b", "..", ".hidden"])
async def test_predict_out_refuses_an_output_name_that_is_not_a_plain_file_name(
    cli: Cli, inference: RunningInference, tmp_path: Path, output: str
) -> None:
    work = tmp_path / "work"  # the servers keep their own files in tmp_path
    model = write_model(build_identity(output=output), work / "model.onnx")
    assert (await cli("models", "push", str(model), "--name", "sly")).code == 0
    np.save(work / "x.npy", np.ones((1, 4), dtype=np.float32))
    before = set(work.rglob("*"))
    out_dir = work / "nested" / "out"

    refused = await cli("predict", "sly", "--input", f"x={work / 'x.npy'}", "--out", str(out_dir),
                        "--inference", inference.address)  # fmt: skip

    assert refused.code == 2
    assert refused.err == (
        f"modelforge: output {output!r} is not a plain file name, so --out cannot save it as DIR/NAME.npy; "
        "drop --out, choose the other outputs with --output, or rename the output in the model\n"
    )
    assert set(work.rglob("*")) == before  # nothing written: no DIR, no file beside or above it
    printed = await cli("predict", "sly", "--input", f"x={work / 'x.npy'}", "--inference", inference.address)
    assert printed.code == 0 and f"{output}: float32[1, 4]" in printed.out


async def test_predict_out_is_checked_before_the_model_runs_and_saves_every_output_or_none(
    cli: Cli, inference: RunningInference, tmp_path: Path
) -> None:
    work = tmp_path / "work"  # the servers keep their own files in tmp_path
    long_name = "b" * 300  # a tensor name no file system takes as a file name
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Identity", ["x"], [long_name])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", long_name)],
    )
    model = write_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), work / "two.onnx")
    assert (await cli("models", "push", str(model), "--name", "two")).code == 0
    np.save(work / "x.npy", np.ones((1, 4), dtype=np.float32))
    (work / "a-file").write_text("")
    addresses = ("--inference", inference.address)

    below_a_file = await cli("predict", "two", "--input", f"x={work / 'x.npy'}", "--out", str(work / "a-file" / "out"),
                             *addresses)  # fmt: skip
    assert (below_a_file.code, below_a_file.out) == (2, "")  # refused before the model ran
    assert below_a_file.err == (f"modelforge: --out {work / 'a-file' / 'out'} is below {work / 'a-file'}, a file; "
                                "--out takes a directory, where each output is saved as NAME.npy\n")  # fmt: skip

    out_dir = work / "out"
    failed = await cli("predict", "two", "--input", f"x={work / 'x.npy'}", "--out", str(out_dir), *addresses)
    assert failed.code == 1 and "File name too long" in failed.err, failed
    assert list(out_dir.iterdir()) == []  # not a.npy alone: every output or none

    chosen = await cli("predict", "two", "--input", f"x={work / 'x.npy'}", "--output", "a", "--out", str(out_dir),
                       *addresses)  # fmt: skip
    assert chosen.code == 0, chosen
    assert [p.name for p in out_dir.iterdir()] == ["a.npy"]
    np.testing.assert_array_equal(np.load(out_dir / "a.npy"), np.ones((1, 4), dtype=np.float32))


def test_predict_out_never_writes_through_a_link_planted_in_the_directory(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"kept")
    (out_dir / ".y.npy.partial").symlink_to(outside)  # the name the command once wrote y through
    y = np.arange(4, dtype=np.float32)

    saved = _save_outputs({"y": y}, out_dir)

    assert outside.read_bytes() == b"kept"
    assert saved == {"y": out_dir / "y.npy"} and not saved["y"].is_symlink()
    np.testing.assert_array_equal(np.load(saved["y"], allow_pickle=False), y)
    assert sorted(p.name for p in out_dir.iterdir()) == [".y.npy.partial", "y.npy"]  # nothing of its own left


def test_predict_out_saves_an_output_whose_name_just_fits_as_a_file_name(tmp_path: Path) -> None:
    name = "n" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".npy"))
    y = np.arange(4, dtype=np.float32)

    saved = _save_outputs({"a": y, name: y + 1}, tmp_path / "out")

    assert [p.name for p in sorted((tmp_path / "out").iterdir())] == ["a.npy", f"{name}.npy"]
    np.testing.assert_array_equal(np.load(saved[name], allow_pickle=False), y + 1)
    with pytest.raises(OSError, match="File name too long"):  # one byte more: refused before any is saved
        _save_outputs({"b": y, name + "n": y}, tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


async def test_an_archive_whose_path_holds_an_equals_sign_is_read_as_an_archive(
    cli: Cli, inference: RunningInference, tmp_path: Path, add_one: ModelFile
) -> None:
    work = tmp_path / "work=1"
    work.mkdir()
    np.savez(work / "a=b.npz", x=np.ones((1, 4), dtype=np.float32))
    assert (await cli("models", "push", str(add_one.path), "--name", "adder")).code == 0
    result = await cli("predict", "adder", "--input", str(work / "a=b.npz"), "--inference", inference.address)
    assert result.code == 0, result
    assert "y: float32[1, 4] = [[2., 2., 2., 2.]]" in result.out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("up", "--workers", "-1"), "argument --workers: -1 is out of range: give a number of 0 or more"),
        (("up", "--only", "bogus"), "argument --only: invalid choice: 'bogus'"),
        (("up", "--registry-port", "70000"), "argument --registry-port: 70000 is out of range: give a number from 1"),
        (
            ("predict", "m", "--input", "x=x.npy", "--timeout", "-1"),
            "argument --timeout: -1 is not a number of seconds",
        ),
        (("jobs", "result", "j", "--out", "o.npz", "--wait-timeout", "0"), "argument --wait-timeout: 0 is not a"),
        (("jobs", "submit", "m", "--input", "x.npz", "--time-limit", "inf"), "argument --time-limit: inf is not a"),
        (
            ("models", "alias", "demo", "99999999999999999999", "x"),
            "argument VERSION: 99999999999999999999 is out of range: give a number from 1 to 9223372036854775807",
        ),
        (("models", "alias", "demo", "0", "x"), "argument VERSION: 0 is out of range: give a number from 1 to"),
        (
            ("predict", "m", "--priority", str(2**40)),
            "argument --priority: 1099511627776 is out of range: give a number from 0 to 2147483647",
        ),
        (("jobs", "submit", "m", "--batch-size", str(2**31)), "argument --batch-size: 2147483648 is out of range"),
    ],
)
def test_flags_out_of_range_are_usage_errors_naming_the_flag(
    argv: tuple[str, ...], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


async def test_input_files_that_cannot_be_read_are_usage_errors(cli: Cli, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 4), dtype=np.float32))
    with (tmp_path / "single.npz").open("wb") as single:  # one array, in a file named .npz
        np.save(single, np.ones((1, 4), dtype=np.float32))
    np.savez(tmp_path / "archive.npz", x=np.ones((1, 4), dtype=np.float32))
    (tmp_path / "text.npy").write_text("not numpy data\n")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")  # a zip's magic, then nothing a zip holds
    np.savez_compressed(tmp_path / "flipped.npz", x=np.arange(1000, dtype=np.float32))
    flipped = bytearray((tmp_path / "flipped.npz").read_bytes())
    middle = len(flipped) // 2
    flipped[middle : middle + 2] = bytes(b ^ 0xFF for b in flipped[middle : middle + 2])
    (tmp_path / "flipped.npz").write_bytes(flipped)
    np.save(tmp_path / "y.npy", np.zeros((1, 4), dtype=np.float32))
    unreadable = "is not a .npy or .npz file that numpy reads without pickle: "
    cases = {
        f"x={tmp_path / 'absent.npy'}": f"{tmp_path / 'absent.npy'}: no such file",
        "x=": "--input takes NAME=FILE.npy, not 'x='",
        f"={tmp_path / 'x.npy'}": "--input takes NAME=FILE.npy",
        str(tmp_path / "x.npy"): "--input takes NAME=FILE.npy or FILE.npz",
        str(tmp_path / "single.npz"): f"{tmp_path / 'single.npz'} holds one array, not a .npz archive",
        f"x={tmp_path / 'archive.npz'}": f"{tmp_path / 'archive.npz'} is a .npz archive, whose arrays are named by",
        f"x={tmp_path / 'text.npy'}": f"{tmp_path / 'text.npy'} is not a .npy or .npz file that numpy reads",
        str(tmp_path / "bad.npz"): f"{tmp_path / 'bad.npz'} {unreadable}File is not a zip file",
        f"x={tmp_path / 'bad.npz'}": f"{tmp_path / 'bad.npz'} {unreadable}File is not a zip file",
        str(tmp_path / "flipped.npz"): f"{tmp_path / 'flipped.npz'} {unreadable}",
        f"x={tmp_path}": f"{tmp_path} is a directory, not a .npy or .npz file",
    }
    for spec, message in cases.items():
        for command in (("predict", "demo"), ("jobs", "submit", "demo")):
            result = await cli(*command, "--input", spec)
            assert (result.code, result.err.count("\n")) == (2, 1), (spec, result)
            assert result.err.startswith(f"modelforge: {message}"), (spec, result.err)
    twice = {
        (f"x={tmp_path / 'x.npy'}", f"x={tmp_path / 'y.npy'}"): (
            f"input 'x' is given twice, by --input x={tmp_path / 'x.npy'} and --input x={tmp_path / 'y.npy'}"
        ),
        (str(tmp_path / "archive.npz"), f"x={tmp_path / 'y.npy'}"): (
            f"input 'x' is given twice, by --input {tmp_path / 'archive.npz'} and --input x={tmp_path / 'y.npy'}"
        ),
    }
    for specs, message in twice.items():
        for command in (("predict", "demo"), ("jobs", "submit", "demo")):
            result = await cli(*command, "--input", specs[0], "--input", specs[1])
            assert (result.code, result.err) == (2, f"modelforge: {message}\n"), (specs, result)


async def test_string_outputs_saved_with_out_read_back_without_pickle(
    cli: Cli, inference: RunningInference, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    model = write_model(build_identity(TensorProto.STRING, ["batch"]), work / "strings.onnx")
    assert (await cli("models", "push", str(model), "--name", "echo")).code == 0
    addresses = ("--inference", inference.address)
    text = np.array(["cat", "", "naïve"])
    np.save(work / "text.npy", text)

    for extra in ((), ("--stream",)):
        out_dir = work / f"out{len(extra)}"
        saved = await cli("predict", "echo", "--input", f"x={work / 'text.npy'}", "--out", str(out_dir), *addresses,
                          *extra)  # fmt: skip
        assert saved.code == 0, saved.err
        np.testing.assert_array_equal(np.load(out_dir / "y.npy", allow_pickle=False), text)
        again = await cli("predict", "echo", "--input", f"x={out_dir / 'y.npy'}", *addresses)  # fed back as it is
        assert again.code == 0, again.err


async def test_jobs_result_saves_string_outputs_read_back_without_pickle(
    cli: Cli,
    inference: RunningInference,
    jobs_api: RunningJobs,
    worker: InProcessWorker,
    string_model: ModelFile,
    tmp_path: Path,
) -> None:
    assert (await cli("models", "push", str(string_model.path), "--name", "labeller")).code == 0
    addresses = ("--inference", inference.address, "--jobs", f"127.0.0.1:{jobs_api.port}")
    np.save(tmp_path / "text.npy", np.array(["cat", "fish", "bird", "dog", "naïve"]))
    submitted = await cli("jobs", "submit", "labeller", "--input", f"text={tmp_path / 'text.npy'}",
                          "--batch-size", "2", "--wait", *addresses)  # fmt: skip
    assert submitted.code == 0, submitted.err
    job_id = submitted.out.split()[2]

    result = await cli("jobs", "result", job_id, "--out", str(tmp_path / "labels"), *addresses)

    assert (result.code, result.out) == (0, f"wrote label_id int64[5], label <U7[5] to {tmp_path / 'labels.npz'}\n")
    with np.load(tmp_path / "labels.npz", allow_pickle=False) as saved:
        assert saved["label_id"].tolist() == [0, -1, 2, 1, -1]
        assert saved["label"].tolist() == ["CAT", "UNKNOWN", "BIRD", "DOG", "UNKNOWN"]


def test_string_outputs_that_are_not_text_are_saved_as_bytes_and_a_trailing_nul_is_refused() -> None:
    # Inputs must be UTF-8, so these can only come from a model's output: checked on the conversion itself.
    binary = np.array([b"\xff\xfe", b"ok"], dtype=object)
    assert _storable("y", binary).tolist() == [b"\xff\xfe", b"ok"]
    assert _storable("y", binary).dtype.kind == "S"
    with pytest.raises(UsageError, match="output 'y' has strings ending in NUL bytes"):
        _storable("y", np.array([b"a\0"], dtype=object))


async def test_a_service_that_answers_unavailable_is_not_reported_as_unreachable(
    cli: Cli, start_inference, tmp_path: Path, closed_port: int
) -> None:
    nowhere = f"127.0.0.1:{closed_port}"
    np.save(tmp_path / "x.npy", np.ones((1, 4), dtype=np.float32))
    async with start_inference(registry_address=nowhere) as running:
        result = await cli("predict", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--inference", running.address,
                           "--timeout", "20")  # fmt: skip

    assert result.code == 1
    assert result.err.startswith("modelforge: the model registry could not resolve demo"), result.err
    assert "cannot reach the inference service" not in result.err


async def test_stats_without_a_ref_lists_every_version_run_in_a_table(
    cli: Cli, inference: RunningInference, add_one: ModelFile, tmp_path: Path
) -> None:
    for name in ("alpha", "beta", "idle"):
        assert (await cli("models", "push", str(add_one.path), "--name", name)).code == 0
    np.save(tmp_path / "x.npy", np.ones((3, 4), dtype=np.float32))
    addresses = ("--inference", inference.address)
    for name in ("alpha", "alpha", "beta"):
        predicted = await cli("predict", name, "--input", f"x={tmp_path / 'x.npy'}", *addresses)
        assert predicted.code == 0, predicted.err
    refused = await cli("predict", "beta", "--input", f"wrong={tmp_path / 'x.npy'}", *addresses)
    assert refused.code == 1 and "'wrong'" in refused.err

    table = await cli("stats", *addresses)

    assert table.code == 0, table.err
    header, *rows, cache = table.out.splitlines()
    assert re.split(r"\s{2,}", header) == [
        "MODEL", "REQUESTS", "FAILURES", "CANCELLED", "ITEMS", "RUNS", "MEAN MS", "CACHE HIT/MISS", "LAST"
    ]  # fmt: skip
    # idle was never run, so it has no counters to show.
    assert [row.split()[:6] for row in rows] == [
        ["alpha:1", "2", "0", "0", "6", "2"], ["beta:1", "1", "1", "0", "3", "1"]
    ]  # fmt: skip
    assert [row.split()[7] for row in rows] == ["0/0", "0/0"]
    assert all(float(row.split()[6]) > 0 for row in rows)  # mean milliseconds per answered request
    assert cache == "prediction cache: OK"

    as_json = json.loads((await cli("stats", "--json", *addresses)).out)
    assert [(m["model"], m["version"], m["request_count"], m["failure_count"]) for m in as_json["models"]] == [
        ("alpha", 1, 2, 0),
        ("beta", 1, 1, 1),
    ]
    assert as_json["cache_status"] == "OK"

    # A model never run shows an empty table; a name the registry does not know is an error, not an empty table.
    assert (await cli("stats", "idle", *addresses)).code == 0
    missing = await cli("stats", "ghost", *addresses)
    assert missing.code == 1 and "'ghost'" in missing.err, missing.err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only() -> None:
    terminal = _Terminal()
    bar = ProgressBar("uploading m.onnx", terminal)
    for done in (0, 512, 1024):
        bar(done, 1024)
    bar.close()
    frames = terminal.getvalue().split("\r")[1:]
    assert len(frames) == 3 and "100.0%" in frames[-1] and frames[-1].endswith("\n")
    piped = io.StringIO()
    quiet = ProgressBar("uploading", piped)
    quiet(1, 2)
    quiet.close()
    assert piped.getvalue() == ""


async def test_output_into_a_pipe_whose_reader_left_ends_quietly(
    cli: Cli, add_one: ModelFile, registry: RunningRegistry
) -> None:
    for name in ("first", "second"):
        assert (await cli("models", "push", str(add_one.path), "--name", name)).code == 0
    read, write = os.pipe()
    os.close(read)  # as `modelforge models ls | head -0` leaves it
    err = io.StringIO()
    with os.fdopen(write, "w", buffering=1) as out:  # line-buffered: the first line meets the closed pipe
        code = await asyncio.to_thread(main, ["models", "ls", "--registry", registry.address], out=out, err=err)
    assert (code, err.getvalue()) == (128 + signal.SIGPIPE, "")


async def test_push_with_an_alias_the_registry_would_refuse_stores_no_version(cli: Cli, add_one: ModelFile) -> None:
    refused = await cli("models", "push", str(add_one.path), "--name", "demo", "--alias", "Prod")
    assert refused.code == 2, refused.err
    assert "invalid alias 'Prod'" in refused.err
    listed = await cli("models", "ls")
    assert "demo" not in listed.out  # checked before the upload: nothing was stored


async def test_set_changes_model_and_version_labels_and_ls_filters_by_them(
    cli: Cli, add_one: ModelFile, registry: RunningRegistry
) -> None:
    pushed = await cli("models", "push", str(add_one.path), "--name", "demo", "--alias", "production",
                       "--label", "team=fraud", "--label", "stage=dev")  # fmt: skip
    assert pushed.code == 0, pushed.err
    await cli("models", "push", str(add_one.path), "--name", "other")

    model = await cli("models", "set", "demo", "--label", "owner=risk", "--description", "fraud scores", "--json")
    assert model.code == 0, model.err
    assert json.loads(model.out)["labels"] == {"owner": "risk"}
    listed = await cli("models", "ls", "--label", "owner=risk")
    assert [line.split()[0] for line in listed.out.splitlines()[1:]] == ["demo"]

    # A version by alias: labels merged with the ones it has, one removed, a serving label checked by the registry.
    version = await cli("models", "set", "demo@production", "--label", "modelforge.io/max-batch-size=16",
                        "--unlabel", "stage", "--version-label", "1.1.0")  # fmt: skip
    assert version.code == 0, version.err
    assert "version      demo:1" in version.out
    async with AsyncRegistryClient(registry.address) as client:
        stored = await client.resolve("demo:1")
        assert stored.labels == {"team": "fraud", "modelforge.io/max-batch-size": "16"}
        assert stored.version_label == "1.1.0"
        assert (await client.get_model("demo")).description == "fraud scores"

    refused = await cli("models", "set", "demo:1", "--label", "modelforge.io/max-batch-size=many")
    assert refused.code == 1 and "max-batch-size" in refused.err
    async with AsyncRegistryClient(registry.address) as client:
        assert (await client.resolve("demo:1")).labels["modelforge.io/max-batch-size"] == "16"  # unchanged

    for argv, says in [
        (["demo"], "nothing to change"),
        (["demo", "--version-label", "2"], "--version-label belongs to a version"),
        (["demo:1", "--label", "a=1", "--unlabel", "a"], "both set and removed"),
        (["demo:1", "--label", "novalue"], "KEY=VALUE"),
    ]:
        usage = await cli("models", "set", *argv)
        assert usage.code == 2 and says in usage.err, (argv, usage)


async def test_push_whose_alias_cannot_be_set_says_the_version_was_stored(
    cli: Cli, add_one: ModelFile, registry: RunningRegistry
) -> None:
    # The upload has no deadline; SetAlias, a unary call, waits on the test's lock on the aliases past its own.
    async with tables_locked(registry.settings.database_url or "", "registry.aliases"):
        pushed = await cli("models", "push", str(add_one.path), "--name", "demo", "--alias", "production",
                           "--timeout", "0.5")  # fmt: skip
    assert (pushed.code, pushed.err) == (
        1, "modelforge: pushed demo:1, but whether alias production was set is unknown: Deadline Exceeded "
           "(--timeout was 0.5 s: raise it where the service needs longer)\n"
    )  # fmt: skip
    async with AsyncRegistryClient(registry.address) as client:
        # The registry may have set the alias after the caller stopped waiting: only the version is certain.
        assert [v.version async for v in client.list_versions("demo")] == [1]


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"modelforge {importlib.metadata.version('modelforge')}\n"


def test_timeout_help_says_which_calls_it_does_not_bound(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["models", "push", "--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert (
        "--timeout SECONDS limit in seconds for each call (default: 30), except streamed transfers, which take as long "
        "as they need: models push and pull, dataset uploads, job results, and following a job (--wait, jobs watch)"
    ) in shown


async def test_ls_refuses_filters_that_do_not_apply_to_what_it_lists(cli: Cli, add_one: ModelFile) -> None:
    assert (await cli("models", "push", str(add_one.path), "--name", "demo")).code == 0
    for argv, says in [
        (["--state", "ARCHIVED"], "--state filters the versions of one model: name it, as in `models ls NAME --state"),
        (["demo", "--prefix", "zzz"], "--prefix filters the list of models; `models ls demo` lists that model's"),
        (["demo", "--label", "team=nobody"], "--label filters the list of models; `models ls demo` lists that"),
    ]:
        refused = await cli("models", "ls", *argv)
        assert (refused.code, refused.out) == (2, ""), (argv, refused)
        assert refused.err.startswith(f"modelforge: {says}"), (argv, refused.err)
    archived = await cli("models", "ls", "demo", "--state", "ARCHIVED")
    assert (archived.code, archived.out.splitlines()[1:]) == (0, [])
    filtered = await cli("models", "ls", "--prefix", "zzz", "--label", "team=nobody")
    assert (filtered.code, filtered.out.splitlines()[1:]) == (0, [])


async def test_a_pull_that_fails_leaves_nothing_and_names_the_path_given(
    cli: Cli, add_one: ModelFile, tmp_path: Path
) -> None:
    assert (await cli("models", "push", str(add_one.path), "--name", "demo")).code == 0
    work = tmp_path / "work"
    work.mkdir()
    missing = await cli("models", "pull", "demo:9", "--out", str(work / "nd2" / "sub" / "x.onnx"))
    assert missing.code == 1 and "demo" in missing.err, missing.err
    assert list(work.iterdir()) == []  # no directories made for a version that does not exist

    (work / "file").write_text("a file, not a directory")
    under_a_file = await cli("models", "pull", "demo", "--out", str(work / "file" / "x.onnx"))
    assert (under_a_file.code, under_a_file.err) == (1, f"modelforge: Not a directory: {work / 'file' / 'x.onnx'}\n")
    assert sorted(p.name for p in work.iterdir()) == ["file"]
    if Path("/proc/self").is_dir():  # a directory where nothing may be made, even by root
        refused = await cli("models", "pull", "demo", "--out", "/proc/nope.onnx")
        assert refused.code == 1 and refused.err.endswith(": /proc/nope.onnx\n"), refused.err


async def test_malformed_names_are_usage_errors_before_any_upload(cli: Cli, add_one: ModelFile) -> None:
    bad_name = await cli("models", "push", str(add_one.path), "--name", "Demo!")
    assert bad_name.code == 2 and bad_name.err.startswith("modelforge: invalid model name 'Demo!'"), bad_name.err
    assert (await cli("models", "ls")).out.splitlines()[1:] == []  # nothing was uploaded
    assert (await cli("models", "push", str(add_one.path), "--name", "demo")).code == 0
    bad_alias = await cli("models", "alias", "demo", "1", "Bad!")
    assert bad_alias.code == 2 and bad_alias.err.startswith("modelforge: invalid alias 'Bad!'"), bad_alias.err
    bad_versions = await cli("models", "ls", "Bad!")
    assert bad_versions.code == 2 and bad_versions.err.startswith("modelforge: invalid model name 'Bad!'")


async def test_messages_over_the_size_limits_give_the_commands_advice(
    cli: Cli,
    inference: RunningInference,
    start_inference,
    add_one: ModelFile,
    image_generator: ModelFile,
    tmp_path: Path,
) -> None:
    assert (await cli("models", "push", str(add_one.path), "--name", "adder")).code == 0
    assert (await cli("models", "push", str(image_generator.path), "--name", "painter")).code == 0
    np.save(tmp_path / "x.npy", np.zeros((200_000, 4), np.float32))  # 3.2 MB: over the 2 MiB this server takes
    async with start_inference(max_request_bytes=1024 * 1024, max_message_bytes=2 * 1024 * 1024) as small:
        request = await cli("predict", "adder", "--input", f"x={tmp_path / 'x.npy'}", "--inference", small.address)
    # The command's own limit is the SDK's default, 64 MiB: an answer over it is met here with a smaller one.
    async with AsyncInferenceClient(inference.address, max_message_bytes=2 * 1024 * 1024) as client:
        with pytest.raises(ResourceExhaustedError) as caught:  # a 3 MiB image
            await client.predict("painter", image_generator.sample(1))
    assert request.code == 1 and request.err.count("\n") == 1, request
    assert request.err.endswith(
        "; the inputs are larger than one request may be: send fewer items per request, or run them as a batch job "
        "(`modelforge jobs submit`)\n"
    ), request.err
    assert "max_message_bytes" not in request.err
    answer = _error_line(caught.value, None)
    assert "CLIENT: Received message larger than max" in answer and answer.endswith(
        "; the answer is larger than one message may be (64 MiB): receive it with --stream, or ask for fewer "
        "outputs (--output) or items"
    ), answer


async def test_result_of_a_failed_job_says_why_it_failed(
    cli: Cli, inference: RunningInference, jobs_api: RunningJobs, worker: InProcessWorker, tmp_path: Path
) -> None:
    # Its first batch shows that its outputs hold no row per item: the job fails at once, with no retry.
    assert (await cli("models", "push", str(write_model(build_nonzero(None), tmp_path / "m.onnx")),
                      "--name", "unnamed")).code == 0  # fmt: skip
    np.save(tmp_path / "x.npy", np.array([1, 0, 2, 3], np.float32))
    addresses = ("--inference", inference.address, "--jobs", f"127.0.0.1:{jobs_api.port}")
    submitted = await cli("jobs", "submit", "unnamed", "--input", f"x={tmp_path / 'x.npy'}", "--wait", *addresses)
    assert submitted.code == 1 and " FAILED: " in submitted.out, submitted
    job_id = submitted.out.split()[2]

    result = await cli("jobs", "result", job_id, "--out", str(tmp_path / "result.npz"), *addresses)

    assert result.code == 1 and result.err.count("\n") == 1, result
    assert result.err.startswith(f"modelforge: job {job_id} is FAILED; results are available once it is COMPLETED")
    assert "It failed with FAILED_PRECONDITION OUTPUTS_NOT_PER_ITEM: " in result.err
    assert "held 3 rows for a batch of 4 items" in result.err
    assert not (tmp_path / "result.npz").exists()


MODELFORGE = Path(sys.executable).with_name("modelforge")


def _mapped(pid: int, library: str) -> bool:
    """Whether process `pid` has loaded a shared library whose file name holds `library` (from /proc)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads what a process has loaded from /proc")
@pytest.mark.parametrize(
    "moment",
    [
        # While the SDK's modules are still importing, before modelforge.cli exists: numpy's core comes first,
        # gRPC's a few tenths of a second later.
        "_multiarray_umath",
        "cygrpc",
        "call",  # the command waiting for its call's answer
    ],
)
def test_a_ctrl_c_at_any_moment_ends_the_command_with_130_and_one_line(moment: str) -> None:
    with socket.socket() as silent:  # takes connections and never answers: the call waits out its --timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen(
            [str(MODELFORGE), "models", "ls", "--registry", address, "--timeout", "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if moment == "call":
                silent.accept()[0].close()
            else:  # polled for: a fixed delay lands in another moment on a loaded machine
                deadline = time.monotonic() + 60
                while not _mapped(process.pid, moment) and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert (process.returncode, err, out) == (130, "modelforge: interrupted\n", "")

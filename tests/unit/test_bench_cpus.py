"""Where the benchmark runs its processes: CPU lists, and processes that start on the CPUs they are given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cpus
from bench.loadgen import LoadGenerator

FIRST = min(os.sched_getaffinity(0))


def allowed(pid: int | str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))


@pytest.mark.parametrize("text, expected", [("0", {0}), ("0-1", {0, 1}), ("0,1", {0, 1}), (" 1 , 0 ", {0, 1})])
def test_a_cpu_list_reads_as_taskset_writes_it(text, expected):
    if not expected <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    assert cpus.parse(text) == expected
    assert cpus.describe(cpus.parse(text)) == ("0" if expected == {0} else "0-1")


def test_runs_and_gaps_are_written_back_as_a_cpu_list():
    assert cpus.describe(frozenset({0, 1, 3, 5, 6, 7})) == "0-1,3,5-7"
    assert cpus.describe(None) == "any"


@pytest.mark.parametrize("text, says", [
    ("a-b", "not a CPU list"),
    ("1-0", "runs backwards"),
    ("100000", "not among this machine's usable ones"),
])  # fmt: skip
def test_a_cpu_list_that_cannot_be_used_is_refused_with_the_reason(text, says):
    with pytest.raises(ValueError, match=says):
        cpus.parse(text)


def test_a_command_runs_on_its_cpus_from_its_first_instruction():
    command = cpus.command(["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"], frozenset({FIRST}))
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert output.split(":", 1)[1].strip() == str(FIRST)


def test_a_block_pinned_to_some_cpus_gives_the_thread_its_cpus_back():
    before = os.sched_getaffinity(0)
    with cpus.pinned(frozenset({FIRST})):
        assert os.sched_getaffinity(0) == {FIRST}
    assert os.sched_getaffinity(0) == before


def test_load_generator_processes_run_on_the_cpus_they_are_given():
    with LoadGenerator(processes=2, cpus=frozenset({FIRST})) as gen:
        assert [allowed(pid) for pid in gen.pids] == [str(FIRST), str(FIRST)]


def test_the_inference_engine_sizes_its_compute_pool_by_the_cpus_it_may_use():
    code = "from modelforge_inference.engine import usable_cpus; print(usable_cpus())"
    command = cpus.command([sys.executable, "-c", code], frozenset({FIRST}))
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert output.strip() == "1"

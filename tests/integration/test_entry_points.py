"""Each service's entry point, run as operators run it, refuses a malformed MODELFORGE_* variable in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "key", "value", "says"),
    [
        ("modelforge_registry", "MODELFORGE_PORT", "70000", "MODELFORGE_PORT=70000 is invalid"),
        ("modelforge_inference", "MODELFORGE_LOG_LEVEL", "bogus", "MODELFORGE_LOG_LEVEL='BOGUS' is invalid"),
        ("modelforge_jobs", "MODELFORGE_TRACE_SAMPLE_RATIO", "2", "MODELFORGE_TRACE_SAMPLE_RATIO=2.0 is invalid"),
        ("modelforge_jobs.worker", "MODELFORGE_REDIS_URL", "", "the jobs service needs MODELFORGE_REDIS_URL"),
    ],
)
def test_a_malformed_variable_ends_the_process_with_one_line(module: str, key: str, value: str, says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    env |= {"MODELFORGE_DATABASE_URL": "postgresql://127.0.0.1:1/none", key: value}
    result = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("modelforge-") and says in line

"""Each service's entry point, run as operators run it, refuses a malformed MODELFORGE_* variable, or a port in
use, in one line."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("module", "key", "value", "says"),
    [
        ("modelforge_registry", "MODELFORGE_PORT", "70000", "MODELFORGE_PORT=70000 is invalid"),
        ("modelforge_inference", "MODELFORGE_LOG_LEVEL", "bogus", "MODELFORGE_LOG_LEVEL='BOGUS' is invalid"),
        ("modelforge_jobs", "MODELFORGE_TRACE_SAMPLE_RATIO", "2", "MODELFORGE_TRACE_SAMPLE_RATIO=2.0 is invalid"),
        ("modelforge_jobs.worker", "MODELFORGE_REDIS_URL", "", "the jobs service needs MODELFORGE_REDIS_URL"),
        ("modelforge_jobs", "MODELFORGE_REDIS_URL", "notaurl", "MODELFORGE_REDIS_URL is invalid: it takes a Redis"),
        ("modelforge_registry", "MODELFORGE_DATABASE_URL", "notaurl", "MODELFORGE_DATABASE_URL is invalid"),
        ("modelforge_inference", "MODELFORGE_MAX_BATCH_SIZE", "-3", "MODELFORGE_MAX_BATCH_SIZE=-3 is invalid"),
        ("modelforge_registry", "MODELFORGE_OTLP_ENDPOINT", "not a url", "MODELFORGE_OTLP_ENDPOINT='not a url' is"),
        ("modelforge_jobs.worker", "OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x:99999", "OTEL_EXPORTER_OTLP_ENDPOINT="),
    ],
)
def test_a_malformed_variable_ends_the_process_with_one_line(module: str, key: str, value: str, says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    env |= {"MODELFORGE_DATABASE_URL": "postgresql://127.0.0.1:1/none", key: value}
    result = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("modelforge-") and says in line


@pytest.mark.parametrize(
    "module", ["modelforge_registry", "modelforge_inference", "modelforge_jobs", "modelforge_jobs.worker"]
)
def test_a_service_lists_its_settings_on_help_and_refuses_arguments_it_would_ignore(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    helped = subprocess.run(
        [sys.executable, "-m", module, "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    assert f"usage: python -m {module}" in helped.stdout
    assert re.search(r"^  MODELFORGE_LOG_LEVEL +INFO$", helped.stdout, re.MULTILINE), helped.stdout
    assert re.search(r"^  MODELFORGE_TRACE_SAMPLE_RATIO +1.0$", helped.stdout, re.MULTILINE), helped.stdout
    # Every port has a default: one shown as "(unset)" alone would read as "none" (the jobs' used to).
    assert not re.search(r"PORT +\(unset\)$", helped.stdout, re.MULTILINE), helped.stdout
    if module == "modelforge_inference":  # lists as they are set: comma-separated, not Python's tuples
        assert re.search(r"^  MODELFORGE_EXECUTION_PROVIDERS +CPUExecutionProvider$", helped.stdout, re.MULTILINE)
        assert re.search(r"^  MODELFORGE_PREFERRED_BATCH_SIZES +\(unset\)$", helped.stdout, re.MULTILINE)
    refused = subprocess.run(
        [sys.executable, "-m", module, "--port", "6000"], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2  # it used to start on the default port, the argument ignored
    assert refused.stderr == (
        f"python -m {module}: unrecognized arguments: --port 6000; it takes no arguments: set MODELFORGE_* variables"
        " (see --help)\n"
    )


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("MODELFORGE_MAX_LOADED_MODELS", "abc", "MODELFORGE_MAX_LOADED_MODELS='abc' is invalid"),  # inference's
        ("MODELFORGE_DEFAULT_JOB_BATCH_SIZE", "0", "MODELFORGE_DEFAULT_JOB_BATCH_SIZE=0 is invalid"),  # the jobs'
        ("MODELFORGE_METRICS_PORT", "x", "MODELFORGE_METRICS_PORT='x' is invalid"),  # `up`'s own
        ("MODELFORGE_REDIS_URL", "notaurl", "MODELFORGE_REDIS_URL is invalid"),
        ("MODELFORGE_TRACE_SAMPLE_RATIO", "2", "MODELFORGE_TRACE_SAMPLE_RATIO=2.0 is invalid"),  # every program's
        ("MODELFORGE_TRACE_SAMPLE_RATIO", "abc", "MODELFORGE_TRACE_SAMPLE_RATIO='abc' is invalid: expected a number"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url", "OTEL_EXPORTER_OTLP_ENDPOINT='not a url' is invalid"),
    ],
)
def test_up_refuses_a_malformed_variable_of_any_service_before_starting_anything(
    tmp_path: Path, key: str, value: str, says: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    env |= {"MODELFORGE_DATA_DIR": str(tmp_path), key: value}
    up = [str(Path(sys.executable).parent / "modelforge"), "up"]
    result = subprocess.run(up, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("modelforge up: ") and says in line
    assert result.stdout == ""  # no store or service was started
    assert not (tmp_path / "postgres").exists()


@contextlib.contextmanager
def a_port_in_use() -> Iterator[int]:
    """A port of 127.0.0.1 that another socket listens on, as another server would."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("module", ["modelforge_registry", "modelforge_inference", "modelforge_jobs"])
@pytest.mark.parametrize(
    ("key", "other", "use"),
    [("MODELFORGE_PORT", "MODELFORGE_METRICS_PORT", "gRPC"), ("MODELFORGE_METRICS_PORT", "MODELFORGE_PORT", "metrics")],
)
def test_a_port_in_use_ends_the_service_with_one_line_before_it_starts_anything(
    tmp_path: Path, module: str, key: str, other: str, use: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    with a_port_in_use() as port:
        env |= {"MODELFORGE_DATA_DIR": str(tmp_path), key: str(port), other: "0"}
        result = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # no traceback, and no log of a store started then stopped
    assert line.startswith("modelforge-")
    assert f"port {port} ({use}) is in use by another process (or a connection still closing)" in line
    assert f"choose another port with {key}" in line
    assert not (tmp_path / "postgres").exists() and not (tmp_path / "redis").exists()


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("not..valid", "a name with an empty label"),
        ("a" * 64 + ".example", "a name with a label longer than 63 characters"),
        ("nonexistent.invalid", "Name or service not known"),
    ],
)
def test_a_host_that_cannot_be_listened_on_ends_the_service_with_one_line(tmp_path: Path, host: str, says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    env |= {"MODELFORGE_DATA_DIR": str(tmp_path), "MODELFORGE_HOST": host, "MODELFORGE_METRICS_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "modelforge_registry"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"modelforge-registry: MODELFORGE_HOST={host!r} is invalid: {says}")
    assert not (tmp_path / "postgres").exists()


def test_a_database_that_cannot_be_opened_ends_the_service_with_one_line_naming_it(
    tmp_path: Path, closed_port: int
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_")}
    url = f"postgresql://modelforge:s3cret@127.0.0.1:{closed_port}/models"
    env |= {"MODELFORGE_DATA_DIR": str(tmp_path), "MODELFORGE_DATABASE_URL": url, "MODELFORGE_METRICS_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "modelforge_registry"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after psycopg_pool's own warning, a line of the service's
    assert line.startswith(f"modelforge-registry: cannot open the PostgreSQL database 127.0.0.1:{closed_port}/models")
    assert "Connection refused" in line and "check MODELFORGE_DATABASE_URL" in line
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr

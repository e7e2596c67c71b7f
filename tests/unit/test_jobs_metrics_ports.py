"""Which port the jobs API and a jobs worker serve /metrics on, from the MODELFORGE_* variables."""

from __future__ import annotations

import pytest

from modelforge_jobs.settings import API_METRICS_PORT, WORKER_METRICS_PORT, JobsSettings
from modelforge_server import telemetry
from modelforge_server.settings import from_env


def ports(environ: dict[str, str]) -> tuple[int, int]:
    """(API port, worker port) as their main()s pick them; tracing stays off without an endpoint."""
    settings = from_env(JobsSettings, environ)
    api = telemetry.setup("modelforge-jobs", settings, metrics_port=API_METRICS_PORT, environ=environ)
    worker = telemetry.setup(
        "modelforge-jobs-worker", settings.for_worker(), metrics_port=WORKER_METRICS_PORT, environ=environ
    )
    assert api.provider is None and worker.provider is None
    return api.metrics_port, worker.metrics_port


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, (9103, 9104)),  # one host, `modelforge up`: apart by default
        ({"MODELFORGE_METRICS_PORT": "9103"}, (9103, 9103)),  # a worker in a container of its own (compose.yaml)
        ({"MODELFORGE_WORKER_METRICS_PORT": "9200"}, (9103, 9200)),
        ({"MODELFORGE_METRICS_PORT": "9300", "MODELFORGE_WORKER_METRICS_PORT": "9201"}, (9300, 9201)),
        ({"MODELFORGE_WORKER_METRICS_PORT": "0"}, (9103, 0)),  # this worker serves no metrics
        ({"MODELFORGE_METRICS_PORT": "0"}, (0, 0)),
    ],
)
def test_metrics_ports(environ: dict[str, str], expected: tuple[int, int]) -> None:
    assert ports(environ) == expected

"""The exposition fork of `dramatiq --processes N` (serve_multiprocess) without a port serves nothing, and says so
once, naming the variable to set: the workers serve no metrics of their own in that mode."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelforge_server.metrics import serve_multiprocess


@pytest.mark.parametrize("port", [None, "0"], ids=["unset", "zero"])
def test_the_fork_without_a_metrics_port_warns_that_nothing_is_served(
    port: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("MODELFORGE_METRICS_PORT", raising=False)
    if port is not None:
        monkeypatch.setenv("MODELFORGE_METRICS_PORT", port)
    monkeypatch.setenv("MODELFORGE_WORKER_METRICS_PORT", "47501")  # the workers' setting: not the fork's

    with caplog.at_level(logging.INFO, logger="modelforge.metrics"):
        assert serve_multiprocess() == 0

    (record,) = caplog.records
    assert (record.name, record.levelno) == ("modelforge.metrics", logging.WARNING)
    message = record.getMessage()
    assert message.startswith("no metrics are served: MODELFORGE_METRICS_PORT is unset or 0")
    assert "set MODELFORGE_METRICS_PORT to serve them (MODELFORGE_WORKER_METRICS_PORT does not apply here)" in message


def test_the_fork_refuses_to_start_outside_multiprocess_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR is not set"):
        serve_multiprocess()

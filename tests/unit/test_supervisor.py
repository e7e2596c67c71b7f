"""The environment `modelforge up` gives each child: its port, and metrics ports that do not collide."""

from __future__ import annotations

import pytest

from modelforge_server.supervisor import PROGRAMS, child_environ

REGISTRY, INFERENCE, JOBS, WORKER = PROGRAMS
BASE = {"MODELFORGE_HOST": "127.0.0.1", "MODELFORGE_PORT": "1"}


def _metrics(environ: dict[str, str], workers: int = 2) -> list[str | None]:
    services = [child_environ(environ, p, p.default_port, 0, 1).get("MODELFORGE_METRICS_PORT") for p in PROGRAMS[:3]]
    return services + [
        child_environ(environ, WORKER, None, index, workers).get("MODELFORGE_WORKER_METRICS_PORT")
        for index in range(workers)
    ]


def test_each_service_gets_its_own_port_and_no_inherited_one() -> None:
    assert child_environ(BASE, INFERENCE, 50052, 0, 1)["MODELFORGE_PORT"] == "50052"
    assert "MODELFORGE_PORT" not in child_environ(BASE, WORKER, None, 0, 1)


def test_one_metrics_port_for_the_suite_is_the_first_of_consecutive_ports() -> None:
    assert _metrics({**BASE, "MODELFORGE_METRICS_PORT": "19100"}) == ["19100", "19101", "19102", "19103", "19104"]


def test_without_metrics_ports_services_keep_their_defaults_and_workers_count_up_from_9104() -> None:
    assert _metrics(BASE) == [None, None, None, "9104", "9105"]
    assert "MODELFORGE_WORKER_METRICS_PORT" not in child_environ(BASE, WORKER, None, 0, 1)  # the worker's default


@pytest.mark.parametrize(("given", "expected"), [("9200", ["9200", "9201"]), ("0", ["0", "0"])])
def test_workers_count_up_from_their_own_setting_and_zero_turns_theirs_off(given: str, expected: list[str]) -> None:
    environ = {**BASE, "MODELFORGE_METRICS_PORT": "19100", "MODELFORGE_WORKER_METRICS_PORT": given}
    assert _metrics(environ)[3:] == expected


def test_metrics_off_for_the_suite_stays_off() -> None:
    assert _metrics({**BASE, "MODELFORGE_METRICS_PORT": "0", "MODELFORGE_WORKER_METRICS_PORT": "0"}) == [
        "0",
        "0",
        "0",
        "0",
        "0",
    ]

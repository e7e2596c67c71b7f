"""The environment `modelforge up` gives each child: its port, and metrics ports that do not collide."""

from __future__ import annotations

import os

import pytest

from modelforge_server.supervisor import (
    PROGRAMS,
    SupervisorError,
    UpOptions,
    child_environ,
    select,
    spread_over_replicas,
)

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


def _replicas(environ: dict[str, str], count: int = 3) -> list[dict[str, str]]:
    return [child_environ(environ, INFERENCE, 50052, index, count) for index in range(count)]


def test_replicas_share_the_port_and_each_has_a_private_address_metrics_port_and_model_cache_of_its_own() -> None:
    replicas = _replicas({**BASE, "MODELFORGE_DATA_DIR": "/srv/mf"})
    assert {env["MODELFORGE_PORT"] for env in replicas} == {"50052"}
    assert {env["MODELFORGE_SHARE_PORT"] for env in replicas} == {"true"}
    assert [env["MODELFORGE_PRIVATE_ADDRESS"] for env in replicas] == [
        f"unix-abstract:modelforge-{os.getpid()}-inference-{n}" for n in (1, 2, 3)
    ]
    assert [env["MODELFORGE_METRICS_PORT"] for env in replicas] == ["9102", "9112", "9122"]
    assert [env["MODELFORGE_MODEL_DIR"] for env in replicas] == [
        "/srv/mf/models",
        "/srv/mf/models-2",
        "/srv/mf/models-3",
    ]


def test_replicas_count_their_metrics_ports_from_the_suites_and_keep_a_model_dir_given_for_the_first() -> None:
    environ = {**BASE, "MODELFORGE_METRICS_PORT": "19100", "MODELFORGE_MODEL_DIR": "/cache/models"}
    replicas = _replicas(environ)
    assert [env["MODELFORGE_METRICS_PORT"] for env in replicas] == ["19101", "19111", "19121"]
    assert [env["MODELFORGE_MODEL_DIR"] for env in replicas] == ["/cache/models", "/cache/models-2", "/cache/models-3"]
    off = _replicas({**BASE, "MODELFORGE_METRICS_PORT": "0"})
    assert [env["MODELFORGE_METRICS_PORT"] for env in off] == ["0", "0", "0"]


def test_a_single_process_neither_shares_its_port_nor_inherits_a_private_address() -> None:
    environ = {**BASE, "MODELFORGE_PRIVATE_ADDRESS": "unix-abstract:mine"}
    for program in PROGRAMS:
        env = child_environ(environ, program, program.default_port, 0, 1)
        assert "MODELFORGE_PRIVATE_ADDRESS" not in env and "MODELFORGE_SHARE_PORT" not in env
        assert "MODELFORGE_MODEL_DIR" not in env


@pytest.mark.parametrize(
    ("environ", "replicas", "expected"),
    [({}, 3, "24"), ({}, 1, None), ({"MODELFORGE_INFERENCE_CONNECTIONS": "5"}, 3, "5")],
)
def test_workers_spread_their_batches_over_8_connections_per_inference_replica_unless_told(
    environ: dict[str, str], replicas: int, expected: str | None
) -> None:
    env = dict(environ)
    spread_over_replicas(env, UpOptions(replicas={"inference": replicas}))
    assert env.get("MODELFORGE_INFERENCE_CONNECTIONS") == expected


@pytest.mark.parametrize("name", ["registry", "jobs"])
def test_only_inference_takes_replicas(name: str) -> None:
    with pytest.raises(SupervisorError, match=f"{name} runs as one process; only inference takes replicas"):
        select(UpOptions(replicas={name: 2}))

"""compose.yaml and its observability files: the services, ports, health checks and profiles operators rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SUITE = {"registry": 50051, "inference": 50052, "jobs": 50053}
METRICS = {"registry": 9101, "inference": 9102, "jobs": 9103, "jobs-worker": 9103}
OBSERVABILITY = {"otel-collector", "jaeger", "prometheus"}
# The service keys this file uses, all from the Compose specification: a misspelt key fails here, not at deploy time.
SERVICE_KEYS = {
    "image", "build", "command", "environment", "ports", "expose", "volumes", "depends_on", "healthcheck",
    "restart", "stop_grace_period", "deploy", "profiles",
}  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_the_file_names_every_process_of_the_suite_and_its_stores(compose: dict[str, Any]) -> None:
    assert compose["name"] == "modelforge"
    assert set(compose["services"]) == {"postgres", "redis", *SUITE, "jobs-worker", *OBSERVABILITY}
    for name, service in compose["services"].items():
        assert set(service) <= SERVICE_KEYS, f"{name}: {set(service) - SERVICE_KEYS}"
    assert set(compose) <= {"name", "services", "volumes"} | {k for k in compose if k.startswith("x-")}


def test_services_publish_their_grpc_ports_and_serve_metrics_on_theirs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, port in SUITE.items():
        assert services[name]["ports"] == [f"{port}:{port}"]
        assert services[name]["environment"]["MODELFORGE_PORT"] == str(port)
    for name, port in METRICS.items():
        assert services[name]["environment"]["MODELFORGE_METRICS_PORT"] == str(port)
        assert str(port) in services[name]["expose"]


def test_every_process_shares_one_environment(compose: dict[str, Any]) -> None:
    shared = compose["x-modelforge-environment"]
    assert (
        shared["MODELFORGE_DATABASE_URL"].startswith("postgresql://")
        and "@postgres:5432/" in shared["MODELFORGE_DATABASE_URL"]
    )
    assert shared["MODELFORGE_REDIS_URL"] == "redis://redis:6379/0"
    for name in [*SUITE, "jobs-worker"]:
        environment = compose["services"][name]["environment"]
        assert {k: environment[k] for k in shared} == shared, name
        assert compose["services"][name]["command"][:2] == ["python", "-m"]
    assert compose["services"]["jobs-worker"]["command"][2] == "modelforge_jobs.worker"


@pytest.mark.parametrize("name", [*SUITE])
def test_services_report_health_over_grpc(compose: dict[str, Any], name: str) -> None:
    test = compose["services"][name]["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "/opt/modelforge/healthcheck.py", "grpc"]
    assert test[4] == f"127.0.0.1:{SUITE[name]}"


def test_every_long_running_service_outside_the_profile_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "profiles" not in service:
            assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_services_start_after_their_dependencies_are_healthy(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def waits_for(name: str) -> set[str]:
        depends = services[name]["depends_on"]
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name
        return set(depends)

    assert waits_for("registry") == {"postgres"}
    assert waits_for("inference") == {"registry", "redis"}
    assert waits_for("jobs") == {"postgres", "redis", "inference"}
    assert waits_for("jobs-worker") == {"jobs"}


def test_blobs_and_data_live_on_named_volumes(compose: dict[str, Any]) -> None:
    assert {"modelforge-data", "postgres-data", "redis-data"} <= set(compose["volumes"])
    # Model files are the only state on disk; job datasets and results live in PostgreSQL.
    assert "modelforge-data:/data" in compose["services"]["registry"]["volumes"]
    shared = compose["x-modelforge-environment"]
    assert shared["MODELFORGE_BLOB_DIR"].startswith("/data/")
    assert not any("DATASET" in key for key in shared)


def test_observability_is_an_opt_in_profile_wired_to_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {name for name, s in services.items() if "profiles" in s} == OBSERVABILITY
    assert all(services[name]["profiles"] == ["observability"] for name in OBSERVABILITY)

    prometheus = yaml.safe_load((ROOT / "deploy/observability/prometheus.yml").read_text())
    targets = {
        (sd["names"][0], sd["port"]) for job in prometheus["scrape_configs"] for sd in job.get("dns_sd_configs", [])
    }
    assert targets == set(METRICS.items())

    collector = yaml.safe_load((ROOT / "deploy/observability/otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (exporter,) = collector["service"]["pipelines"]["traces"]["exporters"]
    assert collector["exporters"][exporter]["endpoint"] == "jaeger:4317"
    for mount in [*services["prometheus"]["volumes"], *services["otel-collector"]["volumes"]]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).is_file(), source


def test_the_image_is_built_from_the_one_dockerfile_and_runs_as_a_user(compose: dict[str, Any]) -> None:
    for name in [*SUITE, "jobs-worker"]:
        assert compose["services"][name]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    user_lines = [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user_lines and "root" not in user_lines[-1]
    assert '".[server]"' in dockerfile
    assert (ROOT / "deploy/healthcheck.py").is_file()

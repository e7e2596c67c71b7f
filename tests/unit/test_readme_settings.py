"""The README's settings table names every MODELFORGE_* variable a service reads, and none that it does not."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from modelforge_inference.settings import InferenceSettings
from modelforge_jobs.settings import JobsSettings
from modelforge_registry.settings import RegistrySettings
from modelforge_server.telemetry import TelemetrySettings

README = Path(__file__).resolve().parents[2] / "README.md"
CLIENT_VARIABLES = {"MODELFORGE_REGISTRY_ADDRESS", "MODELFORGE_INFERENCE_ADDRESS", "MODELFORGE_JOBS_ADDRESS"}


def settings_variables() -> set[str]:
    classes = (RegistrySettings, InferenceSettings, JobsSettings, TelemetrySettings)
    return {f"MODELFORGE_{field.name.upper()}" for cls in classes for field in dataclasses.fields(cls)}


def table_variables() -> set[str]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| variable | service | default | meaning |") :].split("\n\n", 1)[0]
    return set(re.findall(r"`(MODELFORGE_[A-Z_]+)`", table))


def test_every_setting_is_in_the_readme_table() -> None:
    missing = settings_variables() - table_variables()
    assert not missing, f"add these to the README's settings table: {sorted(missing)}"


def test_the_readme_table_names_no_setting_that_does_not_exist() -> None:
    unknown = table_variables() - settings_variables() - CLIENT_VARIABLES
    assert not unknown, f"the README's settings table names variables nothing reads: {sorted(unknown)}"

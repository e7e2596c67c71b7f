"""docs/api.md lists every error reason under the status code its error kind maps to."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

from modelforge_server import errors, status

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
PACKAGES = ("modelforge_server", "modelforge_registry", "modelforge_inference", "modelforge_jobs")
# Entry points, which read settings or build a broker when imported; they define no errors.
ENTRY_POINTS = {"__main__", "worker"}


def service_modules() -> list[str]:
    """Every module of the services, entry points aside: an error class may live beside the code that raises it."""
    names = []
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        for module in pkgutil.iter_modules(path):
            if module.name not in ENTRY_POINTS:
                names.append(f"{package}.{module.name}")
    return names


def service_errors() -> list[type[errors.ServiceError]]:
    found = []
    for name in service_modules():
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            # a kind's subclass; the kinds and their base only label errors (of jobs, of another service)
            raised = cls is not errors.ServiceError and errors.ServiceError not in cls.__bases__
            if issubclass(cls, errors.ServiceError) and cls.__module__ == name and "reason" in vars(cls) and raised:
                found.append(cls)
    return found


def documented() -> dict[str, set[str]]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| ([A-Z_]+) \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", match.group(2)))
    return rows


@pytest.mark.parametrize("cls", service_errors(), ids=lambda c: f"{c.__module__.split('.')[0]}.{c.__name__}")
def test_each_reason_is_documented_under_its_code(cls: type[errors.ServiceError]) -> None:
    code = status.code_for(cls.__new__(cls)).name
    assert cls.reason in documented().get(code, set()), f"docs/api.md: add `{cls.reason}` to the {code} row"

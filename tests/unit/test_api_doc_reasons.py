"""docs/api.md lists every error reason under the status code its error kind maps to."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from modelforge_server import errors, status

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
MODULES = ("modelforge_registry.errors", "modelforge_inference.errors", "modelforge_jobs.errors")


def service_errors() -> list[type[errors.ServiceError]]:
    found = []
    for name in MODULES:
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            raised = errors.ServiceError not in cls.__bases__  # a kind's subclass; others only label job errors
            if issubclass(cls, errors.ServiceError) and cls.__module__ == name and "reason" in vars(cls) and raised:
                found.append(cls)
    return found


def documented() -> dict[str, set[str]]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| ([A-Z_]+) \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`([A-Z_]+)`", match.group(2)))
    return rows


@pytest.mark.parametrize("cls", service_errors(), ids=lambda c: f"{c.__module__.split('.')[0]}.{c.__name__}")
def test_each_reason_is_documented_under_its_code(cls: type[errors.ServiceError]) -> None:
    code = status.code_for(cls.__new__(cls)).name
    assert cls.reason in documented().get(code, set()), f"docs/api.md: add `{cls.reason}` to the {code} row"

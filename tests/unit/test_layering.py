"""The architecture as a test: services talk over gRPC only, and the shared core names no service."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SERVICES = {"modelforge_registry", "modelforge_inference", "modelforge_jobs"}
CORE = "modelforge_server"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not importable"
    return sorted(Path(spec.origin).parent.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_a_service_imports_no_other_service(package: str) -> None:
    forbidden = SERVICES - {package}
    for path in package_files(package):
        assert not imported_roots(path) & forbidden, f"{path} imports another service; call it over gRPC instead"


def test_the_core_imports_no_service() -> None:
    for path in package_files(CORE):
        assert not imported_roots(path) & SERVICES, f"{path} imports a service; the core is plumbing only"


def test_the_sdk_imports_no_server_package() -> None:
    """The SDK installs without the server extra, so only its CLI's `up` command may reach the supervisor lazily."""
    for path in package_files("modelforge"):
        roots = imported_roots(path)
        assert not roots & SERVICES, f"{path} imports a service"
        if path.name != "cli.py":
            assert CORE not in roots, f"{path} imports {CORE}"


def test_domain_modules_never_import_generated_code() -> None:
    for package in SERVICES:
        for path in package_files(package):
            if path.name != "domain.py":
                continue
            source = path.read_text(encoding="utf-8")
            assert "_pb2" not in source, f"{path} imports generated code; domain objects are plain Python"

"""The installed packages are found as editors and type checkers find them: through sys.path entries alone.

`make venv` installs the project in editable mode, where setuptools serves the two package roots through an import
hook; mypy, pyright and editors do not run import hooks, and without a plain path entry they report the SDK as
missing in every script of a user's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "package",
    [
        "modelforge",
        "modelforge_cli",
        "modelforge_server",
        "modelforge_registry",
        "modelforge_inference",
        "modelforge_jobs",
    ],
)
def test_each_package_is_found_through_sys_path_without_import_hooks(package: str) -> None:
    found = importlib.machinery.PathFinder.find_spec(package, sys.path)
    assert found is not None, f"{package} is reachable only through an import hook"
    imported = importlib.util.find_spec(package)
    assert imported is not None and found.origin is not None and imported.origin is not None
    assert Path(found.origin).resolve() == Path(imported.origin).resolve()

"""The project's packages import, and the code base is ruff clean."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("name", ["backend", "backend.cli", "backend.method.engine", "backend.video",
                                  "shared.settings", "shared"])
def test_package_imports(name):
    assert importlib.import_module(name) is not None


def test_backend_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "backend", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert "transfer" in result.stdout


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

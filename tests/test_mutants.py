"""Every named mutant in tests/mutants.py makes its tests fail.

A mutant is applied to a copy of the project in a temporary folder, never to the
checkout, and its tests run there in a fresh interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.mutants import MUTANTS, Mutant

COPIED = ("backend", "shared", "blender_addon", "tests", "pyproject.toml", "build.py")
PYTEST_TESTS_FAILED = 1


def apply_mutant(mutant: Mutant, root) -> None:
    """Replace the mutant's original text (and any further edits), each exactly once."""
    path = root / mutant.path
    text = path.read_text()
    for original, mutated in ((mutant.original, mutant.mutated), *mutant.more):
        count = text.count(original)
        assert count == 1, (f"mutant {mutant.name!r}: {original!r} occurs {count} times in "
                            f"{mutant.path}; update tests/mutants.py to the code")
        text = text.replace(original, mutated)
    path.write_text(text)


def copy_project(target) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)


@pytest.mark.parametrize("mutant", MUTANTS, ids=str)
def test_mutant_is_caught(mutant: Mutant, tmp_path):
    copy_project(tmp_path)
    apply_mutant(mutant, tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert run.returncode == PYTEST_TESTS_FAILED, (
        f"mutant {mutant.name!r} survived {' '.join(mutant.tests)} "
        f"(pytest exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")

"""Shared test fixtures. Tests make their own clips and models; nothing reads ../shared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def python() -> str:
    """The interpreter running the tests (the .venv one under build.py)."""
    return sys.executable

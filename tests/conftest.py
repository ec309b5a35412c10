"""Shared test fixtures. Tests make their own clips and models; nothing reads ../shared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import backend  # noqa: F401  (sets OMP_WAIT_POLICY before any test imports torch)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def python() -> str:
    """The interpreter running the tests (the .venv one under build.py)."""
    return sys.executable


# Settings small enough for a CPU: a job takes about a second with the tiny model.
SMALL_SETTINGS = {
    "num_frames": 4, "width": 64, "height": 64, "steps": 3, "guided_steps": 1,
    "guidance_iterations": 2, "inversion_steps": 3,
}


def moving_square_frames(count: int = 8, width: int = 96, height: int = 64):
    """A textured background with a bright square moving right: (count, H, W, 3) uint8."""
    import numpy as np

    rng = np.random.default_rng(0)
    background = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    frames = []
    for index in range(count):
        frame = background.copy()
        left = 4 + index * 4
        frame[height // 3 : height // 3 + 16, left : left + 16] = (240, 200, 40)
        frames.append(frame)
    return np.stack(frames)


@pytest.fixture
def clip_path(tmp_path) -> Path:
    """An 8-frame mp4 made for the test."""
    from backend.video import write_video

    path = tmp_path / "clip.mp4"
    write_video(moving_square_frames(), path, fps=12)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random model saved in diffusers layout (loaded through from_pretrained)."""
    from backend.backbones.zeroscope import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    """The tiny random Wan saved in diffusers layout (a WanPipeline folder)."""
    from backend.backbones.wan_tiny import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="session")
def tiny_wan_vace_dir(tmp_path_factory) -> Path:
    """The tiny random Wan VACE saved in diffusers layout (a WanVACEPipeline folder)."""
    from backend.backbones.wan_tiny import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan-vace"), vace=True)

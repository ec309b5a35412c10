"""Helpers for the Blender tests: the built zip, a small clip, bpy subprocesses.
(Server processes come from tests/server_support.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import REPO_ROOT

SCENARIOS = REPO_ROOT / "tests" / "blender_scenarios.py"
BLENDER_TIMEOUT_S = 240


def build_extension(output_dir: Path) -> Path:
    """Build the extension zips with build.py (wheel downloads cached) → the Linux zip."""
    import build  # the repository's build.py (stdlib only; the repo root is on sys.path)

    try:
        zips = build.package_extension(output_dir, python=sys.executable)
    except build.BuildError as error:
        raise AssertionError(f"Building the extension failed: {error}") from error
    return next(path for path in zips if path.name.endswith("linux_x64.zip"))


def make_clip(path: Path, frames: int = 30, width: int = 160, height: int = 128) -> Path:
    """A small mp4 of a yellow box moving right over blue."""
    import imageio.v3 as iio

    clip = np.zeros((frames, height, width, 3), np.uint8)
    clip[..., 2] = 90
    for index in range(frames):
        x = 4 * index
        clip[index, 40:80, x:x + 30] = (250, 200, 0)
    iio.imwrite(path, clip, fps=24, codec="libx264", macro_block_size=16)
    return path


def blender_lts_python() -> str:
    """The interpreter of the Blender 4.2 LTS environment that `build.py test` prepares."""
    python = os.environ.get("UNDERSTUDY_BLENDER_LTS_PYTHON",
                            str(REPO_ROOT / ".venv-blender-lts" / "bin" / "python"))
    if not Path(python).exists():
        raise AssertionError(f"No Blender 4.2 LTS environment at {python}; run the tests with "
                             "`python build.py test`, which prepares it.")
    return python


def run_blender(args: dict, tmp_path: Path, timeout_s: float = BLENDER_TIMEOUT_S,
                python: str = sys.executable) -> dict:
    """Run one scenario in a fresh bpy process with its own user folder; its RESULT_JSON.

    `python` picks the Blender: this environment's bpy (5.0), or blender_lts_python()."""
    user = tmp_path / f"blender-user-{args['scenario']}-{len(list(tmp_path.glob('blender-user-*')))}"
    user.mkdir(parents=True)
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(user), "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.run([python, str(SCENARIOS), json.dumps(args)], cwd=REPO_ROOT,
                             env=env, capture_output=True, text=True, timeout=timeout_s)
    for line in process.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    raise AssertionError(f"Blender scenario {args['scenario']} printed no result "
                         f"(exit {process.returncode}):\n{process.stdout[-3000:]}\n"
                         f"{process.stderr[-3000:]}")

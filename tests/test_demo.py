"""The main job: `python build.py demo` runs these two commands."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
from PIL import Image

from backend.tools.blender_demo import SHEET_COLUMNS, SHEET_THUMB_WIDTH, contact_sheet
from backend.tools.demo import TINY_DEMO_SETTINGS, demo_clip_frames
from tests.blender_support import build_extension
from tests.conftest import REPO_ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True)


def test_command_line_demo_says_which_model_and_writes_its_files(tmp_path):
    result = run("backend", "demo", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "tiny random model" in result.stdout and "not a quality result" in result.stdout
    assert iio.imread(tmp_path / "result.mp4").shape == (
        TINY_DEMO_SETTINGS["num_frames"], TINY_DEMO_SETTINGS["height"], TINY_DEMO_SETTINGS["width"], 3)
    sidecar = json.loads((tmp_path / "result.json").read_text())
    assert sidecar["model"] == "tiny" and sidecar["seed"] == 1
    assert (tmp_path / "source.mp4").exists()


def test_blender_demo_writes_blend_frames_and_contact_sheet(tmp_path):
    extension = build_extension(tmp_path / "dist")
    result = run("backend.tools.blender_demo", "--zip", str(extension), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    assert (out / "understudy_demo.blend").stat().st_size > 0
    frames = list((out / "understudy").glob("*/*.png"))
    assert frames
    # Source frames above result frames: one row of thumbnails each.
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB")).astype(int)
    source = demo_clip_frames()
    thumb_height = sheet.shape[0] // 2
    assert sheet.shape[1] == SHEET_COLUMNS * SHEET_THUMB_WIDTH
    assert thumb_height == round(SHEET_THUMB_WIDTH * source.shape[1] / source.shape[2] / 2) * 2
    expected_top = contact_sheet(source, source)[:thumb_height]
    assert np.abs(sheet[:thumb_height] - expected_top).mean() < 2
    # The bottom row is the result strip's frames: one generated frame per source frame.
    [folder] = {path.parent for path in frames}
    result_files = sorted(folder.glob("frame_*.png"))
    assert len(result_files) == len(source)
    result = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in result_files])
    expected_bottom = contact_sheet(source, result)[thumb_height:].astype(int)
    assert np.abs(sheet[thumb_height:] - expected_bottom).mean() < 2
    assert np.abs(sheet[thumb_height:] - sheet[:thumb_height]).mean() > 10  # not the source
    width = SHEET_THUMB_WIDTH
    thumbs = [sheet[thumb_height:, i * width:(i + 1) * width] for i in range(SHEET_COLUMNS)]
    assert all(np.abs(a - b).mean() > 0 for a, b in itertools.pairwise(thumbs))  # none held

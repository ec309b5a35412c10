"""`python -m backend evaluate` end to end on generated clips, and its failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backend.cli import main
from backend.tools.evaluate import evaluate_clips, match_clips
from backend.video import write_frames_dir, write_video
from tests.conftest import REPO_ROOT
from tests.synthetic import textured_clip
from tests.tiny_clip import save_tiny_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_match_clips_samples_the_longer_clip_and_shrinks_the_larger():
    source = np.zeros((16, 96, 128, 3), dtype=np.uint8)
    source[:, 0, 0, 0] = np.arange(16)  # frame numbers, to see which frames were kept
    result = np.zeros((8, 64, 80, 3), dtype=np.uint8)
    matched_source, matched_result = match_clips(source, result)
    assert matched_source.shape == matched_result.shape == (8, 64, 80, 3)
    # The engine's rule: 8 frames spread evenly over 16.
    first_pixels = match_clips(source, np.zeros((8, 96, 128, 3), np.uint8))[0][:, 0, 0, 0]
    assert list(first_pixels) == [0, 2, 4, 6, 9, 11, 13, 15]


def test_reversed_motion_scores_below_kept_motion():
    source = textured_clip((2, 1), frames=8)
    same_way = textured_clip((2, 1), frames=8, seed=5)
    other_way = textured_clip((-2, -1), frames=8, seed=5)
    kept = evaluate_clips(source, same_way, "x", clip_model=None, grid=10).report
    reversed_ = evaluate_clips(source, other_way, "x", clip_model=None, grid=10).report
    assert kept["motion_fidelity"]["mean"] > 0.95
    assert reversed_["motion_fidelity"]["mean"] < -0.9
    assert reversed_["edit_fidelity"]["skipped"].endswith(".")


def test_evaluate_command_writes_report_and_picture(tmp_path, clip_folder):
    source = tmp_path / "source.mp4"
    write_video(textured_clip((2, 1), frames=16), source, fps=24)
    result_frames = textured_clip((3, 2), frames=8, size=(64, 80), seed=5)
    result = tmp_path / "result"
    write_frames_dir(result_frames, result)
    report_path, picture = tmp_path / "report.json", tmp_path / "tracks.png"

    run = subprocess.run(
        [sys.executable, "-m", "backend", "evaluate", str(source), str(result),
         "--prompt", "a red car", "-o", str(report_path), "--clip-model", str(clip_folder),
         "--grid", "12", "--picture", str(picture)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "motion fidelity" in run.stdout and "edit fidelity" in run.stdout

    report = json.loads(report_path.read_text())
    assert report["frames"] == {"source": 16, "result": 8, "compared": 8}
    assert report["size"] == {"width": 80, "height": 64}
    motion = report["motion_fidelity"]
    assert set(motion) >= {"result_to_source", "source_to_result", "mean", "tracker", "grid"}
    assert motion["mean"] == pytest.approx(
        (motion["result_to_source"] + motion["source_to_result"]) / 2)
    assert motion["mean"] > 0.8  # same direction of motion, different texture and size
    assert "lucas-kanade" in motion["tracker"] and motion["grid"] == 12
    edit = report["edit_fidelity"]  # a random CLIP: a number in range, not a quality
    assert -1.0 <= edit["score"] <= 1.0 and edit["clip_model"] == str(clip_folder)
    assert len(edit["per_frame"]) == 8

    with Image.open(picture) as image:
        # 64 pixels tall is enlarged 4× (to at least 256) so the tracks stay visible.
        assert image.format == "PNG" and image.size == (2 * 4 * 80 + 4, 4 * 64)


def test_untrackable_noise_skips_motion_fidelity_with_a_reason():
    noise = np.random.default_rng(0).integers(0, 256, size=(6, 48, 64, 3), dtype=np.uint8)
    flat = np.full((6, 48, 64, 3), 128, dtype=np.uint8)
    for result in (noise, flat):
        evaluation = evaluate_clips(textured_clip((1, 0), frames=6, size=(48, 64)), result, "x",
                                    clip_model=None, grid=8)
        motion = evaluation.report["motion_fidelity"]
        assert len(evaluation.result_tracks.points) == 0
        assert "mean" not in motion and "result clip" in motion["skipped"]


def test_unavailable_clip_model_skips_edit_fidelity(tmp_path, capsys):
    source = tmp_path / "source"
    write_frames_dir(textured_clip((1, 0), frames=4), source)
    report_path = tmp_path / "report.json"
    code = main(["evaluate", str(source), str(source), "--prompt", "x", "--grid", "6",
                 "-o", str(report_path), "--clip-model", str(tmp_path / "no-such-clip")])
    assert code == 0
    edit = json.loads(report_path.read_text())["edit_fidelity"]
    assert "score" not in edit and "--clip-model" in edit["skipped"]
    assert "skipped" in capsys.readouterr().out


def one_frame_folder(tmp_path):
    folder = tmp_path / "one"
    write_frames_dir(textured_clip((1, 0), frames=1), folder)
    return folder


@pytest.mark.parametrize("case", ["missing", "unsupported", "one frame", "grid", "picture",
                                  "device"])
def test_bad_inputs_are_one_sentence(tmp_path, capsys, case):
    good = tmp_path / "good"
    write_frames_dir(textured_clip((1, 0), frames=4), good)
    (tmp_path / "notes.txt").write_text("not a clip")
    args = {
        "missing": [str(good), str(tmp_path / "nowhere.mp4")],
        "unsupported": [str(tmp_path / "notes.txt"), str(good)],
        "one frame": [str(good), str(one_frame_folder(tmp_path))],
        "grid": [str(good), str(good), "--grid", "1"],
        "picture": [str(good), str(good), "--picture", str(tmp_path / "tracks.jpg")],
        "device": [str(good), str(good), "--device", "cuda:99"],
    }[case]
    code = main(["evaluate", *args, "--prompt", "x", "--clip-model", "none"])
    error = capsys.readouterr().err.strip()
    assert code == 1
    assert error.startswith("error: ") and error.endswith(".") and "\n" not in error

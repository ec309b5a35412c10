"""Motion fidelity (paper Eq. 5), CLIP edit fidelity, and the Lucas–Kanade tracker."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from backend.errors import BadClipError, ModelNotFoundError
from backend.tools import metrics, tracking
from tests.synthetic import textured_clip
from tests.tiny_clip import save_tiny_clip


def random_tracks(rng: np.random.Generator, count: int = 40, frames: int = 8) -> np.ndarray:
    """Random walks: every track moves its own way."""
    start = rng.uniform(0, 100, size=(count, 1, 2))
    steps = rng.normal(0, 2, size=(count, frames - 1, 2))
    return np.concatenate([start, start + np.cumsum(steps, axis=1)], axis=1)


def coherent_tracks(rng: np.random.Generator, steps: np.ndarray, count: int = 40,
                    noise: float = 0.05) -> np.ndarray:
    """Tracks that all follow the same per-frame displacements (a pan), plus jitter."""
    start = rng.uniform(0, 100, size=(count, 1, 2))
    jitter = rng.normal(0, noise, size=(count, len(steps), 2))
    return np.concatenate([start, start + np.cumsum(steps[None] + jitter, axis=1)], axis=1)


def brute_force(source: np.ndarray, result: np.ndarray, still_px: float) -> tuple[float, float]:
    """Eq. 5 written as loops, with the cosine rules spelled out case by case."""

    def cosine(a, b):
        a_still, b_still = np.linalg.norm(a) <= still_px, np.linalg.norm(b) <= still_px
        if a_still and b_still:
            return 1.0
        if a_still or b_still:
            return 0.0
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def corr(a, b):
        da, db = np.diff(a, axis=0), np.diff(b, axis=0)
        return np.mean([cosine(x, y) for x, y in zip(da, db, strict=True)])

    table = np.array([[corr(s, r) for r in result] for s in source])
    return float(table.max(axis=0).mean()), float(table.max(axis=1).mean())


# --------------------------------------------------------------------------- motion fidelity


def test_identical_track_sets_score_one():
    tracks = random_tracks(np.random.default_rng(0))
    both = metrics.motion_fidelity_both(tracks, tracks)
    assert both["result_to_source"] == pytest.approx(1.0, abs=1e-5)
    assert both["source_to_result"] == pytest.approx(1.0, abs=1e-5)
    assert metrics.motion_fidelity(tracks, tracks) == pytest.approx(1.0, abs=1e-5)


def test_reversed_motion_scores_near_minus_one():
    rng = np.random.default_rng(1)
    pan = rng.normal(0, 3, size=(11, 2))  # a wandering camera pan, 12 frames
    source = coherent_tracks(rng, pan)
    result = coherent_tracks(rng, -pan)
    assert metrics.motion_fidelity(source, result) < -0.95


def test_shifting_the_whole_result_changes_nothing():
    rng = np.random.default_rng(2)
    source, result = random_tracks(rng), random_tracks(rng, count=30)
    shifted = result + np.array([37.5, -12.25])
    assert metrics.motion_fidelity_both(source, shifted) == pytest.approx(
        metrics.motion_fidelity_both(source, result), abs=1e-6)


def test_static_points_are_defined():
    still = np.repeat(np.array([[[5.0, 5.0]], [[20.0, 7.0]]]), 6, axis=1)  # (2, 6, 2)
    moving = still + np.arange(6)[None, :, None] * np.array([1.0, 0.0])
    assert metrics.motion_fidelity(still, still) == pytest.approx(1.0)
    both = metrics.motion_fidelity_both(still, moving)
    assert both == {"result_to_source": 0.0, "source_to_result": 0.0, "mean": 0.0}
    assert all(math.isfinite(value) for value in both.values())


def test_hand_computed_example():
    # source τ moves (1,0) then (0,1).
    source = np.array([[[0, 0], [1, 0], [1, 1]]], dtype=float)
    result = np.array([
        [[0, 0], [2, 0], [2, 0]],  # (2,0): cos 1; then still vs moving: 0  → corr 0.5
        [[5, 5], [6, 6], [6, 7]],  # (1,1): cos 1/√2; then (0,1): cos 1    → corr 0.853553
    ], dtype=float)
    high = (1 / math.sqrt(2) + 1) / 2
    both = metrics.motion_fidelity_both(source, result)
    assert both["result_to_source"] == pytest.approx((0.5 + high) / 2, abs=1e-6)  # 0.676777
    assert both["source_to_result"] == pytest.approx(high, abs=1e-6)
    assert both["mean"] == pytest.approx(((0.5 + high) / 2 + high) / 2, abs=1e-6)  # 0.765165


def test_chunked_computation_matches_loops(monkeypatch):
    rng = np.random.default_rng(3)
    source, result = random_tracks(rng, 23, 6), random_tracks(rng, 17, 6)
    source[:5, 2:4] = source[:5, 2:3]  # some points stand still for a while
    result[:4, 1:3] = result[:4, 1:2]
    expected = brute_force(source, result, metrics.STILL_PX)
    monkeypatch.setattr(metrics, "CHUNK_ROWS", 4)
    assert metrics.best_match_means(source, result) == pytest.approx(expected, abs=1e-5)


def test_paper_sized_grid_runs_in_chunks():
    rng = np.random.default_rng(4)
    tracks = random_tracks(rng, 3025, 24).astype(np.float32)  # 55×55 grid, 24 frames
    assert metrics.motion_fidelity(tracks, tracks[::-1]) == pytest.approx(1.0, abs=1e-5)


def test_bad_track_shapes_are_one_sentence():
    with pytest.raises(BadClipError, match="shaped"):
        metrics.motion_fidelity(np.zeros((4, 5)), np.zeros((4, 5, 2)))
    with pytest.raises(BadClipError, match="No point"):
        metrics.motion_fidelity(np.zeros((0, 5, 2)), np.zeros((4, 5, 2)))
    with pytest.raises(BadClipError, match="same number of frames"):
        metrics.motion_fidelity(np.zeros((3, 5, 2)), np.zeros((3, 6, 2)))


# --------------------------------------------------------------------------- tracker


def test_lucas_kanade_recovers_a_known_translation():
    clip = textured_clip((3, -2))
    tracks = tracking.track_lucas_kanade(clip, grid=12)
    assert tracks.seeded == 144
    assert len(tracks.points) > 0.5 * tracks.seeded  # points leaving the frame are dropped
    error = np.linalg.norm(np.diff(tracks.points, axis=1) - np.array([3.0, -2.0]), axis=-1)
    assert np.median(error) < 0.02
    assert np.percentile(error, 90) < 0.25  # near the border the window sees less texture
    assert "lucas-kanade" in tracks.tracker


def test_forward_backward_check_drops_tracks_across_a_cut():
    clip = textured_clip((1, 0), frames=6)
    cut = np.concatenate([clip[:3], textured_clip((1, 0), frames=3, seed=9)])
    kept_smooth = len(tracking.track_lucas_kanade(clip, grid=10).points)
    kept_cut = len(tracking.track_lucas_kanade(cut, grid=10).points)
    assert kept_cut < 0.2 * kept_smooth


def test_grid_out_of_range_is_refused():
    with pytest.raises(Exception, match="--grid"):
        tracking.track_lucas_kanade(textured_clip((1, 0)), grid=1)


def test_cotracker_without_a_checkpoint_file_is_one_sentence(tmp_path):
    with pytest.raises(ModelNotFoundError, match="checkpoint"):
        tracking.track_cotracker(textured_clip((1, 0)), tmp_path / "missing.pth")


def test_cotracker_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    checkpoint = tmp_path / "scaled_offline.pth"
    checkpoint.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "cotracker", None)  # import cotracker → ImportError
    with pytest.raises(ModelNotFoundError, match="pip install"):
        tracking.track_cotracker(textured_clip((1, 0)), checkpoint)


# A stand-in for the cotracker package with CoTrackerPredictor's interface: it checks
# how it is called and moves its grid by a step read from the "checkpoint".
FAKE_PREDICTOR = """
import torch


class CoTrackerPredictor(torch.nn.Module):
    def __init__(self, checkpoint, offline=True, v2=False, window_len=60):
        super().__init__()
        assert offline and not v2
        self.step = torch.load(checkpoint)["step"]

    def forward(self, video, grid_size=0):
        batch, frames, channels, height, width = video.shape
        assert batch == 1 and channels == 3 and video.dtype == torch.float32
        assert video.max() > 1  # pixel values 0…255, as CoTracker expects
        ys, xs = torch.meshgrid(torch.linspace(0, height - 1, grid_size),
                                torch.linspace(0, width - 1, grid_size), indexing="ij")
        seeds = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        tracks = seeds[None, None] + torch.arange(frames)[None, :, None, None] * self.step
        return tracks, torch.ones(batch, frames, grid_size**2, dtype=torch.bool)
"""


def test_cotracker_tracks_come_back_as_points_frames_xy(tmp_path, monkeypatch):
    import torch

    package = tmp_path / "fake" / "cotracker"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "predictor.py").write_text(FAKE_PREDICTOR)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in ("cotracker", "cotracker.predictor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    checkpoint = tmp_path / "scaled_offline.pth"
    torch.save({"step": torch.tensor([1.5, -0.5])}, checkpoint)

    tracks = tracking.track(textured_clip((1, 0), frames=5), grid=4, checkpoint=checkpoint,
                            device="cpu")
    assert tracks.points.shape == (16, 5, 2) and tracks.seeded == 16
    assert np.diff(tracks.points, axis=1) == pytest.approx(np.broadcast_to([1.5, -0.5], (16, 4, 2)))
    assert tracks.tracker == "cotracker3-offline (scaled_offline.pth)"


# --------------------------------------------------------------------------- edit fidelity


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    return metrics.load_clip_model(folder, device="cpu")


def test_edit_fidelity_is_the_mean_clip_cosine(tiny_clip):
    import torch

    clip, processor, device = tiny_clip
    frames = textured_clip((1, 0), frames=5)
    cosines = metrics.clip_frame_text_cosines(frames, "a red car", clip, processor, device,
                                              batch=2)
    assert cosines.shape == (5,)
    # Independent route: CLIP's own logits are the cosines times exp(logit_scale).
    inputs = processor(text=["a red car"], images=list(frames), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = clip(**inputs)
    expected = (output.logits_per_image[:, 0] / clip.logit_scale.exp()).detach().numpy()
    assert cosines == pytest.approx(expected, abs=1e-5)
    assert metrics.edit_fidelity(frames, "a red car", clip, processor, device) == pytest.approx(
        float(expected.mean()), abs=1e-5)


def test_a_missing_clip_model_is_one_sentence(tmp_path):
    with pytest.raises(ModelNotFoundError, match="--clip-model"):
        metrics.load_clip_model(tmp_path / "no-such-clip", device="cpu")

"""Temporal windows against hand-computed placements and weights."""

from __future__ import annotations

import pytest
import torch

from backend.method.windows import (
    blend_weights,
    blend_windowed,
    place_windows,
    tent_weight,
    window_slice,
)


def test_a_clip_that_fits_is_one_window():
    assert place_windows(24, 24, 8) == [(0, 24)]
    assert place_windows(2, 24, 8) == [(0, 2)]


def test_placements_hand_computed():
    # N=40: K = ⌈32/16⌉ = 2, starts 0 and 16: overlap exactly 8.
    assert place_windows(40, 24, 8) == [(0, 24), (16, 40)]
    # N=60: K = ⌈52/16⌉ = 4, starts ⌊k·36/3⌋ = 0, 12, 24, 36: overlaps of 12.
    assert place_windows(60, 24, 8) == [(0, 24), (12, 36), (24, 48), (36, 60)]
    # N=25: two windows one frame apart.
    assert place_windows(25, 24, 8) == [(0, 24), (1, 25)]
    # Overlap 0 tiles the clip; the last window still ends on the last frame.
    assert place_windows(10, 4, 0) == [(0, 4), (3, 7), (6, 10)]


@pytest.mark.parametrize("num_frames", [2, 23, 24, 25, 40, 41, 47, 60, 96, 100, 240, 241])
@pytest.mark.parametrize("window_frames, overlap", [(24, 8), (24, 0), (24, 23), (4, 2), (5, 1)])
def test_windows_cover_every_frame_overlap_enough_and_weights_sum_to_one(num_frames, window_frames,
                                                                        overlap):
    windows = place_windows(num_frames, window_frames, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == num_frames
    assert all(end - start == min(window_frames, num_frames) for start, end in windows)
    covered = set()
    for start, end in windows:
        covered.update(range(start, end))
    assert covered == set(range(num_frames))
    for (_, end), (next_start, _) in zip(windows, windows[1:], strict=False):
        assert end - next_start >= overlap  # neighbours overlap by at least O
    # The fewest windows that do so: one less could not reach the end with overlap O.
    if len(windows) > 1:
        assert (len(windows) - 2) * (window_frames - overlap) + window_frames < num_frames
    weights = blend_weights(windows, num_frames)
    assert weights.shape == (len(windows), num_frames)
    assert torch.allclose(weights.sum(dim=0), torch.ones(num_frames, dtype=torch.float64))
    assert (weights >= 0).all()


def test_tent_weights_and_cross_fade_hand_computed():
    assert [tent_weight((2, 7), f) for f in range(2, 7)] == [1, 2, 3, 2, 1]
    windows = [(0, 4), (2, 6)]
    # Raw tents: window 0 → 1 2 2 1 on frames 0–3; window 1 → 1 2 2 1 on frames 2–5.
    # Frame 2: 2/(2+1); frame 3: 1/(1+2).
    expected = torch.tensor([[1, 1, 2 / 3, 1 / 3, 0, 0],
                             [0, 0, 1 / 3, 2 / 3, 1, 1]], dtype=torch.float64)
    assert torch.allclose(blend_weights(windows, 6), expected)


def test_blend_weights_refuse_uncovered_frames():
    with pytest.raises(ValueError, match="uncovered"):
        blend_weights([(0, 2), (3, 5)], 5)


def test_place_windows_refuses_bad_overlap():
    with pytest.raises(ValueError):
        place_windows(30, 24, 24)


def test_one_window_returns_the_function_output_untouched():
    latent = torch.randn(1, 2, 5, 3, 3)
    seen = []

    def run(piece, k):
        seen.append((piece, k))
        return piece * 3 + 1

    out = blend_windowed(run, latent, [(0, 5)])
    assert len(seen) == 1 and seen[0][0] is latent and seen[0][1] == 0
    assert torch.equal(out, latent * 3 + 1)


def test_blend_of_two_windows_hand_computed():
    # Each window predicts its own index + 1 everywhere: 1 in window 0, 2 in window 1.
    latent = torch.zeros(1, 1, 6, 1, 1)
    out = blend_windowed(lambda piece, k: torch.full_like(piece, k + 1.0), latent, [(0, 4), (2, 6)])
    # Frames 0–1: 1; frame 2: 2/3·1 + 1/3·2; frame 3: 1/3·1 + 2/3·2; frames 4–5: 2.
    assert torch.allclose(out.flatten(), torch.tensor([1, 1, 4 / 3, 5 / 3, 2, 2]))


def test_a_function_that_is_the_same_everywhere_is_unchanged_by_blending():
    # A per-frame function blended over any windows gives back that function.
    latent = torch.randn(2, 3, 11, 2, 2)
    out = blend_windowed(lambda piece, k: piece.sin(), latent, place_windows(11, 4, 2))
    assert torch.allclose(out, latent.sin(), atol=1e-6)


def test_blend_runs_windows_in_order_and_reports_after_each():
    calls = []
    blend_windowed(lambda piece, k: calls.append(("run", k, piece.shape[2])) or piece,
                   torch.zeros(1, 1, 10, 1, 1), place_windows(10, 4, 2),
                   after_window=lambda k: calls.append(("after", k)))
    windows = place_windows(10, 4, 2)
    expected = []
    for k in range(len(windows)):
        expected += [("run", k, 4), ("after", k)]
    assert calls == expected


def test_window_slice_is_a_view_of_the_frames():
    tensor = torch.arange(10.0).reshape(1, 1, 10)
    piece = window_slice(tensor, (3, 6))
    assert piece.tolist() == [[[3.0, 4.0, 5.0]]]
    assert piece.data_ptr() == tensor[..., 3:].data_ptr()
    assert window_slice(tensor, (0, 10)) is tensor

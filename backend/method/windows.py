"""Temporal windows: editing a clip longer than the model's clip length.

ZeroScope was trained on 24-frame clips. A longer clip keeps one latent for all its
frames; every UNet use runs the model on overlapping windows of the model's length
and blends the windows' outputs where they overlap (docs/method.md, "Long clips").

Notation (docs/method.md):

    N        frames in the clip              `num_frames`
    L        frames in a window              `window_frames` (24 for ZeroScope)
    O        requested overlap               `overlap` (8 by default)
    K        number of windows               `len(windows)`
    [s_k, e_k)  window k's frames            `windows[k]`
    w_k(f)   window k's raw weight at f      `tent_weight`
    W_k(f)   window k's blend weight at f    `blend_weights(...)[k, f]`

Placement: K = 1 when N ≤ L, else K = ⌈(N − O) / (L − O)⌉, the fewest windows of
length L whose neighbours overlap by at least O frames; the starts are spread evenly
from 0 to N − L, s_k = ⌊k·(N − L)/(K − 1)⌋, so the first window starts on the first
frame and the last ends on the last.

Blending: w_k(f) = min(f − s_k + 1, e_k − f), a tent that is largest mid-window and
smallest on the window's edge frames; W_k(f) = w_k(f) / Σ_m w_m(f) over the windows
m that hold f. Where two windows overlap this is a linear cross-fade, and on every
frame the weights sum to 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Window = tuple[int, int]
"""[start, end) frame range of one window."""


def place_windows(num_frames: int, window_frames: int, overlap: int) -> list[Window]:
    """Where the windows fall: K windows of `window_frames`, covering every frame.

    A clip of at most `window_frames` frames is one window [0, N).
    """
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    if not 0 <= overlap < window_frames:
        raise ValueError(f"overlap must be in [0, {window_frames}), got {overlap}")
    if num_frames <= window_frames:
        return [(0, num_frames)]
    stride = window_frames - overlap
    count = -(-(num_frames - overlap) // stride)  # ⌈(N − O) / (L − O)⌉
    last_start = num_frames - window_frames
    starts = [k * last_start // (count - 1) for k in range(count)]
    return [(start, start + window_frames) for start in starts]


def tent_weight(window: Window, frame: int) -> int:
    """w_k(f) = min(f − s_k + 1, e_k − f): 1 on the window's edge frames, rising inward."""
    start, end = window
    return min(frame - start + 1, end - frame)


def blend_weights(windows: list[Window], num_frames: int) -> torch.Tensor:
    """W (K, N) float64: W[k, f] = w_k(f) / Σ_m w_m(f); 0 outside window k."""
    raw = torch.zeros(len(windows), num_frames, dtype=torch.float64)
    for k, (start, end) in enumerate(windows):
        for frame in range(start, end):
            raw[k, frame] = tent_weight((start, end), frame)
    total = raw.sum(dim=0)
    if (total == 0).any():
        raise ValueError(f"the windows {windows} leave frames of a {num_frames}-frame clip uncovered")
    return raw / total


def window_slice(tensor: torch.Tensor, window: Window, frame_dim: int = 2) -> torch.Tensor:
    """The window's frames of `tensor` (a view); the tensor itself when it is all of it."""
    start, end = window
    if start == 0 and end == tensor.shape[frame_dim]:
        return tensor
    return tensor.narrow(frame_dim, start, end - start)


def blend_windowed(
    run_window: Callable[[torch.Tensor, int], torch.Tensor],
    latent: torch.Tensor,
    windows: list[Window],
    frame_dim: int = 2,
    after_window: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Σ_k W_k ⊙ run_window(latent[s_k:e_k], k), along `frame_dim`.

    `run_window(piece, k)` returns a tensor of the piece's shape (a noise prediction).
    With one window covering the whole latent, its output is returned untouched, so a
    clip that fits one window runs exactly as it would without windows. The blend is
    accumulated in float32 (or the output's dtype, if wider). `after_window(k)` runs
    after window k, for progress and cancellation between windows.
    """
    num_frames = latent.shape[frame_dim]
    if len(windows) == 1 and windows[0] == (0, num_frames):
        out = run_window(latent, 0)
        if after_window is not None:
            after_window(0)
        return out
    weights = blend_weights(windows, num_frames)
    blended: torch.Tensor | None = None
    for k, window in enumerate(windows):
        piece = run_window(window_slice(latent, window, frame_dim), k)
        if blended is None:
            shape = list(piece.shape)
            shape[frame_dim] = num_frames
            blended = torch.zeros(shape, dtype=torch.promote_types(piece.dtype, torch.float32),
                                  device=piece.device)
        start, end = window
        view = [1] * piece.ndim
        view[frame_dim] = end - start
        weight = weights[k, start:end].to(blended.device, blended.dtype).reshape(view)
        window_slice(blended, window, frame_dim).add_(weight * piece)
        if after_window is not None:
            after_window(k)
    assert blended is not None
    return blended

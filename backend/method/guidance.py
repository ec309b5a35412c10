"""The paper's pieces as small pure functions (Yatim et al., CVPR 2024).

Shapes: F frames, D feature channels, H×W spatial; latents are (B, C, F, H, W).

Notation (the paper's symbols; docs/method.md has the whole method):

    features (F, D, H, W)      a tap's activations, frames × channels × space
    φ = smm(features) (F, D)   spatial marginal mean, φ (source) and φ̃ (target); the
                               backbones' taps compute it (backend/backbones/base.py)
    Δ_ij                       φ_j − φ_i, the frame-to-frame difference
    latent, noise              x, ε: (B, C, F, H, W) latents
    LF(x)                      lowpass(x, factor)
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional


def pairwise_smm_loss(source: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Loss between the frame-to-frame differences of two SMM sequences.

    With Δ_ij = φ_j − φ_i (source) and Δ̃_ij = φ̃_j − φ̃_i (target), both (F, D):

    kind="cosine" (the authors' code, to its value):
        L = 1/F · Σ_i  1/F · Σ_j (1 − cos(Δ̃_ij, Δ_ij)),   cos(0, 0) := 0
      The j = i terms are kept, as in the reference: both differences are the zero
      vector there, the cosine (x·y / max(‖x‖‖y‖, ε)) is 0, so each adds 1. The loss
      is therefore 1/F + (F−1)/F · L_off, with L_off the mean over the pairs j ≠ i: its
      floor is 1/F, not 0, and its gradient is (F−1)/F that of L_off.
    kind="l2" (the paper's Eq. 3):
        L = Σ_{i,j} ‖Δ_ij − Δ̃_ij‖²

    Returns a scalar tensor, differentiable in `target`.
    """
    if source.shape != target.shape or source.ndim != 2:
        raise ValueError(f"expected two (F, D) tensors of one shape, got {source.shape} and {target.shape}")
    source_diffs = source[None, :, :] - source[:, None, :]  # [i, j] = φ_j − φ_i
    target_diffs = target[None, :, :] - target[:, None, :]
    if kind == "l2":
        return ((source_diffs - target_diffs) ** 2).sum()
    if kind != "cosine":
        raise ValueError(f"unknown loss kind {kind!r}; use 'cosine' or 'l2'")
    cosine = functional.cosine_similarity(target_diffs, source_diffs, dim=-1, eps=1e-8)
    return (1 - cosine).mean()


def lowpass(latent: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """LF(x): bilinear down-sampling by `factor` in H and W, then back up.

    Both resizes use align_corners=True and antialias=True. (B, C, F, H, W) → same.
    """
    batch, channels, frames, height, width = latent.shape
    planes = latent.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    small = (max(1, height // factor), max(1, width // factor))
    planes = functional.interpolate(planes.float(), size=small, mode="bilinear",
                                    align_corners=True, antialias=True)
    planes = functional.interpolate(planes, size=(height, width), mode="bilinear",
                                    align_corners=True, antialias=True)
    planes = planes.to(latent.dtype)
    return planes.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


def lowfreq_init(latent: torch.Tensor, noise: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Initial latent: x̃_T = LF(x) + (ε₀ − LF(ε₀)).

    The low frequencies of the re-noised source latent `latent` (its coarse layout)
    with the high frequencies of fresh noise `noise`. (B, C, F, H, W) → same.
    """
    return lowpass(latent, factor) + (noise - lowpass(noise, factor))

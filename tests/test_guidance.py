"""The paper's pure functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as functional

from backend.backbones.base import smm
from backend.method.guidance import (
    lowfreq_init,
    lowpass,
    pairwise_smm_loss,
)


def test_smm_is_the_spatial_mean_per_frame_and_channel():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])  # (1, 2, 2, 2)
    assert smm(features).tolist() == [[2.5, 2.0]]
    assert smm(torch.zeros(24, 5, 3, 7)).shape == (24, 5)


def test_cosine_loss_is_its_floor_1_over_f_for_equal_differences_even_when_offset_and_scaled():
    source = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    # Adding a constant to every frame and scaling keeps every difference's direction:
    # every j ≠ i term is 0, and the three j = i terms add 1 each: 3/9.
    target = 3 * source + torch.tensor([5.0, -2.0])
    assert pairwise_smm_loss(source, target).item() == pytest.approx(1 / 3, abs=1e-6)


def test_cosine_loss_hand_computed():
    # Two frames: Δ_01 = φ_1 − φ_0. Source Δ = (1, 0); target Δ = (0, 1): cosine 0, so
    # the pairs (0,1), (1,0) add 1 each, and so do the j = i terms: 4/4.
    source = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert pairwise_smm_loss(source, target).item() == pytest.approx(1.0)
    # Opposite motion: cosine −1, the pairs add 2 each: (2 + 2 + 1 + 1)/4.
    assert pairwise_smm_loss(source, -source).item() == pytest.approx(1.5)
    # Three frames, target motion rotated for two pairs:
    source = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    # Pairs (i,j), j≠i: (0,1) cos 1; (0,2) Δ=(2,0) vs (2,1): 2/√5; (1,2) Δ=(1,0) vs (1,1): 1/√2;
    # the reversed pairs have the same cosines; the three j = i terms add 1 each.
    off_diagonal = (0 + (1 - 2 / math.sqrt(5)) + (1 - 1 / math.sqrt(2))) * 2
    assert pairwise_smm_loss(source, target).item() == pytest.approx((off_diagonal + 3) / 9, rel=1e-6)


def test_cosine_loss_is_the_references_loop_value():
    """The authors' loop: for each anchor i, 1 − mean over all j of the cosine, then the
    mean over anchors (cosine_similarity is 0 between zero vectors)."""
    generator = torch.Generator().manual_seed(0)
    source, target = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    reference = sum(1 - functional.cosine_similarity(target - target[i], source - source[i], dim=1).mean()
                    for i in range(8)) / 8
    assert pairwise_smm_loss(source, target).item() == pytest.approx(reference.item(), rel=1e-6)


def test_l2_loss_is_the_papers_sum_of_squared_difference_errors():
    source = torch.tensor([[0.0], [1.0]])
    target = torch.tensor([[0.0], [3.0]])
    # Δ_01 = 1 vs 3 and Δ_10 = −1 vs −3: (2² + 2²) = 8; the diagonal adds 0.
    assert pairwise_smm_loss(source, target, kind="l2").item() == pytest.approx(8.0)


def test_loss_rejects_mismatched_shapes_and_kinds():
    with pytest.raises(ValueError):
        pairwise_smm_loss(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        pairwise_smm_loss(torch.zeros(3, 2), torch.zeros(3, 2), kind="l1")


def test_loss_gradient_flows_to_the_target():
    source = torch.randn(4, 8)
    target = torch.randn(4, 8, requires_grad=True)
    pairwise_smm_loss(source, target).backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_lowpass_keeps_constants_and_removes_fine_detail():
    constant = torch.full((1, 4, 3, 8, 16), 0.7)
    assert torch.allclose(lowpass(constant, 4), constant, atol=1e-6)
    # A one-pixel checkerboard (the highest frequency) is almost entirely removed.
    checker = (torch.arange(8)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    checker = checker.float().expand(1, 1, 2, 8, 16).contiguous()
    assert lowpass(checker, 4).abs().mean() < 0.1 * checker.abs().mean()


def test_lowfreq_init_takes_low_frequencies_from_latent_and_high_from_noise():
    latent = torch.full((1, 4, 2, 8, 16), 2.0)  # only low frequencies
    noise = torch.randn(1, 4, 2, 8, 16)
    mixed = lowfreq_init(latent, noise, factor=4)
    assert mixed.shape == latent.shape
    # Constant latent: LF(latent) = 2, so mixed = 2 + noise − LF(noise).
    assert torch.allclose(mixed, 2.0 + noise - lowpass(noise, 4), atol=1e-6)
    # Factor 1 keeps the latent itself.
    assert torch.allclose(lowfreq_init(latent, noise, factor=1), latent, atol=1e-5)
